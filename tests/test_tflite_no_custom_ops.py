"""The session-wide "no custom op in any emitted .tflite" check really fails a run."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tflite_guard import custom_ops_in, write_tflite_with_custom_op

TESTS = Path(__file__).resolve().parent


def test_checker_finds_a_custom_op_and_passes_builtin_files():
    from edgeopt.converters.passes import PassContext
    from edgeopt.converters.targets.tflite import TFLiteTarget

    from onnx_models import chain

    with tempfile.TemporaryDirectory() as tmp:  # outside pytest's temp dir, which the session check walks
        root = Path(tmp)
        (root / "sub").mkdir()
        write_tflite_with_custom_op(root / "sub" / "bad.tflite")
        TFLiteTarget().compile(chain([8, 4, 2]), "none", PassContext(workdir=root), root)  # builtin-only
        assert (root / "model.tflite").is_file()
        found = custom_ops_in(root)
        assert found == {str(root / "sub" / "bad.tflite"): ["CUSTOM:FancyOp"]}


def test_a_test_run_that_writes_a_custom_op_fails():
    """Run pytest on a one-test suite that writes such a file, with the same guard plugin the conftest uses."""
    with tempfile.TemporaryDirectory() as tmp:  # outside this session's temp dir
        _run_guarded_suite(Path(tmp))


def _run_guarded_suite(tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_writes_custom_op.py").write_text(
        "from tflite_guard import write_tflite_with_custom_op\n\n"
        "def test_write(tmp_path):\n"
        "    write_tflite_with_custom_op(tmp_path / 'model.tflite')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tflite_guard", "-p", "no:cacheprovider",
                           "--basetemp", str(tmp_path / "base"), "--rootdir", str(suite), "-c", os.devnull,
                           str(suite)], capture_output=True, text=True, env=env, timeout=300, cwd=suite)
    assert proc.returncode != 0, proc.stdout
    assert "contain custom operators" in proc.stdout and "CUSTOM:FancyOp" in proc.stdout
    assert "1 passed, 1 error" in proc.stdout
