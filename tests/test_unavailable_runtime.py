"""The converter's path for a format whose runtime cannot run on this machine (Core ML off macOS):
parity, accuracy and latency stay null with a note saying why, the manifest's I/O come from the
compiled file, golden vectors hold the original model's outputs without a tolerance.

Exercised here with the ONNX target and a runtime told to report itself unavailable, so the
pipeline logic is checked on every platform (the Core ML tests cover the real case on Linux).
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from conftest import run_cli


@pytest.fixture()
def onnx_runtime_unavailable(monkeypatch):
    from edgeopt.converters.targets.onnx import OnnxTarget
    from edgeopt.onnx_io import input_specs, load_model, output_specs
    from edgeopt.runtime.onnxruntime import OnnxRuntime

    monkeypatch.setattr(OnnxRuntime, "unavailable_reason", classmethod(lambda cls: "pretend: no ONNX Runtime here"))

    def io_specs(self, model_path):
        model = load_model(model_path)
        return input_specs(model), output_specs(model)

    monkeypatch.setattr(OnnxTarget, "io_specs", io_specs, raising=False)


def test_nothing_unmeasured_is_claimed(onnx_runtime_unavailable, digits_models, tmp_path):
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["mlp"], "-o", out, "--target", "onnx", "--validation",
                  digits_models["validation"], "-q")
    assert res.code == 0, res.err
    assert "not measured" in res.out
    report = json.loads((out / "report.json").read_text())
    assert all(report["parity"][k] is None for k in ("max_abs_err", "mean_abs_err", "cosine", "top1_agreement"))
    assert report["accuracy"] == {"metric": None, "original": None, "converted": None, "drop": None}
    assert report["latency"]["runtime"] == "onnxruntime" and report["latency"]["p50_ms"] is None
    assert report["status"] == "ok" and any(n.startswith("pretend: no ONNX Runtime here") for n in report["notes"])
    assert "validate" not in [s["step"] for s in report["steps"]]

    manifest = json.loads((out / "manifest.json").read_text())
    assert all(manifest["golden"][k] is None for k in ("atol", "cosine_min", "expected_atol"))
    assert [t["name"] for t in manifest["inputs"]] == ["image"] and manifest["outputs"][0]["name"] == "logits"
    with np.load(out / "golden.npz") as golden:
        x, y = golden["input:image"], golden["output:logits"]
        assert not [k for k in golden.files if k.startswith("expected:")]  # the converted model never ran
    sess = ort.InferenceSession(str(digits_models["mlp"]), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(y, sess.run(None, {"image": x})[0], rtol=1e-6)
    assert len(x) == manifest["golden"]["count"] == 8


def test_an_accuracy_gate_that_cannot_be_measured_is_refused_before_work(onnx_runtime_unavailable, digits_models,
                                                                        tmp_path):
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["mlp"], "-o", out, "--target", "onnx", "--validation",
                  digits_models["validation"], "--max-accuracy-drop", "1")
    assert res.code == 2 and not out.exists()
    assert res.err.strip() == ("edgeopt: error: --max-accuracy-drop needs the converted model to run on this "
                               "machine: pretend: no ONNX Runtime here")
