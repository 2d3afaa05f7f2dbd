from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeopt.converters.passes import PassContext
from edgeopt.converters.passes.canonicalize import Canonicalize, parse_input_shape, parse_input_value
from edgeopt.errors import UserInputError
from edgeopt.onnx_io import input_specs

from conftest import run_cli
from onnx_models import dynamic_dims, if_on_sample_rate, save, with_dropout_and_training_bn


def _apply(model, tmp_path, **kw):
    ctx = PassContext(workdir=tmp_path)
    return Canonicalize(**kw).apply(model, ctx), ctx.details["canonicalize"]


def test_input_value_freezes_scalar_and_if_folds_away(tmp_path):
    model, details = _apply(if_on_sample_rate(), tmp_path, input_values={"rate": "16000"})
    assert [s.name for s in input_specs(model)] == ["x"]
    ops = [n.op_type for n in model.graph.node]
    assert "If" not in ops and "Greater" not in ops and ops == ["Mul"]
    assert details["frozen_inputs"] == {"rate": 16000.0}
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, x * 2)
    low, _ = _apply(if_on_sample_rate(), tmp_path, input_values={"rate": "50"})
    assert [n.op_type for n in low.graph.node] == ["Add"]


def test_convert_with_input_value_validates_against_the_original_fed_the_same_value(tmp_path):
    model = save(if_on_sample_rate(), tmp_path / "if.onnx")
    res = run_cli("convert", model, "-o", tmp_path / "out", "--target", "onnx", "--input-value", "rate=16000",
                  "--json", "-q")
    assert res.code == 0, res.err
    assert res.json()["parity"]["max_abs_err"] == 0.0


def test_input_shape_fixes_dynamic_dims(tmp_path):
    model, details = _apply(dynamic_dims(), tmp_path, input_shapes={"x": (2, 3, 16)})
    assert input_specs(model)[0].shape == (2, 3, 16)
    assert details["fixed_shapes"] == {"x": [2, 3, 16]}


def test_dynamic_batch_is_kept_but_other_dynamic_dims_are_refused(tmp_path):
    with pytest.raises(UserInputError, match=r"input 'x' has dynamic dim\(s\) \[2\].*--input-shape x:N,3,N"):
        _apply(dynamic_dims(), tmp_path)
    model, _ = _apply(dynamic_dims(), tmp_path, input_shapes={"x": (1, 3, 16)}, keep_dynamic_batch=False)
    assert not input_specs(model)[0].is_dynamic


@pytest.mark.parametrize("shapes,message", [
    ({"y": (1, 3, 4)}, "no input 'y'"),
    ({"x": (1, 3)}, "rank 3"),
    ({"x": (1, 4, 16)}, "dim 1 is fixed at 3"),
])
def test_bad_input_shapes(tmp_path, shapes, message):
    with pytest.raises(UserInputError, match=message):
        _apply(dynamic_dims(), tmp_path, input_shapes=shapes)


def test_bad_input_values(tmp_path):
    with pytest.raises(UserInputError, match="no input 'rat'.*did you mean 'rate'"):
        _apply(if_on_sample_rate(), tmp_path, input_values={"rat": "1"})
    with pytest.raises(UserInputError, match="not a valid float32"):
        _apply(if_on_sample_rate(), tmp_path, input_values={"rate": "fast"})
    with pytest.raises(UserInputError, match="dynamic shape"):
        _apply(if_on_sample_rate(), tmp_path, input_values={"x": "1"})


def test_training_only_nodes_are_removed(tmp_path):
    inference = with_dropout_and_training_bn()
    src = with_dropout_and_training_bn()
    src.graph.node[1].attribute.append(onnx.helper.make_attribute("training_mode", 1))
    model, details = _apply(src, tmp_path, simplify=False)
    assert [n.op_type for n in model.graph.node] == ["BatchNormalization", "Identity"]
    assert details["training_nodes_removed"] == 3  # two Dropouts and the training-mode BatchNormalization
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    ref = ort.InferenceSession(inference.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-6)


@pytest.mark.parametrize("batch", [2, "N"])
def test_a_dropout_mask_that_is_read_becomes_all_true(tmp_path, batch):
    """An inference-mode Dropout passes its input through and its mask is all true; removing the node
    must not leave the mask dangling when a node or the graph output reads it (a constant for a static
    shape, computed from the input's shape for a dynamic batch)."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])
    nodes = [helper.make_node("Dropout", ["x"], ["y", "mask"], name="drop"),
             helper.make_node("Not", ["mask"], ["dropped"], name="not")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4]),
               helper.make_tensor_value_info("mask", TensorProto.BOOL, [batch, 4]),
               helper.make_tensor_value_info("dropped", TensorProto.BOOL, [batch, 4])]
    src = helper.make_model(helper.make_graph(nodes, "g", [x], outputs), opset_imports=[helper.make_opsetid("", 17)])
    for simplify in (False, True):
        model, details = _apply(src, tmp_path, simplify=simplify)
        onnx.checker.check_model(model, full_check=True)
        assert "Dropout" not in [n.op_type for n in model.graph.node] and details["training_nodes_removed"] == 1
        x_val = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
        y, mask, dropped = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x_val})
        np.testing.assert_array_equal(y, x_val)
        assert mask.dtype == bool and mask.shape == (2, 4) and mask.all() and not dropped.any()


def test_canonicalize_does_not_mutate_its_input(tmp_path):
    src = if_on_sample_rate()
    before = src.SerializeToString()
    _apply(src, tmp_path, input_values={"rate": "1"})
    assert src.SerializeToString() == before


def test_flag_parsers():
    assert parse_input_shape("image:1,1,8,8") == ("image", (1, 1, 8, 8))
    assert parse_input_shape("ns:input:1,2") == ("ns:input", (1, 2))
    assert parse_input_value("rate=16000") == ("rate", "16000")
    for bad in ("image", "image:1,x", "image:0,1", ":1"):
        with pytest.raises(UserInputError):
            parse_input_shape(bad)
    with pytest.raises(UserInputError):
        parse_input_value("rate")


def test_batch_size_fixes_only_a_dynamic_leading_dim(tmp_path):
    from edgeopt.profiles import load_profile

    model, details = _apply(if_on_sample_rate(), tmp_path, batch_size=4, input_values={"rate": "1"}, simplify=False)
    assert input_specs(model)[0].shape == (4, 4) and details["fixed_shapes"] == {"x": [4, 4]}
    explicit, _ = _apply(dynamic_dims(), tmp_path, batch_size=4, input_shapes={"x": (2, 3, 5)})
    assert input_specs(explicit)[0].shape == (2, 3, 5)  # an explicit --input-shape wins
    with pytest.raises(UserInputError, match="dynamic dim"):
        _apply(dynamic_dims(), tmp_path, batch_size=4)  # 'time' is still dynamic
    assert load_profile("arduino-nano-33-ble-sense").default_batch == 1
    assert load_profile("raspberry-pi-4").default_batch is None
