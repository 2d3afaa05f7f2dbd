from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeopt.converters.passes import PassContext
from edgeopt.converters.passes.canonicalize import Canonicalize, parse_input_shape, parse_input_value
from edgeopt.errors import UserInputError
from edgeopt.onnx_io import input_specs

from conftest import run_cli
from onnx_models import (
    conv_classifier,
    dynamic_dims,
    if_on_sample_rate,
    lstm_sequence,
    misdeclared_output,
    save,
    unupgradable,
    with_dropout_and_training_bn,
)


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


# -- simplification, checked (issue 15) ------------------------------------------------------------------

def _ort(model, feeds):
    return ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]


def test_a_misdeclared_output_shape_is_corrected_before_simplification(tmp_path):
    import onnxslim

    source = misdeclared_output()
    x = np.random.default_rng(0).standard_normal((1, 3, 5)).astype(np.float32)
    assert _ort(onnxslim.slim(source), {"x": x}).shape == (1, 20)  # the bug this guards against
    ctx = PassContext(workdir=tmp_path)
    model = Canonicalize().apply(source, ctx)
    np.testing.assert_allclose(_ort(model, {"x": x}), _ort(source, {"x": x}), rtol=1e-6)
    assert _ort(model, {"x": x}).shape == (5, 1, 4)
    assert ctx.details["canonicalize"]["simplified"] is True
    assert ctx.notes == ["canonicalize: output 'y' is declared [1, 'seqlen'] but the model computes [5, 1, 4] "
                         "(the declaration is corrected)"]
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [5, 1, 4]


def test_convert_of_a_misdeclared_output_matches_the_original_on_every_runnable_target(tmp_path):
    model = save(misdeclared_output(), tmp_path / "crnn_head.onnx")
    for target in ("onnx", "tflite"):
        res = run_cli("convert", model, "-o", tmp_path / target, "--target", target, "--json", "-q")
        assert res.code == 0, res.err
        report = res.json()
        assert report["parity"]["max_abs_err"] < 1e-5
        manifest = json.loads((tmp_path / target / "manifest.json").read_text())
        shape = manifest["outputs"][0]["shape"]
        assert sorted(shape) == [1, 4, 5], shape  # tflite may store it in another layout, never [1, 20]
    # Core ML does not run here: the shape is checked against the original's outputs all the same
    res = run_cli("convert", model, "-o", tmp_path / "coreml", "--target", "coreml", "--json", "-q")
    assert res.code == 0, res.err
    assert json.loads((tmp_path / "coreml" / "manifest.json").read_text())["outputs"][0]["shape"] == [5, 1, 4]


def test_an_output_shape_the_original_does_not_compute_fails_the_artifact():
    from edgeopt.converters.pipeline import _output_shape_problems
    from edgeopt.specs import TensorSpec

    golden = {"y": np.zeros((8, 5, 1, 4), np.float32)}  # 8 samples of [5, 1, 4] (no batch axis)
    assert _output_shape_problems(golden, [TensorSpec("y", (5, 1, 4), "float32", batch_axis=None)]) == []
    assert _output_shape_problems({"y": np.zeros((8, 4))}, [TensorSpec("y", ("N", 4), "float32")]) == []
    assert _output_shape_problems(golden, [TensorSpec("y", (1, 20), "float32", batch_axis=None)]) == [
        "output 'y': the converted model declares [1, 20] per sample, the original computes [5, 1, 4]"]


def _scaled_output(model, factor):
    """The same graph with its output multiplied by ``factor`` (a simplifier that gets values wrong)."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    name = out.graph.output[0].name
    for node in out.graph.node:
        node.output[:] = [f"{name}_pre" if o == name else o for o in node.output]
    out.graph.initializer.append(onnx.numpy_helper.from_array(np.array(factor, np.float32), "factor"))
    out.graph.node.append(onnx.helper.make_node("Mul", [f"{name}_pre", "factor"], [name]))
    return out


def _reshaped_output(model):
    """The same graph with its output flattened (a simplifier that gets a shape wrong)."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    name = out.graph.output[0].name
    for node in out.graph.node:
        node.output[:] = [f"{name}_pre" if o == name else o for o in node.output]
    out.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1, -1], np.int64), "flat_shape"))
    out.graph.node.append(onnx.helper.make_node("Reshape", [f"{name}_pre", "flat_shape"], [name]))
    del out.graph.output[0].type.tensor_type.shape.dim[:]
    return out


