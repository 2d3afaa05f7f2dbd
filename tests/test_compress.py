"""`edgeopt convert` with compression: prune → distill → quantize → compile in one command, on the
real digits data (held-out split). Accuracies are recomputed from the files the command wrote.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from edgeopt import registry
from edgeopt.bench import BenchSettings, measure
from edgeopt.onnx_io import count_macs
from edgeopt.runtime import open_runtime, resolve_model_file, run_batched, runtime_for_format
from edgeopt.runtime.onnxruntime import OnnxRuntime

import compress_models
from conftest import run_cli

pytest.importorskip("torch")
EPOCHS = "30"


@pytest.fixture(scope="module")
def train_images(digits_split, tmp_path_factory):
    path = tmp_path_factory.mktemp("compress-data") / "train.npz"
    np.savez(path, image=digits_split.x_train)  # unlabelled
    return path


def _convert(digits_models, out, *args):
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "--validation",
                  digits_models["validation"], "--calibration", digits_models["calibration"], "-q", *args)
    assert res.code == 0, res.err
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def recipe(digits_models, train_images, tmp_path_factory):
    """The same prune + distill recipe twice: FP32, and then INT8 (same seed, so the same student)."""
    root = tmp_path_factory.mktemp("recipe")
    common = ("--prune-channels", "0.5", "--distill", train_images, "--epochs", EPOCHS, "--seed", "3")
    fp32 = _convert(digits_models, root / "fp32", *common, "--quantize", "none")
    int8 = _convert(digits_models, root / "int8", *common, "--quantize", "int8")
    return {"fp32": (root / "fp32", fp32), "int8": (root / "int8", int8)}


def _accuracy(path, split) -> float:
    rt = open_runtime(path)
    manifest = resolve_model_file(path)[2] or {}
    perm = manifest.get("model", {}).get("io_transposes", {}).get("image")  # e.g. NCHW → NHWC for tflite
    x = np.transpose(split.x_val, perm) if perm else split.x_val
    logits = run_batched(rt, {"image": x})[rt.outputs[0].name]
    return float((logits.argmax(1) == split.y_val).mean() * 100)


def test_prune_distill_int8_keeps_accuracy_on_held_out_digits(recipe, digits_models, digits_split):
    teacher = _accuracy(digits_models["cnn"], digits_split)
    distilled = _accuracy(recipe["fp32"][0], digits_split)
    int8 = _accuracy(recipe["int8"][0], digits_split)
    assert teacher > 95
    assert teacher - distilled <= 1.5
    assert teacher - int8 <= 2.0
    # the report says what the files say
    steps = {r["step"]: r for r in recipe["int8"][1]["steps"]}
    assert steps["canonicalize"]["accuracy"] == pytest.approx(teacher)
    assert steps["distill"]["accuracy"] == pytest.approx(distilled)  # same seed: the same student
    assert recipe["int8"][1]["accuracy"]["converted"] == pytest.approx(int8)
    assert steps["prune-structured"]["accuracy"] < teacher - 10  # pruning alone loses accuracy


def test_each_step_is_a_report_row_with_size_params_macs_accuracy_latency(recipe):
    report = recipe["int8"][1]
    rows = [r for r in report["steps"] if "macs" in r]
    assert [r["step"] for r in rows] == ["canonicalize", "prune-structured", "distill", "compile"]
    for r in rows:
        for key in ("size_bytes", "params", "macs", "accuracy", "top1_agreement", "latency_p50_ms", "seconds"):
            assert r[key] is not None, (r["step"], key)
    canon, pruned, distilled, compiled = rows
    assert pruned["params"] == distilled["params"] == compiled["params"] < canon["params"] / 3
    assert compiled["size_bytes"] < distilled["size_bytes"]  # INT8
    assert [r["pass"] for r in report["recipe"]] == [
        "canonicalize", "prune-structured", "distill", "quantize-int8", "compile:onnx"]
    assert report["artifact"]["macs"] == compiled["macs"] and report["source"]["macs"] == canon["macs"]
    details = report["pass_details"]
    assert details["distill"]["labels_used"] is False and details["distill"]["seed"] == 3
    assert details["prune-structured"]["skipped"] == {"/13/Gemm": "reaches the model output 'logits'"}


def test_structured_pruning_cuts_macs_and_onnx_runtime_latency(recipe, digits_models, digits_split):
    pruned_path = recipe["fp32"][0] / "model.onnx"
    macs_before = count_macs(onnx.load(str(digits_models["cnn"])))
    macs_after = count_macs(onnx.load(str(pruned_path)))
    assert macs_before / macs_after >= 1.8
    # latency: both models measured interleaved in one run (batch 32, 1 thread): a ratio, not a time limit
    x = {"image": digits_split.x_val[:32]}
    original, pruned = measure([OnnxRuntime(digits_models["cnn"], threads=1), OnnxRuntime(pruned_path, threads=1)],
                               [x, x], BenchSettings(rounds=7, min_round_time=0.02))
    assert pruned.p50_ms < original.p50_ms


def test_int8_tflite_keeps_the_distilled_accuracy(recipe, digits_models, digits_split, train_images, tmp_path):
    if "tflite" not in registry.names(registry.TARGETS):
        pytest.skip("tflite target not registered (branch not merged)")
    out = tmp_path / "tflite"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "tflite", "--quantize", "int8",
                  "--calibration", digits_models["calibration"], "--validation", digits_models["validation"],
                  "--prune-channels", "0.5", "--distill", train_images, "--epochs", EPOCHS, "--seed", "3", "-q")
    assert res.code == 0, res.err
    assert _accuracy(digits_models["cnn"], digits_split) - _accuracy(out, digits_split) <= 2.0


@pytest.fixture(scope="module")
def dependency_nets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dep-nets")
    return {kind: compress_models.make(kind, root) for kind in ("resnet", "concat")}


@pytest.mark.parametrize("target", registry.names(registry.TARGETS))
@pytest.mark.parametrize("kind", ["resnet", "concat"])
def test_residual_and_concat_nets_prune_and_run_in_every_target(dependency_nets, digits_models, tmp_path, kind,
                                                                 target):
    out = tmp_path / f"{kind}-{target}"
    res = run_cli("convert", dependency_nets[kind], "-o", out, "--target", target, "--prune-channels", "0.5",
                  "--validation", digits_models["validation"], "--json", "-q")
    assert res.code == 0, res.err
    report = res.json()
    assert report["artifact"]["macs"] < report["source"]["macs"] / 3
    # the pipeline ran the compiled model on the validation set with the target's runtime, or says
    # why it could not (Core ML prediction off macOS)
    unavailable = runtime_for_format(report["artifact"]["format"]).unavailable_reason()
    assert report["validation"]["samples"] == 449
    assert report["parity"]["finite"] if unavailable is None else any(unavailable in n for n in report["notes"])
    if report["artifact"]["format"] == "onnx":
        model = onnx.load(str(out / "model.onnx"))
        onnx.checker.check_model(model, full_check=True)
        sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        assert sess.run(None, {"image": np.zeros((3, 1, 8, 8), np.float32)})[0].shape == (3, 10)


def test_unstructured_sparsity_in_the_report_is_in_the_saved_weights(digits_models, tmp_path):
    report = _convert(digits_models, tmp_path / "sparse", "--prune-sparsity", "0.8")
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "sparse" / "model.onnx")).graph.initializer}
    details = report["pass_details"]["prune-unstructured"]
    assert set(details["layers"]) == {"/3/Conv", "/7/Conv", "/10/Gemm"}
    for layer in details["layers"].values():
        w = weights[layer["weight"]]
        zeros = int((w == 0).sum())
        assert layer["zeros"] == zeros and layer["params"] == w.size
        assert layer["sparsity"] == pytest.approx(zeros / w.size)
    assert details["sparsity"] == pytest.approx(0.8, abs=1e-3)
    rows = {r["step"]: r for r in report["steps"]}
    assert rows["prune-unstructured"]["params"] == rows["canonicalize"]["params"]  # same shapes, zeros inside


def _mlp_student(outputs: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((64, 48)) * np.sqrt(2 / 64)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(np.zeros(48, np.float32), "b1")
    w2 = numpy_helper.from_array((rng.standard_normal((48, outputs)) * np.sqrt(1 / 48)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(np.zeros(outputs, np.float32), "b2")
    nodes = [h.make_node("Flatten", ["image"], ["f"], name="flatten"),
             h.make_node("Gemm", ["f", "w1", "b1"], ["hid"], name="fc1"),
             h.make_node("Relu", ["hid"], ["r"], name="relu"),
             h.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2")]
    graph = h.make_graph(nodes, "mlp_student", [h.make_tensor_value_info("image", T.FLOAT, ["N", 1, 8, 8])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", outputs])], initializer=[w1, b1, w2, b2])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_a_given_student_architecture_is_trained(digits_models, digits_split, train_images, tmp_path):
    student = tmp_path / "student.onnx"
    onnx.save(_mlp_student(10), str(student))
    report = _convert(digits_models, tmp_path / "mlp", "--distill", train_images, "--student", student,
                      "--epochs", "20")
    assert report["pass_details"]["distill"]["student"] == str(student)
    assert report["artifact"]["params"] == 64 * 48 + 48 + 48 * 10 + 10
    assert _accuracy(tmp_path / "mlp", digits_split) > 90  # from random weights, on unlabelled data


# -- bad input -----------------------------------------------------------------------------------
def _rejected(digits_models, tmp_path, *args):
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "-q", *args)
    assert res.code == 2, res.err
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing partial left behind
    lines = [ln for ln in res.err.strip().splitlines() if ln.startswith("edgeopt: error") or "Error" in ln]
    assert len(lines) == 1 and "Traceback" not in res.err, res.err
    return res.err


def test_distill_without_torch_says_how_to_install(digits_models, train_images, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # what an install without the 'train' extra looks like
    err = _rejected(digits_models, tmp_path, "--prune-channels", "0.5", "--distill", train_images)
    assert "distillation (--distill) needs the Python package 'torch'" in err
    assert "pip install 'edgeopt[train]'" in err


def test_pruning_ratio_out_of_range(digits_models, tmp_path):
    err = _rejected(digits_models, tmp_path, "--prune-channels", "1.5")
    assert "--prune-channels" in err and "1.5" in err
    err = _rejected(digits_models, tmp_path, "--prune-sparsity", "-0.1")
    assert "--prune-sparsity" in err
    err = _rejected(digits_models, tmp_path, "--prune-channels", "0.5", "--prune-layer", "/3/Conv=2")
    assert "--prune-layer '/3/Conv=2'" in err
    err = _rejected(digits_models, tmp_path, "--prune-channels", "0.5", "--prune-layer", "/3/conv=0.2")
    assert "no prunable layer named '/3/conv' (did you mean '/3/Conv'?)" in err


def test_conflicting_or_incomplete_compression_flags(digits_models, tmp_path, train_images):
    assert "exclude each other" in _rejected(digits_models, tmp_path, "--prune-sparsity", "0.5",
                                             "--prune-channels", "0.5")
    assert "--epochs applies to distillation: add --distill DATA" in _rejected(digits_models, tmp_path,
                                                                             "--epochs", "3")
    assert "--distill trains a smaller student: add --prune-channels" in _rejected(
        digits_models, tmp_path, "--distill", train_images)
    assert "distillation data not found" in _rejected(digits_models, tmp_path, "--prune-channels", "0.5",
                                                      "--distill", tmp_path / "nope.npz")


def test_student_with_other_output_shape_is_rejected(digits_models, train_images, tmp_path):
    student = tmp_path / "student5.onnx"
    onnx.save(_mlp_student(5), str(student))
    err = _rejected(digits_models, tmp_path, "--distill", train_images, "--student", student)
    assert f"student {student}: output 'y' has shape [N, 5], the teacher's 'logits' has [N, 10]" in err
