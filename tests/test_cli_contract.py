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


# -- bad input: one table of (command, exit code, the line printed, what is left on disk) -----------------
def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


def _victim(tmp, tiny, *names) -> None:
    """victim/ holding copies of the model, calibration data and a note, as a user's folder would."""
    import shutil

    (tmp / "victim").mkdir()
    for name in names:
        if name == "model.onnx":
            shutil.copyfile(tiny, tmp / "victim" / name)
        elif name.endswith(".npz"):
            _calibration(tmp / "victim" / name)
        else:
            (tmp / "victim" / name).write_text("my notes")


def _artifact_and_a_note(tmp, tiny) -> None:
    assert run_cli("convert", tiny, "-o", tmp / "victim", "--target", "onnx", "-q").code == 0
    (tmp / "victim" / "notes.txt").write_text("my notes")


def _unwritable(tmp) -> str:
    """An output location whose parent cannot be written, for root too (this machine runs tests as root)."""
    if os.geteuid() != 0:
        (tmp / "ro").mkdir(mode=0o555)
        return str(tmp / "ro" / "out")
    return "/sys/edgeopt-test-out"  # sysfs: mkdir is refused (EPERM) even for root


def _aarch64_library(tmp) -> None:
    """The first 64 bytes of an aarch64 shared object (what `--profile raspberry-pi-4 --target tvm` writes)."""
    import struct

    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + struct.pack("<HHI", 3, 183, 1) + bytes(44)
    (tmp / "model.so").write_bytes(header + bytes(1024))


ARTIFACT = ["victim/golden.npz", "victim/manifest.json", "victim/model.onnx", "victim/report.json"]
# id, setup(tmp, tiny), argv (TINY = the model, a str with {tmp} = a path), exit code, the one line holds, left on disk
BAD_INPUT = [
    ("force-over-the-folder-holding-the-model", lambda t, m: _victim(t, m, "model.onnx", "cal.npz", "notes.txt"),
     ["convert", "{tmp}/victim/model.onnx", "-o", "{tmp}/victim", "--force", "--target", "onnx"], 2,
     ["output location", "victim/model.onnx, an input of this conversion", "write the artifact to another directory"],
     ["victim", "victim/cal.npz", "victim/model.onnx", "victim/notes.txt"]),
    ("force-over-the-folder-holding-the-data", lambda t, m: _victim(t, m, "cal.npz"),
     ["convert", "TINY", "-o", "{tmp}/victim", "--force", "--target", "onnx", "--quantize", "int8",
      "--calibration", "{tmp}/victim/cal.npz"], 2,
     ["victim/cal.npz, an input of this conversion"], ["victim", "victim/cal.npz"]),
    ("force-over-an-unrelated-folder", lambda t, m: _victim(t, m, "notes.txt"),
     ["convert", "TINY", "-o", "{tmp}/victim", "--force", "--target", "onnx"], 2,
     ["is not empty and is not an edgeopt artifact (no manifest.json)", "choose another -o or empty it"],
     ["victim", "victim/notes.txt"]),
    ("force-over-an-artifact-and-a-note", _artifact_and_a_note,
     ["convert", "TINY", "-o", "{tmp}/victim", "--force", "--target", "onnx"], 2,
     ["holds notes.txt besides an edgeopt artifact", "move it away"], ["victim", *sorted(ARTIFACT + ["victim/notes.txt"])]),
    ("log-file-inside-the-output-location", lambda t, m: _victim(t, m),
     ["convert", "TINY", "-o", "{tmp}/victim", "--force", "--target", "onnx", "--log-file", "{tmp}/victim/c.log"], 2,
     ["--log-file", "inside the output location", "write the log elsewhere"], ["victim"]),
    ("unwritable-output-found-before-pruning-and-distillation", lambda t, m: _calibration(t / "train.npz"),
     ["convert", "TINY", "-o", "UNWRITABLE", "--target", "onnx", "--prune-channels", "0.5", "--distill",
      "{tmp}/train.npz"], 2, ["output location", "cannot write"], ["train.npz"]),
    ("calibration-method-tflite-cannot-apply", lambda t, m: _calibration(t / "cal.npz"),
     ["convert", "TINY", "-o", "{tmp}/out", "--target", "tflite", "--quantize", "int8", "--calibration",
      "{tmp}/cal.npz", "--calibration-method", "entropy"], 2,
     ["--calibration-method entropy", "target 'tflite'", "min/max"], ["cal.npz"]),
    ("install-model-of-a-path-that-does-not-exist", lambda t, m: None,
     ["agent", "install-model", "{tmp}/nonexist", "--state-dir", "{tmp}/state"], 2,
     ["nonexist", "does not exist"], []),
    ("bench-an-aarch64-library-here", lambda t, m: _aarch64_library(t),
     ["bench", "{tmp}/model.so"], 2, ["model.so", "aarch64", "this machine is x86_64", "on the board", "qemu"],
     ["model.so"]),
]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input(case, tiny, tmp_path):
    name, setup, argv, code, needles, left = case
    if name.startswith("bench-an-aarch64") and os.uname().machine != "x86_64":
        pytest.skip("the message names this machine's CPU; written for x86_64")
    setup(tmp_path, tiny)
    before = _tree(tmp_path)
    args = [str(tiny) if a == "TINY" else _unwritable(tmp_path) if a == "UNWRITABLE" else a.format(tmp=tmp_path)
            for a in argv]
    res = run_cli(*args)
    assert res.code == code, res.err
    line = _one_line(res.err)
    assert line.startswith("edgeopt: error: ") and "Traceback" not in res.err
    for needle in needles:
        assert needle in line, (needle, line)
    assert _tree(tmp_path) == before and sorted(_tree(tmp_path)) == left


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
