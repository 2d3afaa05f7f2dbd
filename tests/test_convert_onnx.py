"""`edgeopt convert --target onnx` on real models trained on the real digits data.

Accuracy and parity are recomputed here from the files the command wrote (ONNX Runtime on
model.onnx), not read back from the report alone.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeopt.artifact import open_artifact
from edgeopt.converters.targets.onnx import OnnxTarget
from edgeopt.profiles import load_profile

from conftest import run_cli
from onnx_models import chain, save

DESIGN_REPORT_KEYS = {
    "source": {"path", "sha256", "size_bytes", "params"},
    "artifact": {"path", "format", "sha256", "size_bytes"},
    "parity": {"max_abs_err", "mean_abs_err", "cosine", "top1_agreement"},
    "accuracy": {"metric", "original", "converted", "drop"},
    "latency": {"runtime", "batch", "threads", "p50_ms", "p95_ms", "p99_ms", "throughput_per_s"},
    "fit": {"profile", "model_bytes", "peak_memory_bytes", "ram_budget_bytes", "storage_budget_bytes", "ok"},
}


def _ort_logits(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _convert(models, tmp_path, kind, quantize, *extra):
    out = tmp_path / f"{kind}-{quantize}"
    res = run_cli("convert", models[kind], "-o", out, "--target", "onnx", "--quantize", quantize,
                  "--calibration", models["calibration"], "--validation", models["validation"], "-q", *extra)
    assert res.code == 0, res.err
    return out, res


@pytest.fixture(scope="module")
def cnn_int8(digits_models, tmp_path_factory):
    out, res = _convert(digits_models, tmp_path_factory.mktemp("cnn"), "cnn", "int8", "--profile", "raspberry-pi-4")
    return out, res


def test_int8_digits_cnn_keeps_accuracy_on_held_out_split(cnn_int8, digits_models):
    out, _ = cnn_int8
    val = np.load(digits_models["validation"])
    x, y = val["image"], val["labels"]
    original = _ort_logits(digits_models["cnn"], x)
    converted = _ort_logits(out / "model.onnx", x)
    acc_orig = (original.argmax(1) == y).mean() * 100
    acc_conv = (converted.argmax(1) == y).mean() * 100
    agreement = (original.argmax(1) == converted.argmax(1)).mean()
    assert acc_orig > 90, "the trained CNN should be a real classifier"
    assert acc_orig - acc_conv <= 1.0
    assert agreement >= 0.98
    # the model really is quantized: QDQ nodes around integer weights
    ops = {n.op_type for n in onnx.load(out / "model.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"]["drop"] == pytest.approx(acc_orig - acc_conv, abs=1e-6)
    assert report["parity"]["top1_agreement"] == pytest.approx(agreement)


def test_report_has_every_design_key_and_manifest_hashes_every_file(cnn_int8):
    out, res = cnn_int8
    report = json.loads((out / "report.json").read_text())
    for key in ("recipe", "tool_versions", "duration_s"):
        assert key in report
    for key, fields in DESIGN_REPORT_KEYS.items():
        assert fields <= set(report[key]), f"report[{key!r}] lacks {fields - set(report[key])}"
    assert report["fit"]["profile"] == "raspberry-pi-4" and report["fit"]["ok"] is True
    assert report["latency"]["p50_ms"] > 0 and report["latency"]["throughput_per_s"] > 0
    assert [r["pass"] for r in report["recipe"]] == ["canonicalize", "quantize-int8", "compile:onnx"]

    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.onnx", "golden.npz", "report.json"}
    for pkg in ("onnx", "onnxruntime", "edgeopt"):
        assert manifest["tool_versions"][pkg]
    artifact = open_artifact(out)
    artifact.verify()  # every sha256 matches
    # golden vectors: inputs and the ORIGINAL model's outputs for them
    gin, gout = artifact.golden()
    assert len(gin["image"]) == manifest["golden"]["count"] == 8
    converted = _ort_logits(out / "model.onnx", gin["image"])
    assert np.abs(converted - gout["logits"]).max() <= manifest["golden"]["atol"]
    # the table shows the ratios the demo promises
    assert "size" in res.out and "accuracy" in res.out and "latency" in res.out


def test_tampered_artifact_is_detected(cnn_int8, tmp_path):
    import shutil

    from edgeopt.artifact import TamperedArtifact

    out, _ = cnn_int8
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(TamperedArtifact, match="model.onnx"):
        open_artifact(copy).verify()


def test_int8_weight_dominated_mlp_is_at_most_030x(digits_models, tmp_path):
    model = onnx.load(digits_models["mlp"])
    weights = sum(int(np.prod(i.dims)) for i in model.graph.initializer)
    assert weights >= 100_000
    out, _ = _convert(digits_models, tmp_path, "mlp", "int8")
    ratio = (out / "model.onnx").stat().st_size / digits_models["mlp"].stat().st_size
    assert ratio <= 0.30, ratio


def test_int4_matmul_heavy_mlp_is_at_most_020x_with_cosine_099(digits_models, tmp_path):
    model = onnx.load(digits_models["mlp-1m"])
    assert sum(int(np.prod(i.dims)) for i in model.graph.initializer) >= 1_000_000
    out, _ = _convert(digits_models, tmp_path, "mlp-1m", "int4")
    ratio = (out / "model.onnx").stat().st_size / digits_models["mlp-1m"].stat().st_size
    assert ratio <= 0.20, ratio
    ops = [n.op_type for n in onnx.load(out / "model.onnx").graph.node]
    assert ops.count("MatMulNBits") == 3
    x = np.load(digits_models["validation"])["image"]
    a, b = _ort_logits(digits_models["mlp-1m"], x).ravel(), _ort_logits(out / "model.onnx", x).ravel()
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= 0.99


def test_int4_qdq_format_uses_blocked_dequantize_linear(digits_models, tmp_path):
    from edgeopt.converters.passes import PassContext
    from edgeopt.converters.passes.quantize import QuantizeInt4

    model = onnx.load(digits_models["mlp-1m"])
    out = QuantizeInt4(format="qdq", block_size=64).apply(model, PassContext(workdir=tmp_path))
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 3
    assert all(any(a.name == "block_size" and a.i == 64 for a in n.attribute) for n in dq)
    onnx.save(out, tmp_path / "qdq.onnx")
    x = np.load(digits_models["validation"])["image"]
    a, b = _ort_logits(digits_models["mlp-1m"], x).ravel(), _ort_logits(tmp_path / "qdq.onnx", x).ravel()
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= 0.99


def test_fp16_keeps_float32_io_and_halves_weights(digits_models, tmp_path):
    out, _ = _convert(digits_models, tmp_path, "mlp", "fp16")
    model = onnx.load(out / "model.onnx")
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer if len(i.dims) == 2)
    ratio = (out / "model.onnx").stat().st_size / digits_models["mlp"].stat().st_size
    assert 0.45 <= ratio <= 0.55
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"]["drop"] <= 0.5


def test_fp16_io_on_request(digits_models, tmp_path):
    out, _ = _convert(digits_models, tmp_path, "mlp", "fp16", "--fp16-io")
    model = onnx.load(out / "model.onnx")
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_int8_dynamic_runs_and_is_smaller(digits_models, tmp_path):
    out, _ = _convert(digits_models, tmp_path, "mlp", "int8-dynamic")
    ops = {n.op_type for n in onnx.load(out / "model.onnx").graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeLinear" in ops
    assert (out / "model.onnx").stat().st_size < 0.35 * digits_models["mlp"].stat().st_size
    assert json.loads((out / "report.json").read_text())["accuracy"]["drop"] <= 1.0


@pytest.mark.parametrize("arch, features, activation, reduce_range", [
    ("x86_64", ("sse4.2",), "uint8", True), ("x86_64", ("avx2", "avx512_vnni"), "uint8", False),
    ("x86_64", ("avx2", "avx_vnni"), "uint8", False), ("aarch64", ("neon", "dotprod"), "int8", None)])
def test_int8_weights_are_7_bit_on_x86_without_vnni(arch, features, activation, reduce_range):
    """x86's u8 x s8 multiply without VNNI (VPMADDUBSW) saturates 16-bit pair sums: 7-bit weights there."""
    board = replace(load_profile("x86-64-gateway"), arch=arch, cpu_features=features)
    settings = OnnxTarget(profile=board).pass_settings("quantize-int8")
    assert settings["activation_type"] == activation and settings.get("reduce_range") == reduce_range
    given = OnnxTarget(pass_params={"quantize-int8": {"reduce_range": False}}, profile=board)
    assert given.pass_settings("quantize-int8").get("reduce_range") in (False, None)  # what was given wins


