"""Shared fixtures: real digits models trained once per session, and a CLI runner.

The models are trained with torch on scikit-learn's bundled digits set (no download) by the same
code the demo uses (examples/digits.py).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))

from tflite_guard import only_builtin_tflite_ops  # noqa: E402,F401  (session check: no custom op in any .tflite)

from edgeopt.cli import EXIT_INTERNAL, main  # noqa: E402


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


def run_cli(*args: str | Path) -> CliResult:
    """Run ``edgeopt ARGS`` in-process through the real entry point (error handling included).

    An internal error (a bug, exit 3) fails the test at once: rerun the command with --debug to
    see the traceback.
    """
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = int(exc.code or 0)
    result = CliResult(code, out.getvalue(), err.getvalue())
    if code == EXIT_INTERNAL:
        pytest.fail(f"internal error from edgeopt {' '.join(map(str, args))}: {result.err}")
    return result


def run_cli_subprocess(*args: str | Path, timeout: float = 300) -> CliResult:
    """Run the installed ``edgeopt`` console script in a real subprocess."""
    exe = Path(sys.executable).parent / "edgeopt"
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """edgeopt's cache (``$XDG_CACHE_HOME/edgeopt``) lives in the session's temporary directory, for
    this process and the agents and CLIs it starts, not in the user's home."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session", autouse=True)
def brief_report_latency():
    """In this process, `edgeopt convert` measures its report's latency in a few milliseconds instead
    of its ~1 s per model (the numbers are never asserted against a time); tests/test_bench.py checks
    the real settings and that convert and `edgeopt bench` share them and their code."""
    from edgeopt import bench

    saved = bench.REPORT_SETTINGS
    bench.REPORT_SETTINGS = bench.BenchSettings(warmup=1, rounds=2, min_round_time=0.005)
    yield
    bench.REPORT_SETTINGS = saved


@pytest.fixture(scope="session")
def digits_models(tmp_path_factory) -> dict[str, Path]:
    """digits CNN (~47k weights), MLP (~150k weights) and MLP-1M (~1.1M weights), trained and exported."""
    import digits

    root = tmp_path_factory.mktemp("digits")
    made = {}
    for kind in ("cnn", "mlp", "mlp-1m"):
        out = digits.make(kind, root)
        made[kind] = out["model"]
    made["calibration"] = root / "calibration.npz"
    made["validation"] = root / "validation.npz"
    return made


@pytest.fixture(scope="session")
def digits_split():
    import digits

    return digits.load_split()


@pytest.fixture(scope="session")
def imu_model(tmp_path_factory) -> dict:
    """A 1-D CNN activity classifier ([N, 3, 64], 3 accelerometer channels at 50 Hz) trained on a
    synthetic IMU stream (examples/imu.py), its data, and an ONNX artifact with its preprocessing."""
    import imu

    root = tmp_path_factory.mktemp("imu")
    made = imu.make(root)
    made["artifact"] = root / "artifact"
    res = run_cli("convert", made["model"], "-o", made["artifact"], "--target", "onnx", "-q", "--name", "imu-cnn",
                  "--version", "3", "--preprocessing", made["preprocessing"], "--validation", made["validation"])
    assert res.code == 0, res.err
    return made


@pytest.fixture(scope="session")
def wheel_and_sdist():
    """edgeopt's wheel (built from its sdist, which so proves it builds a working wheel) and sdist, built
    once per session for the device tests (tests/device/, `make test-device`)."""
    from device_env import dists

    return dists()
