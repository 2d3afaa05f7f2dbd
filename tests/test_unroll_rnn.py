"""The unroll-rnn pass computes what ONNX Runtime's own LSTM/GRU kernels compute (checked on random
weights for every direction, layout and option the pass claims), and refuses what it does not cover."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.converters.passes import PassContext
from edgeopt.converters.passes.unroll_rnn import UnrollRnn
from edgeopt.errors import UnsupportedOpsError

S, B, IN, H = 7, 2, 3, 5  # steps, batch, input size, hidden size


def _rnn_model(op: str, direction="forward", layout=0, with_state=True, peephole=False, **attrs):
    rng = np.random.default_rng(0)
    gates = 4 if op == "LSTM" else 3
    d = 2 if direction == "bidirectional" else 1
    inits = [numpy_helper.from_array(rng.standard_normal((d, gates * H, IN)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((d, gates * H, H)).astype(np.float32), "R"),
             numpy_helper.from_array(rng.standard_normal((d, 2 * gates * H)).astype(np.float32), "B")]
    x_shape = [B, S, IN] if layout else [S, B, IN]
    state_shape = [B, d, H] if layout else [d, B, H]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    names = ["x", "W", "R", "B", ""]
    if with_state:
        inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, state_shape))
        names.append("h0")
        if op == "LSTM":
            inputs.append(helper.make_tensor_value_info("c0", TensorProto.FLOAT, state_shape))
            names.append("c0")
    if peephole:
        names += [""] * (7 - len(names)) + ["P"]
        inits.append(numpy_helper.from_array(rng.standard_normal((d, 3 * H)).astype(np.float32), "P"))
    outs = ["y", "y_h"] + (["y_c"] if op == "LSTM" else [])
    node = helper.make_node(op, names, outs, name="rnn_1", hidden_size=H, direction=direction, layout=layout, **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                                    for o in outs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(model):
    rng = np.random.default_rng(1)
    return {vi.name: rng.standard_normal([d.dim_value for d in vi.type.tensor_type.shape.dim]).astype(np.float32)
            for vi in model.graph.input}


@pytest.mark.parametrize("op,kwargs", [
    ("LSTM", {}),
    ("LSTM", {"direction": "reverse"}),
    ("LSTM", {"direction": "bidirectional"}),
    ("LSTM", {"with_state": False, "peephole": True}),
    ("GRU", {}),
    ("GRU", {"linear_before_reset": 1, "direction": "bidirectional"}),
    ("GRU", {"with_state": False, "linear_before_reset": 1}),
    ("GRU", {"with_state": False}),
])
def test_unrolled_graph_matches_onnx_runtime(op, kwargs, tmp_path):
    model = _rnn_model(op, **kwargs)
    unrolled = UnrollRnn().apply(model, PassContext(workdir=tmp_path))
    assert op not in {n.op_type for n in unrolled.graph.node}
    feeds = _feeds(model)
    ref = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    got = ort.InferenceSession(unrolled.SerializeToString()).run(None, feeds)
    for a, b in zip(ref, got, strict=True):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-5


@pytest.mark.parametrize("attrs", [{"clip": 1.0}, {"layout": 1}, {"input_forget": 1}])
def test_unsupported_rnn_options_are_named(attrs, tmp_path):
    model = _rnn_model("LSTM", **attrs)
    with pytest.raises(UnsupportedOpsError, match="LSTM.*rnn_1"):
        UnrollRnn().apply(model, PassContext(workdir=tmp_path))


def test_model_without_rnn_is_returned_unchanged(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])]))
    assert UnrollRnn().apply(model, PassContext(workdir=tmp_path)).graph.node[0].op_type == "Relu"
    onnx.checker.check_model(model)
