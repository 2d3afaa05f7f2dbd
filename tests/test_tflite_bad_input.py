"""Bad input to `edgeopt convert --target tflite`: a one-line error naming the culprit, exit 2, and
nothing left in the output location."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper
from test_bad_input import _assert_clean_failure

from conftest import run_cli
from onnx_models import dynamic_dims, save, with_custom_op


def _unsupported_ops_model() -> onnx.ModelProto:
    """Relu → Cos (no TFLite lowering) → Pad in 'edge' mode (an attribute outside the set) → Relu."""
    nodes = [h.make_node("Relu", ["x"], ["a"], name="relu_in"),
             h.make_node("Cos", ["a"], ["b"], name="cosine_1"),
             h.make_node("Pad", ["b", "pads"], ["c"], name="edge_pad", mode="edge"),
             h.make_node("Relu", ["c"], ["y"], name="relu_out")]
    graph = h.make_graph(nodes, "unsupported", [h.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, 6])],
                         initializer=[numpy_helper.from_array(np.array([0, 1, 0, 1], np.int64), "pads")])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_unsupported_ops_are_named_with_their_nodes_before_anything_is_written(tmp_path):
    model = save(_unsupported_ops_model(), tmp_path / "m.onnx")
    out = tmp_path / "out"
    res = run_cli("convert", model, "-o", out, "--target", "tflite")
    _assert_clean_failure(res, tmp_path, out, "target 'tflite' does not support", "Cos (node 'cosine_1')",
                          "Pad[mode=edge] (node 'edge_pad')")
    assert "relu" not in res.err


def test_custom_domain_op_is_named(tmp_path):
    model = save(with_custom_op(), tmp_path / "custom.onnx")
    out = tmp_path / "out"
    res = run_cli("convert", model, "-o", out, "--target", "tflite")
    _assert_clean_failure(res, tmp_path, out, "com.example:FancyOp", "fancy_1")


def test_inspect_lists_what_tflite_cannot_compile(tmp_path):
    model = save(_unsupported_ops_model(), tmp_path / "m.onnx")
    info = run_cli("inspect", model, "--json").json()
    assert info["targets"]["tflite"] == {"supported": False, "unsupported": {
        "Cos": ["cosine_1"], "Pad[mode=edge]": ["edge_pad"]}}


def test_dynamic_dim_left_unresolved_says_which_input_and_suggests_input_shape(tmp_path):
    model = save(dynamic_dims(), tmp_path / "dyn.onnx")
    out = tmp_path / "out"
    res = run_cli("convert", model, "-o", out, "--target", "tflite")
    _assert_clean_failure(res, tmp_path, out, "input 'x'", "--input-shape x:N,3,")
    res = run_cli("convert", model, "-o", out, "--target", "tflite", "--input-shape", "x:1,3,16", "-q")
    assert res.code == 0, res.err


def test_calibration_set_too_small(digits_models, tmp_path):
    cal = tmp_path / "cal.npz"
    np.savez(cal, image=np.zeros((5, 1, 8, 8), np.float32))
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "tflite", "--quantize", "int8",
                  "--calibration", cal)
    _assert_clean_failure(res, tmp_path, out, "cal.npz", "5 samples", "at least 16")


def test_calibration_set_of_the_wrong_shape(digits_models, tmp_path):
    cal = tmp_path / "cal.npz"
    np.savez(cal, image=np.zeros((32, 1, 9, 9), np.float32))
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "tflite", "--quantize", "int16x8",
                  "--calibration", cal)
    _assert_clean_failure(res, tmp_path, out, "cal.npz", "'image'", "[32, 1, 9, 9]", "[N, 1, 8, 8]")


def test_full_integer_without_calibration_data(digits_models, tmp_path):
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "tflite", "--quantize", "int8")
    _assert_clean_failure(res, tmp_path, out, "--quantize int8 needs calibration data", "--calibration")


def test_op_the_full_integer_quantizer_cannot_take_is_named(tmp_path):
    """Erf lowers to float builtins (ABS, EXP, DIV, SIGN...) that LiteRT's quantizer has no integer form for."""
    graph = h.make_graph([h.make_node("Erf", ["x"], ["y"], name="erf_1")], "erf",
                         [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", 8])])
    model = save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), tmp_path / "erf.onnx")
    cal = tmp_path / "cal.npy"
    np.save(cal, np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32))
    out = tmp_path / "out"
    res = run_cli("convert", model, "-o", out, "--target", "tflite", "--quantize", "int8", "--calibration", cal)
    _assert_clean_failure(res, tmp_path, out, "Erf[int8 full-integer quantization] (node 'erf_1')")
    # the float and dynamic-range modes convert it
    res = run_cli("convert", model, "-o", out, "--target", "tflite", "--quantize", "fp16", "-q")
    assert res.code == 0, res.err


def test_int4_block_size_litert_does_not_have(digits_models, tmp_path):
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["mlp"], "-o", out, "--target", "tflite", "--quantize", "int4",
                  "--int4-block-size", "16")
    _assert_clean_failure(res, tmp_path, out, "--int4-block-size 16", "32, 64, 128, 256")


def test_target_flags_of_tflite_are_refused_for_other_targets(digits_models, tmp_path):
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "--float-io")
    _assert_clean_failure(res, tmp_path, out, "--float-io applies to target tflite, not onnx")


def test_model_over_2_gib_is_refused_before_loading(tmp_path, monkeypatch):
    """A 2.2 GB weight in external data (a sparse file: nothing is really written or read)."""
    n = 550_000_000  # float32 → 2.2e9 bytes
    weight = T()
    weight.name, weight.data_type = "w", T.FLOAT
    weight.dims.extend([n])
    weight.data_location = T.EXTERNAL
    for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", str(4 * n))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = h.make_graph([h.make_node("Add", ["x", "w"], ["y"], name="add")], "huge",
                         [h.make_tensor_value_info("x", T.FLOAT, [n])], [h.make_tensor_value_info("y", T.FLOAT, [n])],
                         initializer=[weight])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), tmp_path / "huge.onnx")
    with open(tmp_path / "weights.bin", "wb") as f:
        f.truncate(4 * n)
    from edgeopt.converters import pipeline

    def must_not_load(*args, **kwargs):
        raise AssertionError("the 2 GB model was loaded before being refused")

    monkeypatch.setattr(pipeline, "load_model", must_not_load)
    out = tmp_path / "out"
    res = run_cli("convert", tmp_path / "huge.onnx", "-o", out, "--target", "tflite")
    _assert_clean_failure(res, tmp_path, out, "huge.onnx", "2.05 GiB", "target 'tflite'", "at most 2 GiB")
