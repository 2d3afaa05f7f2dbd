"""The command line's contract: exit codes 0 / 1 / 2 / 3 (+ 128 + signal), the same with --debug, and
one line on stderr that names what is wrong (usage errors included), never a traceback without --debug."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import run_cli
from onnx_models import chain, save

pytestmark = pytest.mark.usefixtures("private_cache_dir")


def _edgeopt(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    """The real ``edgeopt`` console script in a subprocess (no in-process state, real exit codes)."""
    exe = os.path.join(os.path.dirname(sys.executable), "edgeopt")
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "EDGEOPT_DEBUG"}
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300, env=env, **kwargs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer MatMul model x[1, 8] → y[1, 4] (fast to convert for every target)."""
    return save(chain([8, 16, 4]), tmp_path_factory.mktemp("tiny") / "tiny.onnx")


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("debug", [False, True])
def test_bad_input_exits_2_with_or_without_debug(tiny, tmp_path, debug):
    """--debug adds the traceback and nothing else: the exit code stays 2 (it used to become 1)."""
    proc = _edgeopt(*(["--debug"] if debug else []), "convert", tiny, "-o", tmp_path / "out", "--target", "onxx")
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("edgeopt: error: unknown target 'onxx'"), proc.stderr
    assert ("Traceback (most recent call last)" in proc.stderr) is debug
    if not debug:
        _one_line(proc.stderr)


_BUG = ("import sys\nfrom edgeopt.cli import main\nimport edgeopt.cli.profiles as p\n"
        "def boom(*a, **k):\n    raise RuntimeError('a bug')\n"
        "p.profiles_cmd.callback = boom\nmain(sys.argv[1:])\n")


@pytest.mark.parametrize("debug", [False, True])
def test_an_internal_error_exits_3_with_or_without_debug(debug):
    env = {k: v for k, v in os.environ.items() if k != "EDGEOPT_DEBUG"}
    args = (["--debug"] if debug else []) + ["profiles", "list"]
    proc = subprocess.run([sys.executable, "-c", _BUG, *args], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("edgeopt: internal error: RuntimeError: a bug"), proc.stderr
    assert ("Traceback (most recent call last)" in proc.stderr) is debug


def test_the_exit_code_for_an_internal_error_is_3():
    from edgeopt.cli import EXIT_INTERNAL

    assert EXIT_INTERNAL == 3


@pytest.mark.parametrize("args,line", [
    (["convert"], "edgeopt: error: Missing argument 'MODEL' (see 'edgeopt convert --help')"),
    (["convert", "m.onnx", "-o", "o", "--quantize", "int9"],
     "edgeopt: error: --quantize: 'int9' is not one of 'none', 'fp16', 'int8', 'int8-dynamic', 'int16x8', 'int4' "
     "(see 'edgeopt convert --help')"),
    (["convert", "m.onnx", "-o", "o", "--target", "tvm", "--batch", "0"],
     "edgeopt: error: --batch: must be >= 1, got 0 (see 'edgeopt convert --help')"),
    (["convert", "m.onnx", "-o", "o", "--target", "onnx", "--threads", "0"],
     "edgeopt: error: --threads: 0 is not in the range x>=1 (see 'edgeopt convert --help')"),
    (["bench", "m.onnx", "--batch", "0"],
     "edgeopt: error: --batch: expected comma-separated positive integers, got '0' (see 'edgeopt bench --help')"),
    (["convert", "m.onnx", "-o", "o", "--frce"],
     "edgeopt: error: No such option '--frce'. Did you mean '--force'? (see 'edgeopt convert --help')"),
    (["convert", "m.onnx", "-o", "o", "--distill", "d.npz", "--epochs", "0"],
     "edgeopt: error: --epochs: must be >= 1, got 0 (see 'edgeopt convert --help')"),
    (["nonsense"], "edgeopt: error: No such command 'nonsense' (see 'edgeopt --help')"),
])
def test_usage_errors_are_one_line_naming_the_option(args, line):
    res = run_cli(*args)
    assert res.code == 2, res.err
    assert _one_line(res.err) == line


# -- interruption: SIGINT, SIGTERM and SIGHUP leave nothing behind ------------------------------------
_PAUSED_AFTER_COMPILE = """
import pathlib, sys, time
from edgeopt.converters.targets.onnx import OnnxTarget

compile_model = OnnxTarget._compile

def compile_then_wait(self, model, quantize, ctx, out):
    compile_model(self, model, quantize, ctx, out)   # staging dir and temp dir now hold files
    pathlib.Path(sys.argv[1]).write_text("compiled")
    time.sleep(600)                                  # a long step, to be interrupted

OnnxTarget._compile = compile_then_wait
from edgeopt.cli import main
main(sys.argv[2:])
"""


def _wait_for(predicate, proc, what: str, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"edgeopt exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def _calibration(path):
    import numpy as np

    np.savez(path, x=np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32))
    return path


@pytest.mark.parametrize("signum,code", [(2, 130), (15, 143), (1, 129)], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_mid_conversion_removes_the_staging_and_temporary_directories(tiny, tmp_path, signum, code):
    """A real process, a real signal, while the artifact is being written: exit 128 + signal, one line,
    nothing in the output's parent and nothing in the temporary directory."""
    import signal

    tmp, parent, ready = tmp_path / "tmp", tmp_path / "work", tmp_path / "ready"
    tmp.mkdir(), parent.mkdir()
    cal = _calibration(tmp_path / "cal.npz")
    env = {k: v for k, v in os.environ.items() if k != "EDGEOPT_DEBUG"} | {"TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED_AFTER_COMPILE, ready, "convert", tiny, "-o",
                             parent / "out", "--target", "onnx", "--quantize", "int8", "--calibration", cal, "-q"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    _wait_for(ready.exists, proc, "the model was compiled")
    assert any(tmp.iterdir()) and any(parent.iterdir())  # there is something to clean up
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert _one_line(err) == f"edgeopt: interrupted ({signal.Signals(signum).name})"
    assert list(parent.iterdir()) == [] and list(tmp.iterdir()) == []


def test_sigterm_during_a_real_tvm_compile_leaves_nothing(tiny, tmp_path):
    """No test hook: SIGTERM (what `timeout`, CI and `docker stop` send) once the staging directory
    appears, i.e. while TVM compiles (in C++ most of the time)."""
    pytest.importorskip("tvm")
    tmp, parent = tmp_path / "tmp", tmp_path / "work"
    tmp.mkdir(), parent.mkdir()
    exe = os.path.join(os.path.dirname(sys.executable), "edgeopt")
    env = {k: v for k, v in os.environ.items() if k != "EDGEOPT_DEBUG"} | {"TMPDIR": str(tmp)}
    proc = subprocess.Popen([exe, "convert", tiny, "-o", parent / "out", "--target", "tvm", "-q"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    _wait_for(lambda: any(p.name.endswith(".partial") for p in parent.iterdir()), proc, "the staging directory")
    proc.terminate()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "edgeopt: interrupted (SIGTERM)"
    assert list(parent.iterdir()) == [] and list(tmp.iterdir()) == []
