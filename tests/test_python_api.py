"""The Python API (issue 17 point 5): docs/python.md's worked example runs as written, and each
function does what its command does, on the trained digits CNN."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import edgeopt
from edgeopt.errors import UserInputError

from doc_blocks import blocks


def test_the_worked_example_in_the_docs_runs(digits_models, tmp_path):
    (code,) = [b.text for b in blocks("docs/python.md") if b.lang == "python"]
    (tmp_path / "digits").mkdir()
    for key, name in (("cnn", "digits_cnn.onnx"), ("calibration", "calibration.npz"), ("validation", "validation.npz")):
        (tmp_path / "digits" / name).symlink_to(digits_models[key])
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("most sensitive: [") and lines[1].startswith("ok ")
    assert lines[2].startswith("best: ") and (tmp_path / "digits-opt" / "best" / "manifest.json").is_file()
    assert json.loads((tmp_path / "digits-int8" / "report.json").read_text())["accuracy"]["drop"] <= 1.0


def test_import_edgeopt_loads_no_converter():
    code = "import sys, edgeopt; print(any(m.startswith(('edgeopt.converters', 'onnx')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_results_match_the_cli_and_unknown_options_are_named(digits_models, tmp_path):
    result = edgeopt.convert(digits_models["cnn"], tmp_path / "a", target="onnx", validation=digits_models["validation"])
    assert result.report["status"] == "ok" and result.manifest["model"]["format"] == "onnx"
    with pytest.raises(UserInputError, match="no option 'quantise'"):
        edgeopt.convert(digits_models["cnn"], tmp_path / "b", quantise="int8")
    assert not (tmp_path / "b").exists()
    with pytest.raises(edgeopt.ConvertCheckFailed):
        edgeopt.convert(digits_models["cnn"], tmp_path / "c", target="onnx", validation=digits_models["validation"],
                        min_cosine=1.0 + 0.0, quantize="fp16")
    failed = edgeopt.convert(digits_models["cnn"], tmp_path / "c", target="onnx", validation=digits_models["validation"],
                             min_cosine=1.0, quantize="fp16", check=False, force=True)
    assert failed.report["status"] == "failed"
    with pytest.raises(AttributeError):
        edgeopt.no_such_name  # noqa: B018


