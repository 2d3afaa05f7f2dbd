"""Real architectures, exported from torch as users export them, through `edgeopt convert --target
tflite`: float parity with ONNX Runtime <= 1e-4 of the output scale on random inputs, only builtin
operators, and the layout work done at the edges (no transposes between convolutions)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edgeopt.converters.targets.tflite.flatbuffer import builtin_op_names, read_model, schema

from conftest import run_cli
from tflite_harness import Converted, litert_outputs, ort_outputs
from tflite_models import cnn1d, export, lstm_classifier, mobilenet_style, resnet_style

ARCHITECTURES = {
    "mobilenet": (mobilenet_style, (1, 3, 32, 32)),
    "resnet": (resnet_style, (1, 3, 32, 32)),
    "cnn1d": (cnn1d, (1, 6, 64)),
    "lstm": (lstm_classifier, (1, 20, 6)),
    "gru": (lambda: lstm_classifier(gru=True), (1, 20, 6)),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")
    return {name: (export(build(), root / f"{name}.onnx", shape), shape) for name, (build, shape) in
            ARCHITECTURES.items()}


def _convert(model_path, out, *extra):
    res = run_cli("convert", model_path, "-o", out, "--target", "tflite", "--json", "-q", *extra)
    assert res.code == 0, res.err
    manifest = json.loads((out / "manifest.json").read_text())
    return res.json(), Converted(out / "model.tflite", manifest["model"]["io_transposes"], None)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_float_parity_with_onnxruntime(exported, tmp_path, name):
    path, shape = exported[name]
    report, conv = _convert(path, tmp_path / "out")
    rng = np.random.default_rng(7)
    model = onnx.load(path)
    worst = 0.0
    for _ in range(4):
        feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
        ref = ort_outputs(model, feeds)["y"]
        got = litert_outputs(conv, feeds)["y"]
        worst = max(worst, float(np.abs(got - ref).max() / np.abs(ref).max()))
    assert worst <= 1e-4, worst
    assert report["parity"]["max_abs_err"] <= 1e-4 * max(o["output_scale"] for o in report["parity"]["outputs"].values())
    ops = builtin_op_names(conv.path)
    assert ops and not any(op.startswith("CUSTOM") for op in ops)
    if name in ("mobilenet", "resnet", "cnn1d"):
        # NCHW → NHWC once at the input; every conv, pool and elementwise op runs channels-last
        assert conv.io_transposes == {"x": [0, 2, 3, 1] if len(shape) == 4 else [0, 2, 1]}
        assert "TRANSPOSE" not in ops, ops
    if name == "mobilenet":
        assert {"DEPTHWISE_CONV_2D", "HARD_SWISH", "MEAN"} <= set(ops)
    if name == "cnn1d":
        assert "GELU" in ops  # torch's erf formulation is fused into the GELU builtin
    if name in ("lstm", "gru"):
        assert "UNIDIRECTIONAL_SEQUENCE_LSTM" not in ops and "FULLY_CONNECTED" in ops  # unrolled builtins


def float_activations(path) -> list[str]:
    """Names of the non-constant float tensors of a .tflite (none in a full-integer model)."""
    model = read_model(path.read_bytes())
    sub = model.subgraphs[0]
    floats = (schema().TensorType.FLOAT32, schema().TensorType.FLOAT16)
    def constant(t) -> bool:
        buf = model.buffers[t.buffer]
        return (buf.data is not None and len(buf.data) > 0) or buf.offset > 1

    return [t.name for t in sub.tensors if t.type in floats and not constant(t)]


def test_sensor_model_manifest_describes_the_windows_the_tflite_model_takes(exported, tmp_path):
    """A 1-D CNN over [N, C, T] windows takes [N, T, C] as a .tflite: the manifest's preprocessing says
    channels_last, so the device agent cuts windows the way the converted model wants them."""
    from edgeopt.agent.windowing import Preprocessing

    path, _ = exported["cnn1d"]
    _convert(path, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [1, 64, 6]
    assert manifest["preprocessing"]["layout"] == "channels_last" and manifest["preprocessing"]["window"] == 64
    pre = Preprocessing.from_manifest(manifest, tuple(manifest["inputs"][0]["shape"][1:]))
    assert (pre.window, pre.channels, pre.channels_first) == (64, 6, False)
    keep = tmp_path / "keep"
    _convert(path, keep, "--keep-io-layout")
    assert json.loads((keep / "manifest.json").read_text())["preprocessing"]["layout"] == "channels_first"


@pytest.mark.parametrize("name", ["mobilenet", "cnn1d", "lstm"])
def test_full_integer_int8_converts_and_tracks_the_float_model(exported, tmp_path, name):
    path, shape = exported[name]
    rng = np.random.default_rng(3)
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=rng.standard_normal((64, *shape[1:])).astype(np.float32))
    report, conv = _convert(path, tmp_path / "int8", "--quantize", "int8", "--calibration", cal)
    assert float_activations(conv.path) == []  # integer end to end, int8 in and out (TFLite Micro's subset)
    assert report["parity"]["cosine"] >= 0.98, report["parity"]
    if name == "mobilenet":  # hardswish as ADD/RELU6 + MULs: XNNPACK has no integer HARD_SWISH kernel
        assert "HARD_SWISH" not in builtin_op_names(conv.path)