@pytest.mark.parametrize("wrong,problem", [
    (lambda m: _scaled_output(m, 1.5), "different values for output 'y'"),
    (_reshaped_output, "output 'y' shaped [1, 48] instead of [2, 3, 8]"),
])
def test_a_simplification_that_changes_an_output_is_dropped(tmp_path, monkeypatch, wrong, problem):
    import onnxslim

    real = onnxslim.slim
    monkeypatch.setattr(onnxslim, "slim", lambda m: wrong(real(m)))  # the seam: onnxslim's result
    source = dynamic_dims()
    ctx = PassContext(workdir=tmp_path)
    model = Canonicalize(input_shapes={"x": (2, 3, 8)}).apply(source, ctx)
    assert ctx.details["canonicalize"]["simplified"] is False
    assert ctx.notes == [f"canonicalize: simplification (onnxslim) gave {problem}; the unsimplified graph is kept "
                         f"(--no-simplify skips the attempt)"]
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    np.testing.assert_array_equal(_ort(model, {"x": x}), np.maximum(x, 0))


def test_no_simplify_skips_onnxslim(tmp_path, monkeypatch):
    import onnxslim

    def refuse(_model):
        raise AssertionError("onnxslim must not run with --no-simplify")

    model = save(misdeclared_output(), tmp_path / "m.onnx")
    monkeypatch.setattr(onnxslim, "slim", refuse)
    res = run_cli("convert", model, "-o", tmp_path / "out", "--target", "onnx", "--no-simplify", "--json", "-q")
    assert res.code == 0, res.err
    report = res.json()
    assert report["recipe"][0] == {"pass": "canonicalize", "params": {"keep_dynamic_batch": True, "simplify": False}}
    assert report["steps"][1]["simplified"] is False
    assert report["notes"] == ["canonicalize: output 'y' is declared [1, 'seqlen'] but the model computes [5, 1, 4] "
                               "(the declaration is corrected)"]  # checked with or without simplification
    assert report["parity"]["max_abs_err"] == 0.0


# -- old opsets (issue 15) ------------------------------------------------------------------------------

def test_an_old_opset_is_upgraded_only_when_the_recipe_needs_it(tmp_path):
    model = save(conv_classifier(opset=11), tmp_path / "cls11.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cal.npz", x=rng.standard_normal((32, 3, 8, 8)).astype(np.float32))
    res = run_cli("convert", model, "-o", tmp_path / "f32", "--target", "onnx", "--json", "-q")
    assert res.code == 0, res.err
    assert "opset" not in res.json()["steps"][1]
    assert onnx.load(tmp_path / "f32" / "model.onnx").opset_import[0].version == 11
    res = run_cli("convert", model, "-o", tmp_path / "i8", "--target", "onnx", "--quantize", "int8",
                  "--calibration", tmp_path / "cal.npz", "--json", "-q")
    assert res.code == 0, res.err  # before: "Unrecognized attribute: axis for operator DequantizeLinear"
    report = res.json()
    assert report["steps"][1]["opset"] == {"from": 11, "to": 13}
    assert report["parity"]["cosine"] > 0.99
    ops = {n.op_type for n in onnx.load(tmp_path / "i8" / "model.onnx").graph.node}
    assert "DequantizeLinear" in ops


def test_an_opset_12_lstm_is_upgraded_and_unrolled(tmp_path):
    from edgeopt.converters.passes.unroll_rnn import UnrollRnn
    from edgeopt.converters.targets import get_target

    source = lstm_sequence(opset=12)
    assert get_target("tvm")().min_opset("none", source) == 13
    assert get_target("tvm")().min_opset("none", conv_classifier()) is None
    ctx = PassContext(workdir=tmp_path)
    canonical = Canonicalize(min_opset=13).apply(source, ctx)
    assert ctx.details["canonicalize"]["opset"] == {"from": 12, "to": 13}
    unrolled = UnrollRnn().apply(canonical, ctx)
    assert "LSTM" not in {n.op_type for n in unrolled.graph.node}
    x = np.random.default_rng(0).standard_normal((6, 1, 3)).astype(np.float32)
    np.testing.assert_allclose(_ort(unrolled, {"x": x}), _ort(source, {"x": x}), rtol=1e-5, atol=1e-6)


def test_an_impossible_opset_upgrade_is_one_clear_error(tmp_path):
    from edgeopt.converters.passes import ConversionError

    with pytest.raises(ConversionError, match=r"the model has ONNX opset 11; this recipe needs opset 13, and "
                                              r"onnx.version_converter cannot upgrade it: "):
        Canonicalize(min_opset=13).apply(unupgradable(), PassContext(workdir=tmp_path))
