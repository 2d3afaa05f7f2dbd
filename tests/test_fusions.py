"""Graph fusions (converters/passes/fusions.py): each rewrite computes what the graph computed, and
leaves alone what it cannot fold exactly."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.converters.passes.fusions import fold_affine_into_conv, fold_conv_affine, fuse_hardswish

RNG = np.random.default_rng(0)


def _model(nodes, inits, opset=13, out_shape=("n", "c", "h", "w"), outputs=("y",)):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, out_shape) for o in outputs],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _same(before, after):
    onnx.checker.check_model(after)
    x = RNG.uniform(-5, 5, (1, 4, 6, 6)).astype(np.float32)
    a = ort.InferenceSession(before.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    b = ort.InferenceSession(after.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)


def _copy(model):
    return onnx.ModelProto.FromString(model.SerializeToString())


CONV = {"W": RNG.standard_normal((8, 4, 3, 3)), "B": RNG.standard_normal(8)}


def test_per_channel_mul_and_add_after_a_conv_fold_into_it():
    model = _model([helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
                    helper.make_node("Mul", ["s", "c"], ["m"]),
                    helper.make_node("Add", ["m", "b"], ["y"])],
                   {**CONV, "s": [1.7], "b": RNG.standard_normal((8, 1, 1))})
    fused = _copy(model)
    assert fold_conv_affine(fused) == 2
    assert [n.op_type for n in fused.graph.node] == ["Conv"] and fused.graph.node[0].output[0] == "y"
    _same(model, fused)


def test_a_conv_output_used_twice_or_a_non_channel_constant_is_left_alone():
    shared = _model([helper.make_node("Conv", ["x", "W", "B"], ["c"]), helper.make_node("Mul", ["c", "s"], ["y"]),
                     helper.make_node("Relu", ["c"], ["z"])], {**CONV, "s": [2.0]}, outputs=("y", "z"))
    spatial = _model([helper.make_node("Conv", ["x", "W", "B"], ["c"]), helper.make_node("Mul", ["c", "s"], ["y"])],
                     {**CONV, "s": RNG.standard_normal((1, 1, 4, 4))})
    for model in (shared, spatial):
        fused = _copy(model)
        assert fold_conv_affine(fused) == 0 and fused == model


@pytest.mark.parametrize("spelling", ["div-after", "mul-after", "scaled-gate"])
@pytest.mark.parametrize("opset", [13, 14])
def test_spelled_out_hard_swish_becomes_one_op(spelling, opset):
    gate = [helper.make_node("Add", ["x", "three"], ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["r"])]
    if spelling == "div-after":
        tail = [helper.make_node("Mul", ["x", "r"], ["p"]), helper.make_node("Div", ["p", "six"], ["y"])]
    elif spelling == "mul-after":
        tail = [helper.make_node("Mul", ["r", "x"], ["p"]), helper.make_node("Mul", ["p", "sixth"], ["y"])]
    else:
        tail = [helper.make_node("Div", ["r", "six"], ["g"]), helper.make_node("Mul", ["x", "g"], ["y"])]
    model = _model(gate + tail, {"three": 3.0, "zero": 0.0, "six": 6.0, "sixth": 1 / 6}, opset=opset)
    fused = _copy(model)
    assert fuse_hardswish(fused) == 1
    want = ["HardSwish"] if opset >= 14 else ["HardSigmoid", "Mul"]
    assert [n.op_type for n in fused.graph.node] == want
    _same(model, fused)


def test_a_clip_that_is_not_relu6_is_not_hard_swish():
    model = _model([helper.make_node("Add", ["x", "three"], ["a"]), helper.make_node("Clip", ["a", "zero", "five"], ["r"]),
                    helper.make_node("Mul", ["x", "r"], ["p"]), helper.make_node("Div", ["p", "six"], ["y"])],
                   {"three": 3.0, "zero": 0.0, "five": 5.0, "six": 6.0})
    assert fuse_hardswish(_copy(model)) == 0


@pytest.mark.parametrize("group", [1, 2])
def test_an_affine_before_unpadded_convs_folds_into_them(group):
    w = RNG.standard_normal((6, 4 // group, 1, 1))
    model = _model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "s"], ["m"]),
                    helper.make_node("Add", ["m", "b"], ["a"]),
                    helper.make_node("Conv", ["a", "W1"], ["y"], group=group),
                    helper.make_node("Conv", ["a", "W2", "B2"], ["z"], group=group)],
                   {"s": RNG.standard_normal((4, 1, 1)), "b": [0.3], "W1": w, "W2": w * 2, "B2": np.ones(6)},
                   outputs=("y", "z"))
    fused = _copy(model)
    assert fold_affine_into_conv(fused) == 2
    assert [n.op_type for n in fused.graph.node] == ["Relu", "Conv", "Conv"]
    _same(model, fused)


def test_a_shift_before_a_padded_conv_stays_a_scale_alone_folds():
    shift = _model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "b"], ["a"]),
                    helper.make_node("Conv", ["a", "W", "B"], ["y"], pads=[1, 1, 1, 1])], {**CONV, "b": [0.5]})
    assert fold_affine_into_conv(_copy(shift)) == 0
    scale = _model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "s"], ["a"]),
                    helper.make_node("Conv", ["a", "W", "B"], ["y"], pads=[1, 1, 1, 1])],
                   {**CONV, "s": RNG.standard_normal((1, 4, 1, 1))})
    fused = _copy(scale)
    assert fold_affine_into_conv(fused) == 1
    _same(scale, fused)


def test_canonicalize_reports_its_fusions_and_no_simplify_skips_them(tmp_path):
    from edgeopt.converters.passes import PassContext, get_pass

    model = _model([helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
                    helper.make_node("Mul", ["c", "s"], ["m"]), helper.make_node("Add", ["m", "three"], ["a"]),
                    helper.make_node("Clip", ["a", "zero", "six"], ["r"]), helper.make_node("Mul", ["m", "r"], ["p"]),
                    helper.make_node("Div", ["p", "six"], ["y"])],
                   {**CONV, "s": [0.5], "three": 3.0, "zero": 0.0, "six": 6.0})
    ctx = PassContext(workdir=tmp_path)
    fused = get_pass("canonicalize")().apply(model, ctx)
    assert ctx.details["canonicalize"]["fusions"] == {"conv_affine": 1, "hardswish": 1}
    assert [n.op_type for n in fused.graph.node] == ["Conv", "HardSigmoid", "Mul"]
    _same(model, fused)
    ctx = PassContext(workdir=tmp_path)
    plain = get_pass("canonicalize")(simplify=False).apply(model, ctx)
    assert ctx.details["canonicalize"]["fusions"] == {} and len(plain.graph.node) == len(model.graph.node)
