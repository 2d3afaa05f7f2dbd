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


def misdeclared_output() -> onnx.ModelProto:
    """The shape of a CRNN head (ddddocr's common.onnx): x [1, 3, 5] → [T=5, 1, 3] → MatMul → Reshape
    to [T, 1, -1] computed from Shape/Gather/Concat — but the graph declares the output [1, 'seqlen'].
    onnxslim trusts the declaration and folds the Reshape target to [1, 20]: output (1, 20), not (5, 1, 4)."""
    rng = np.random.default_rng(0)
    nodes = [h.make_node("Transpose", ["x"], ["t"], perm=[2, 0, 1]),
             h.make_node("Shape", ["t"], ["s"]),
             h.make_node("Gather", ["s", "i0"], ["d0"], axis=0),
             h.make_node("Gather", ["s", "i1"], ["d1"], axis=0),
             h.make_node("Reshape", ["t", "flat"], ["f"]),
             h.make_node("MatMul", ["f", "w"], ["m"], name="head"),
             h.make_node("Unsqueeze", ["d0", "ax"], ["u0"]),
             h.make_node("Unsqueeze", ["d1", "ax"], ["u1"]),
             h.make_node("Concat", ["u0", "u1", "rest"], ["shape"], axis=0),
             h.make_node("Reshape", ["m", "shape"], ["y"], name="out_reshape")]
    inits = [numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(0, np.int64), "i0"),
             numpy_helper.from_array(np.array(1, np.int64), "i1"),
             numpy_helper.from_array(np.array([-1, 3], np.int64), "flat"),
             numpy_helper.from_array(np.array([0], np.int64), "ax"),
             numpy_helper.from_array(np.array([-1], np.int64), "rest")]
    graph = h.make_graph(nodes, "crnn_head", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 5])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, "seqlen"])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], ir_version=8)


def conv_classifier(opset: int = 11) -> onnx.ModelProto:
    """x [N, 3, 8, 8] → Conv 3→8 → Relu → GlobalAveragePool → Flatten → Gemm → y [N, 4], at an old opset."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "cw"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "cb"),
             numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "gw"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "gb")]
    nodes = [h.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             h.make_node("Relu", ["c"], ["r"], name="relu"),
             h.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             h.make_node("Flatten", ["p"], ["f"], name="flatten"),
             h.make_node("Gemm", ["f", "gw", "gb"], ["y"], transB=1, name="fc")]
    graph = h.make_graph(nodes, "conv_classifier", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=7)


def lstm_sequence(opset: int = 12, steps: int = 6, features: int = 3, hidden: int = 5) -> onnx.ModelProto:
    """x [T, 1, F] (time-major, as exported by CRNNs) → LSTM → Y [T, 1, 1, H], at an old opset."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, features)).astype(np.float32) * 0.5, "W"),
             numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32) * 0.5, "R"),
             numpy_helper.from_array(rng.standard_normal((1, 8 * hidden)).astype(np.float32) * 0.1, "B")]
    nodes = [h.make_node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=hidden, name="lstm")]
    graph = h.make_graph(nodes, "lstm_seq", [h.make_tensor_value_info("x", T.FLOAT, [steps, 1, features])],
                         [h.make_tensor_value_info("y", T.FLOAT, [steps, 1, 1, hidden])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=7)


def unupgradable() -> onnx.ModelProto:
    """An opset-11 graph onnx.version_converter cannot take to 13: an op with no ONNX schema."""
    graph = h.make_graph([h.make_node("Relu", ["x"], ["a"]), h.make_node("NoSuchOp", ["a"], ["y"], name="odd")],
                         "odd", [h.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, 4])])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 11)], ir_version=7)


def _rnn_weights(rng, gates: int, features: int, hidden: int, tag: str) -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(rng.standard_normal((1, gates * hidden, features)).astype(np.float32) * 0.4, f"W{tag}"),
            numpy_helper.from_array(rng.standard_normal((1, gates * hidden, hidden)).astype(np.float32) * 0.4, f"R{tag}"),
            numpy_helper.from_array(rng.standard_normal((1, 2 * gates * hidden)).astype(np.float32) * 0.1, f"B{tag}")]


def lstm_stateful(batch: int | str = "N", steps: int = 4, features: int = 3, hidden: int = 6,
                  classes: int = 3) -> onnx.ModelProto:
    """A streaming LSTM step: x [N, T, F], h and c [1, N, H] (batch on axis 1) → y [N, classes] from
    the last hidden state, hn and cn [1, N, H] (the state to feed the next step)."""
    rng = np.random.default_rng(5)
    inits = [*_rnn_weights(rng, 4, features, hidden, ""),
             numpy_helper.from_array(rng.standard_normal((hidden, classes)).astype(np.float32), "Wd"),
             numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0")]
    nodes = [h.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             h.make_node("LSTM", ["xt", "W", "R", "B", "", "h", "c"], ["", "hn", "cn"], hidden_size=hidden,
                         name="lstm"),
             h.make_node("Squeeze", ["hn", "axis0"], ["last"]),
             h.make_node("MatMul", ["last", "Wd"], ["y"], name="dense")]
    graph = h.make_graph(nodes, "lstm_stateful",
                         [h.make_tensor_value_info("x", T.FLOAT, [batch, steps, features]),
                          h.make_tensor_value_info("h", T.FLOAT, [1, batch, hidden]),
                          h.make_tensor_value_info("c", T.FLOAT, [1, batch, hidden])],
                         [h.make_tensor_value_info("y", T.FLOAT, [batch, classes]),
                          h.make_tensor_value_info("hn", T.FLOAT, [1, batch, hidden]),
                          h.make_tensor_value_info("cn", T.FLOAT, [1, batch, hidden])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], ir_version=8)


def gru_stateful(batch: int | str = 1, steps: int = 4, features: int = 3, hidden: int = 5) -> onnx.ModelProto:
    """Two stacked GRU layers with one state [2, N, H] (silero-vad's shape): x [N, T, F], state →
    y [N, H] (the top layer's last hidden state, through a sigmoid), stateN [2, N, H]. Fixed batch 1
    by default, as such models are usually exported."""
    rng = np.random.default_rng(6)
    inits = [*_rnn_weights(rng, 3, features, hidden, "1"), *_rnn_weights(rng, 3, hidden, hidden, "2"),
             numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1")]
    nodes = [h.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             h.make_node("Split", ["state"], ["s1", "s2"], axis=0),
             h.make_node("GRU", ["xt", "W1", "R1", "B1", "", "s1"], ["y1", "h1"], hidden_size=hidden,
                         linear_before_reset=1, name="gru1"),
             h.make_node("Squeeze", ["y1", "axis1"], ["y1s"]),
             h.make_node("GRU", ["y1s", "W2", "R2", "B2", "", "s2"], ["", "h2"], hidden_size=hidden,
                         linear_before_reset=1, name="gru2"),
             h.make_node("Concat", ["h1", "h2"], ["stateN"], axis=0),
             h.make_node("Squeeze", ["h2", "axis0"], ["last"]),
             h.make_node("Sigmoid", ["last"], ["y"])]
    graph = h.make_graph(nodes, "gru_stateful",
                         [h.make_tensor_value_info("x", T.FLOAT, [batch, steps, features]),
                          h.make_tensor_value_info("state", T.FLOAT, [2, batch, hidden])],
                         [h.make_tensor_value_info("y", T.FLOAT, [batch, hidden]),
                          h.make_tensor_value_info("stateN", T.FLOAT, [2, batch, hidden])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], ir_version=8)
