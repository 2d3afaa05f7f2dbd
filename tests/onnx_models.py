"""Small ONNX graphs built by hand for unit tests (shapes, control flow, custom ops)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper


def save(model: onnx.ModelProto, path) -> str:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def if_on_sample_rate() -> onnx.ModelProto:
    """y = x * 2 if rate > 100 else x + 2; 'rate' is a scalar input (like a sample rate)."""
    out_type = [h.make_tensor_value_info("y_then", T.FLOAT, ["N", 4])]
    then_g = h.make_graph([h.make_node("Mul", ["x", "two"], ["y_then"])], "then", [], out_type)
    else_g = h.make_graph([h.make_node("Add", ["x", "two"], ["y_else"])], "else", [],
                          [h.make_tensor_value_info("y_else", T.FLOAT, ["N", 4])])
    nodes = [h.make_node("Greater", ["rate", "thr"], ["c"], name="rate_check"),
             h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="branch")]
    graph = h.make_graph(
        nodes, "if_rate",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 4]), h.make_tensor_value_info("rate", T.FLOAT, [])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])],
        initializer=[numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                     numpy_helper.from_array(np.array(100.0, np.float32), "thr")])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def with_custom_op() -> onnx.ModelProto:
    """Relu → com.example:FancyOp (node 'fancy_1') → Relu."""
    nodes = [h.make_node("Relu", ["x"], ["a"], name="relu_in"),
             h.make_node("FancyOp", ["a"], ["b"], name="fancy_1", domain="com.example"),
             h.make_node("Relu", ["b"], ["y"], name="relu_out")]
    graph = h.make_graph(nodes, "custom", [h.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, 4])])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.example", 1)])


def dynamic_dims() -> onnx.ModelProto:
    """Relu over x: [batch, channels, time] with time dynamic."""
    graph = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "dyn",
                         [h.make_tensor_value_info("x", T.FLOAT, ["batch", 3, "time"])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["batch", 3, "time"])])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def with_dropout_and_training_bn() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    c = 3
    inits = [numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), n)
             for n in ("scale", "bias", "mean")]
    inits.append(numpy_helper.from_array(np.abs(rng.standard_normal(c)).astype(np.float32) + 0.5, "var"))
    nodes = [h.make_node("Dropout", ["x"], ["d"], name="drop"),
             h.make_node("BatchNormalization", ["d", "scale", "bias", "mean", "var"], ["y"], name="bn"),
             h.make_node("Dropout", ["y"], ["z"], name="drop_out")]
    graph = h.make_graph(nodes, "train_nodes", [h.make_tensor_value_info("x", T.FLOAT, ["N", c, 4])],
                         [h.make_tensor_value_info("z", T.FLOAT, ["N", c, 4])], initializer=inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 15)])


def chain(sizes: list[int]) -> onnx.ModelProto:
    """x[1, s0] → MatMul → [1, s1] → MatMul → ... (for the activation liveness estimate)."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for i in range(len(sizes) - 1):
        w = f"w{i}"
        inits.append(numpy_helper.from_array(rng.standard_normal((sizes[i], sizes[i + 1])).astype(np.float32), w))
        nodes.append(h.make_node("MatMul", [f"t{i}" if i else "x", w], [f"t{i + 1}" if i < len(sizes) - 2 else "y"]))
    graph = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", T.FLOAT, [1, sizes[0]])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, sizes[-1]])], initializer=inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
