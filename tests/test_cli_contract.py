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


# Usage errors (one line naming the option) are rows of the bad-input table in tests/test_bad_input.py.


# -- interruption: SIGINT, SIGTERM and SIGHUP leave nothing behind ------------------------------------
_PAUSED_AFTER_COMPILE = """
import pathlib, subprocess, sys, time
from edgeopt.converters.targets.onnx import OnnxTarget

compile_model = OnnxTarget._compile

def compile_then_wait(self, model, quantize, ctx, out):
    compile_model(self, model, quantize, ctx, out)   # staging dir and temp dir now hold files
    # a toolchain's child and grandchild (a compiler driver and its linker), still running
    child = subprocess.Popen(["sh", "-c", "sleep 600 & echo $! > " + sys.argv[1] + ".grandchild; wait"])
    while not pathlib.Path(sys.argv[1] + ".grandchild").exists():
        time.sleep(0.01)
    pathlib.Path(sys.argv[1] + ".child").write_text(str(child.pid))
    pathlib.Path(sys.argv[1]).write_text("compiled")
    child.wait()                                     # a long step, to be interrupted

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
    # the signal was passed on: the child and the grandchild it started are gone too
    for which in ("child", "grandchild"):
        pid = int(tmp_path.joinpath(f"ready.{which}").read_text())
        _wait_until_gone(pid, which)


def _wait_until_gone(pid: int, what: str, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            pytest.fail(f"the {what} ({pid}) outlived the interrupted edgeopt")
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


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
    assert err.strip().splitlines()[-1] == "edgeopt: interrupted (SIGTERM)", err
    assert list(parent.iterdir()) == [] and list(tmp.iterdir()) == []


def _unwritable(tmp) -> str:
    """An output location whose parent cannot be written, for root too (this machine runs tests as root)."""
    if os.geteuid() != 0:
        (tmp / "ro").mkdir(mode=0o555)
        return str(tmp / "ro" / "out")
    return "/sys/edgeopt-test-out"  # sysfs: mkdir is refused (EPERM) even for root


# The refusals (--force over the user's files, an unwritable output, a setting the target would not
# honour, install-model of a missing path, an aarch64 library benched here) are rows of the bad-input
# table in tests/test_bad_input.py.


# -- output folders: what --force may replace, and what is checked before any work ------------------------
@pytest.mark.parametrize("existing", ["empty", "artifact"])
def test_force_replaces_an_empty_folder_or_an_earlier_artifact(tiny, tmp_path, existing):
    out = tmp_path / "out"
    if existing == "empty":
        out.mkdir()
    else:
        assert run_cli("convert", tiny, "-o", out, "--target", "onnx", "-q", "--version", "1").code == 0
    res = run_cli("convert", tiny, "-o", out, "--target", "onnx", "-q", "--version", "2", "--force")
    assert res.code == 0, res.err
    assert sorted(p.name for p in out.iterdir()) == ["golden.npz", "manifest.json", "model.onnx", "report.json"]
    assert '"version": "2"' in (out / "manifest.json").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no .old / .partial left beside it


def test_the_output_location_is_checked_before_any_work(tiny, tmp_path, monkeypatch):
    """Unwritable, or too little space: refused before the model is canonicalised, pruned or distilled."""
    from edgeopt.converters.passes.canonicalize import Canonicalize

    def no_work(*args, **kwargs):
        raise AssertionError("the conversion started before the output location was checked")

    monkeypatch.setattr(Canonicalize, "apply", no_work)
    _calibration(tmp_path / "train.npz")
    args = ["--target", "onnx", "--prune-channels", "0.5", "--distill", tmp_path / "train.npz"]
    res = run_cli("convert", tiny, "-o", _unwritable(tmp_path), *args)
    assert res.code == 2 and "cannot write" in _one_line(res.err)

    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    res = run_cli("convert", tiny, "-o", tmp_path / "out", *args)
    assert res.code == 2, res.err
    line = _one_line(res.err)
    assert "not enough space" in line and "4.0 KiB free" in line and "need about 2.0 MiB" in line, line
    assert not (tmp_path / "out").exists()


def test_space_needed_follows_the_recipe():
    from edgeopt.converters.output import MiB, space_needed

    plain, quantized, pruned = (space_needed(100 * MiB, q, steps) for q, steps in
                                (("none", 0), ("int8", 0), ("int8", 2)))
    assert plain.output == quantized.output == 111 * MiB  # 1.1x + 1 MiB (float weights kept at most)
    assert (plain.temp, quantized.temp, pruned.temp) == (101 * MiB, 401 * MiB, 601 * MiB)


def test_force_asks_again_right_before_the_swap(tmp_path):
    """A file put into the old artifact while the conversion ran keeps it from being replaced."""
    from edgeopt.converters.output import replace_problem
    from edgeopt.errors import UserInputError
    from edgeopt.fsutil import staged_directory

    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "manifest.json").write_text('{"model": {"file": "model.onnx"}, "files": {"model.onnx": "x"}}')
    (dest / "model.onnx").write_text("old")
    refuse = pytest.raises(UserInputError, match="holds notes.txt besides an edgeopt artifact")
    with refuse, staged_directory(dest, force=True, replace_problem=lambda d: replace_problem(d, [])) as stage:
        (stage / "model.onnx").write_text("new")
        (dest / "notes.txt").write_text("written meanwhile")
    assert (dest / "model.onnx").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
