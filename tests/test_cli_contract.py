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