def test_int8_activations_follow_the_board(digits_models, cnn_int8, tmp_path):
    """uint8 activations for an x86-64 board (ONNX Runtime's fast x86 kernels multiply u8 by s8), int8
    elsewhere; the recipe records which, and the graph holds it."""
    import onnx

    out, _ = _convert(digits_models, tmp_path, "cnn", "int8", "--profile", "x86-64-gateway")
    for art, want, elem in ((out, "uint8", onnx.TensorProto.UINT8), (cnn_int8[0], "int8", onnx.TensorProto.INT8)):
        report = json.loads((art / "report.json").read_text())
        step = next(r for r in report["recipe"] if r["pass"] == "quantize-int8")
        assert step["params"]["activation_type"] == want
        model = onnx.load(art / "model.onnx")
        zero_points = {i.name: i.data_type for i in model.graph.initializer}
        activations = [zero_points[n.input[2]] for n in model.graph.node
                       if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in zero_points]
        assert activations and set(activations) == {elem}


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_calibration_methods_are_selectable(digits_models, tmp_path, method):
    out, res = _convert(digits_models, tmp_path, "cnn", "int8", "--calibration-method", method, "--json")
    report = json.loads(res.out)  # stdout is the report alone: ONNX Runtime's calibrators print to it
    assert report == json.loads((out / "report.json").read_text())
    step = next(r for r in report["recipe"] if r["pass"] == "quantize-int8")
    assert step["params"]["calibration_method"] == method
    assert report["accuracy"]["drop"] <= 2.0


