"""`edgeopt convert --target tflite` end to end on the digits models trained in the session fixture.

Accuracy, sizes and parity are recomputed here from the files the command wrote (LiteRT on
model.tflite, ONNX Runtime on the source), not only read back from the report.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_convert_onnx import DESIGN_REPORT_KEYS, _ort_logits

from edgeopt.artifact import open_artifact
from edgeopt.converters.targets.tflite.flatbuffer import builtin_op_names
from edgeopt.runtime.litert import LiteRtRuntime

from conftest import run_cli


def _convert(models, out, kind, quantize, *extra):
    res = run_cli("convert", models[kind], "-o", out, "--target", "tflite", "--quantize", quantize,
                  "--calibration", models["calibration"], "--validation", models["validation"], "-q", *extra)
    assert res.code == 0, res.err
    return out


def _litert_logits(path, x_nchw, transposes):
    """Run a converted digits model on NCHW images (converted to its input layout) and dequantize."""
    rt = LiteRtRuntime(path, threads=1)
    perm = transposes.get("image")
    x = np.transpose(x_nchw, perm) if perm else x_nchw
    batch = rt.fixed_batch or len(x)
    return np.concatenate([rt.run_float({"image": x[i:i + batch]})["logits"] for i in range(0, len(x), batch)])


@pytest.fixture(scope="module")
def cnn_tflite(digits_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("tflite-cnn")
    return {q: _convert(digits_models, root / q, "cnn", q) for q in ("none", "int8")}


def test_float_digits_cnn_matches_onnxruntime(cnn_tflite, digits_models):
    out = cnn_tflite["none"]
    manifest = json.loads((out / "manifest.json").read_text())
    transposes = manifest["model"]["io_transposes"]
    assert transposes == {"image": [0, 2, 3, 1]}  # NCHW → NHWC at the edge
    assert manifest["inputs"][0]["shape"] == [1, 8, 8, 1] and manifest["inputs"][0]["dtype"] == "float32"
    x = np.load(digits_models["validation"])["image"]
    ref = _ort_logits(digits_models["cnn"], x)
    got = _litert_logits(out / "model.tflite", x, transposes)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["max_abs_err"] == pytest.approx(float(np.abs(got - ref).max()), rel=1e-3, abs=1e-6)
    # the convolutions run channels-last with no transpose between them: only Flatten's reorder remains
    assert builtin_op_names(out / "model.tflite").count("TRANSPOSE") == 1


def test_int8_digits_cnn_accuracy_size_and_integer_io(cnn_tflite, digits_models):
    fp32, int8 = cnn_tflite["none"], cnn_tflite["int8"]
    val = np.load(digits_models["validation"])
    x, y = val["image"], val["labels"]
    transposes = json.loads((int8 / "manifest.json").read_text())["model"]["io_transposes"]
    acc_orig = (_ort_logits(digits_models["cnn"], x).argmax(1) == y).mean() * 100
    acc_int8 = (_litert_logits(int8 / "model.tflite", x, transposes).argmax(1) == y).mean() * 100
    assert acc_orig > 90
    assert acc_orig - acc_int8 <= 1.0
    ratio = (int8 / "model.tflite").stat().st_size / (fp32 / "model.tflite").stat().st_size
    assert ratio <= 0.30, ratio
    rt = LiteRtRuntime(int8 / "model.tflite")
    assert [s.dtype for s in rt.inputs + rt.outputs] == ["int8", "int8"]  # full integer, int8 I/O
    assert all(s.quantization["scale"] > 0 for s in rt.inputs + rt.outputs)
    report = json.loads((int8 / "report.json").read_text())
    assert report["accuracy"]["drop"] == pytest.approx(acc_orig - acc_int8, abs=1e-6)
    assert report["pass_details"]["quantize-tflite"]["calibration_samples"] == 200


def test_report_manifest_and_golden_vectors(cnn_tflite):
    out = cnn_tflite["int8"]
    report = json.loads((out / "report.json").read_text())
    for key, fields in DESIGN_REPORT_KEYS.items():
        assert fields <= set(report[key]), f"report[{key!r}] lacks {fields - set(report[key])}"
    assert report["latency"]["runtime"] == "litert" and report["latency"]["p50_ms"] > 0
    assert report["recipe"][-1] == {"pass": "compile:tflite", "params": {"quantize": "int8", "float_io": False,
                                                                         "keep_io_layout": False,
                                                                         "sparse_min_zeros": 0.5}}
    assert {"ai-edge-litert", "flatbuffers"} <= set(report["tool_versions"])
    artifact = open_artifact(out)
    artifact.verify()
    assert set(artifact.manifest["files"]) == {"model.tflite", "golden.npz", "report.json"}
    # a device feeds the golden inputs (in the model's layout) and compares with the original outputs
    gin, gout = artifact.golden()
    assert gin["image"].shape == (8, 8, 8, 1)
    rt = LiteRtRuntime(out / "model.tflite")
    got = np.concatenate([rt.run_float({"image": gin["image"][i:i + 1]})["logits"] for i in range(8)])
    assert np.abs(got - gout["logits"]).max() <= artifact.manifest["golden"]["atol"]


def test_float_io_and_keep_io_layout(digits_models, tmp_path):
    out = _convert(digits_models, tmp_path / "fio", "cnn", "int8", "--float-io", "--keep-io-layout")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["io_transposes"] == {}
    assert manifest["inputs"][0] == {"name": "image", "shape": [1, 1, 8, 8], "dtype": "float32", "batch_axis": 0}
    assert manifest["outputs"][0]["dtype"] == "float32"
    ops = builtin_op_names(out / "model.tflite")
    assert ops[0] == "QUANTIZE" and ops[-1] == "DEQUANTIZE"  # integer inside, float at the edges
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"]["drop"] <= 1.0
    assert report["recipe"][-1]["params"]["float_io"] is True


@pytest.mark.parametrize("quantize,max_ratio,io_dtype", [
    ("int16x8", 0.32, "int16"), ("fp16", 0.52, "float32"), ("int8-dynamic", 0.30, "float32")])
def test_other_quantize_modes_on_the_weight_heavy_mlp(digits_models, tmp_path, quantize, max_ratio, io_dtype):
    fp32 = _convert(digits_models, tmp_path / "fp32", "mlp", "none")
    out = _convert(digits_models, tmp_path / quantize, "mlp", quantize)
    ratio = (out / "model.tflite").stat().st_size / (fp32 / "model.tflite").stat().st_size
    assert ratio <= max_ratio, ratio
    rt = LiteRtRuntime(out / "model.tflite")
    assert rt.inputs[0].dtype == io_dtype
    x, y = (np.load(digits_models["validation"])[k] for k in ("image", "labels"))
    acc_orig = (_ort_logits(digits_models["mlp"], x).argmax(1) == y).mean() * 100
    acc = (_litert_logits(out / "model.tflite", x, {}).argmax(1) == y).mean() * 100
    assert acc_orig - acc <= 1.0
    if quantize == "fp16":
        assert "DEQUANTIZE" in builtin_op_names(out / "model.tflite")


def test_int4_blockwise_on_the_1m_weight_mlp(digits_models, tmp_path):
    fp32 = _convert(digits_models, tmp_path / "fp32", "mlp-1m", "none")
    out = _convert(digits_models, tmp_path / "int4", "mlp-1m", "int4", "--int4-block-size", "64")
    ratio = (out / "model.tflite").stat().st_size / (fp32 / "model.tflite").stat().st_size
    assert ratio <= 0.20, ratio
    from edgeopt.converters.targets.tflite.flatbuffer import read_model, schema

    model = read_model((out / "model.tflite").read_bytes())
    weights = [t for t in model.subgraphs[0].tensors if t.type == schema().TensorType.INT4]
    assert len(weights) == 3 and all(t.quantization.details is not None for t in weights)  # block-wise scales
    x = np.load(digits_models["validation"])["image"]
    a = _ort_logits(digits_models["mlp-1m"], x).ravel()
    b = _litert_logits(out / "model.tflite", x, {}).ravel()
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= 0.99


def test_profile_default_recipe_is_tflite_int8(digits_models, tmp_path):
    out = tmp_path / "pi"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--profile", "raspberry-pi-4", "-q",
                  "--calibration", digits_models["calibration"], "--validation", digits_models["validation"])
    assert res.code == 0, res.err
    report = json.loads((out / "report.json").read_text())
    assert report["artifact"]["format"] == "tflite" and report["fit"]["ok"] is True
    assert report["recipe"][-1]["params"]["quantize"] == "int8"


def test_bench_runs_a_tflite_artifact(cnn_tflite):
    res = run_cli("bench", cnn_tflite["int8"], "--batch", "1,4", "--rounds", "1", "--min-round-time", "0.01",
                  "--json")
    assert res.code == 0, res.err
    rows = res.json()["results"]
    assert res.json()["runtime"] == "litert"
    assert rows[0]["batch"] == 1 and rows[0]["p50_ms"] > 0 and "fixed batch of 1" in rows[1]["skipped"]


def test_bench_runtime_params_reach_litert(cnn_tflite):
    res = run_cli("bench", cnn_tflite["none"], "--batch", "1", "--rounds", "1", "--min-round-time", "0.01",
                  "--runtime-param", "xnnpack=false", "--json")
    assert res.code == 0, res.err
    assert res.json()["runtime_params"]["xnnpack"] is False and res.json()["results"][0]["p50_ms"] > 0
    res = run_cli("bench", cnn_tflite["none"], "--runtime-param", "xnnpak=false")
    assert res.code == 2 and "unknown parameter 'xnnpak'" in res.err and "did you mean 'xnnpack'" in res.err


def test_batch_size_from_input_shape(digits_models, tmp_path):
    out = _convert(digits_models, tmp_path / "b4", "cnn", "none", "--input-shape", "image:4,1,8,8")
    rt = LiteRtRuntime(out / "model.tflite")
    assert rt.inputs[0].shape == (4, 8, 8, 1) and rt.fixed_batch == 4
    assert json.loads((out / "report.json").read_text())["parity"]["max_abs_err"] < 1e-4