def test_accuracy_gate_fails_with_exit_1_and_keeps_the_artifact(digits_models, tmp_path):
    """Calibrating on blank images clips every real activation: a real, large accuracy drop (the gate
    alone: --no-mixed-precision, else the budget keeps the clipped layers float)."""
    blank = tmp_path / "blank.npz"
    np.savez(blank, image=np.zeros((32, 1, 8, 8), np.float32))
    out = tmp_path / "gated"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "--quantize", "int8",
                  "--calibration", blank, "--validation", digits_models["validation"],
                  "--max-accuracy-drop", "1.0", "--no-mixed-precision", "-q")
    assert res.code == 1, res.err
    assert "accuracy drop" in res.err and len(res.err.strip().splitlines()) == 1
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed"
    assert report["accuracy"]["drop"] > 1.0
    open_artifact(out).verify()


def test_fit_failure_on_a_small_board_exits_1(digits_models, tmp_path):
    board = tmp_path / "tiny-board.toml"
    board.write_text("""
name = "tiny-board"
description = "a board with 1 MiB for the model"
formats = ["onnx"]
[cpu]
arch = "aarch64"
cores = 1
[memory]
ram = "64 MiB"
storage = "8 MiB"
model_ram_budget = "1 MiB"
model_storage_budget = "1 MiB"
[default_recipe]
target = "onnx"
quantize = "none"
""")
    out = tmp_path / "nofit"
    res = run_cli("convert", digits_models["mlp-1m"], "-o", out, "--profile", board, "-q",
                  "--validation", digits_models["validation"])
    assert res.code == 1
    fit = json.loads((out / "report.json").read_text())["fit"]
    assert fit["ok"] is False and fit["model_bytes"] > fit["storage_budget_bytes"]
    assert "storage budget" in res.err
    # the same model quantized to int4 fits
    res = run_cli("convert", digits_models["mlp-1m"], "-o", tmp_path / "fits", "--profile", board, "-q",
                  "--quantize", "int4", "--validation", digits_models["validation"])
    assert res.code == 0, res.err


def test_without_data_validation_uses_generated_inputs_and_says_so(digits_models, tmp_path):
    out = tmp_path / "gen"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "--json", "-q")
    assert res.code == 0, res.err
    report = res.json()
    assert "generated" in report["validation"]["source"]
    assert report["accuracy"]["metric"] is None
    assert report["parity"]["max_abs_err"] < 1e-4  # float model: canonicalisation changes no numbers


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_an_original_with_a_fixed_batch_of_1_is_validated_one_sample_per_call(tmp_path, target):
    """Models exported with batch 1 baked in are common: the original is run a sample at a time, on
    every validation sample (not just the first), for generated and for given data."""
    model = save(chain([6, 8, 3]), tmp_path / "b1.onnx")
    x = np.random.default_rng(1).standard_normal((10, 6)).astype(np.float32)
    np.savez(tmp_path / "val.npz", x=x)
    for data, samples in ([], 64), (["--validation", tmp_path / "val.npz"], 10):
        res = run_cli("convert", model, "-o", tmp_path / f"{target}-{samples}", "--target", target, "--json", "-q", *data)
        assert res.code == 0, res.err
        report = res.json()
        assert report["validation"]["samples"] == samples
        assert report["parity"]["max_abs_err"] < 1e-4 * report["parity"]["outputs"]["y"]["output_scale"]


def test_force_replaces_an_existing_artifact(digits_models, tmp_path):
    out = tmp_path / "art"
    assert run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "-q").code == 0
    first = (out / "manifest.json").read_text()
    assert run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "-q", "--force",
                   "--version", "2").code == 0
    assert json.loads((out / "manifest.json").read_text())["version"] == "2" != json.loads(first)["version"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temp or old directories left


def test_a_quantized_model_slower_than_float_gets_a_note():
    from edgeopt.converters.pipeline import _slower_note

    latency = {"runtime": "onnxruntime", "p50_ms": 1.88, "source_p50_ms": 1.19, "speedup_vs_source": 0.633}
    assert _slower_note("int8", latency) == (
        "--quantize int8 runs slower than the float original on this host: p50 1.88 ms on onnxruntime vs "
        "1.19 ms on onnxruntime (0.63x); the model is smaller, not faster — compare `edgeopt bench` on the board")
    assert _slower_note("none", latency) is None  # a float conversion is not about speed
    assert _slower_note("int8", {**latency, "speedup_vs_source": 2.8}) is None
    assert _slower_note("int8", {**latency, "speedup_vs_source": None}) is None  # not measured here


def test_validation_samples_caps_the_validation_set(digits_models, tmp_path):
    out, _ = _convert(digits_models, tmp_path, "cnn", "none", "--validation-samples", "10", "--json")
    report = json.loads((out / "report.json").read_text())
    assert report["validation"]["samples"] == 10
    assert report["validation"]["source"].endswith("samples (--validation-samples)")
    assert ", the first 10 of " in report["validation"]["source"]
    generated = run_cli("convert", digits_models["cnn"], "-o", tmp_path / "gen", "--target", "onnx",
                        "--validation-samples", "5", "-q", "--json")
    assert generated.code == 0, generated.err
    assert generated.json()["validation"]["samples"] == 5
    bad = run_cli("convert", digits_models["cnn"], "-o", tmp_path / "bad", "--validation-samples", "0")
    assert bad.code == 2 and "--validation-samples" in bad.err


@pytest.mark.parametrize("batch", [8, 1])
def test_int8_calibrates_a_model_fixed_to_a_batch(digits_models, tmp_path, batch):
    """--input-shape fixing the batch: ORT's calibration is fed that many samples per call (the last
    call padded), not one at a time (which ONNX Runtime refused with a raw INVALID_ARGUMENT)."""
    out, _ = _convert(digits_models, tmp_path, "cnn", "int8", "--input-shape", f"image:{batch},1,8,8")
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and report["accuracy"]["drop"] <= 2.0
    assert json.loads((out / "manifest.json").read_text())["inputs"][0]["shape"][0] == batch
