"""Structured and unstructured pruning passes on real exported networks (digits CNN, a ResNet-style
block model, a model with channel concats), checked with ONNX Runtime and onnx.checker.

The structured test that matters most is exactness: removing channels must give the same outputs as
the original model in which the weights *reading* those channels are zeroed. Any index mistake in
the propagation (a residual Add, a concat offset, Flatten → Gemm) breaks that equality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from edgeopt.converters.passes import PassContext, get_pass
from edgeopt.converters.passes.prune_structured import PruneStructured, apply_pruning, prepare
from edgeopt.errors import UserInputError
from edgeopt.onnx_io import count_macs, count_params

import compress_models


@pytest.fixture(scope="module")
def nets(digits_models, tmp_path_factory) -> dict[str, onnx.ModelProto]:
    """Canonicalised models: the trained digits CNN and the two torch-built dependency networks."""
    root = tmp_path_factory.mktemp("nets")
    paths = {"cnn": digits_models["cnn"], "resnet": compress_models.make("resnet", root),
             "concat": compress_models.make("concat", root)}
    ctx = PassContext(workdir=root)
    return {k: get_pass("canonicalize")().apply(onnx.load(str(p)), ctx) for k, p in paths.items()}


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _images(n: int = 16) -> np.ndarray:
    return np.random.default_rng(0).random((n, 1, 8, 8), dtype=np.float32)


def _zero_removed_inputs(model: onnx.ModelProto, plan) -> onnx.ModelProto:
    """The unpruned model with every weight that reads a removed channel set to zero."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {i.name: i for i in model.graph.initializer}
    for act in plan.graph.slices:
        if act.role != "input":
            continue
        name = model.graph.node[act.node].input[act.index]
        w = numpy_helper.to_array(inits[name]).copy()
        removed = np.setdiff1d(np.arange(act.layout.width()), plan.graph.kept_indices(act.layout, plan.keep))
        index = [slice(None)] * w.ndim
        index[act.axis] = removed
        w[tuple(index)] = 0
        inits[name].CopyFrom(numpy_helper.from_array(w, name))
    return model


def test_macs_counter_matches_a_hand_count(nets):
    # conv 1→16 (3x3, 8x8), conv 16→32 (8x8), conv 32→32 (4x4 after pooling), fc 512→64, fc 64→10
    expected = 16 * 9 * 64 + 32 * 16 * 9 * 64 + 32 * 32 * 9 * 16 + 512 * 64 + 64 * 10
    assert count_macs(nets["cnn"]) == expected


@pytest.mark.parametrize("kind", ["cnn", "resnet", "concat"])
def test_structured_pruning_equals_the_original_with_removed_channels_zeroed(nets, kind):
    model = prepare(nets[kind])
    plan = PruneStructured(ratio=0.5).plan(model)
    reference = _run(_zero_removed_inputs(model, plan), _images())
    pruned = onnx.ModelProto.FromString(model.SerializeToString())
    apply_pruning(pruned, plan.graph, plan.keep)
    onnx.checker.check_model(pruned, full_check=True)
    got = _run(pruned, _images())
    assert got.shape == reference.shape == (16, 10)
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5)
    # and pruning really changed the function (the zeroed model is not the original)
    assert not np.allclose(_run(model, _images()), reference, atol=1e-3)
    assert count_params(pruned) < 0.4 * count_params(model)
    assert count_macs(pruned) < count_macs(model) / 3


def test_residual_adds_couple_layers_and_concats_keep_offsets(nets):
    resnet = PruneStructured(ratio=0.5).plan(prepare(nets["resnet"]))
    stem = resnet.layers["/stem/stem.0/Conv"]
    # the identity shortcut of block1 ties the stem to block1's second conv
    assert "/block1/body/body.3/Conv" in stem["coupled_with"]
    # block2's projection shortcut and its body meet in an Add; the depthwise conv after them follows
    # their channels (filter c reads channel c); the SE gate's Mul ties its expansion conv to the
    # pointwise conv it scales
    assert resnet.layers["/block2/short/short.0/Conv"]["coupled_with"] == ["/block2/body/body.3/Conv"]
    assert resnet.layers["/se/gate/gate.3/Conv"]["coupled_with"] == ["/depthwise/depthwise.3/Conv"]
    assert "/depthwise/depthwise.0/Conv" not in resnet.layers  # not a layer of its own
    assert {v["kept"] for v in resnet.layers.values() if v["channels"] == 32} == {16}
    assert resnet.skipped == {"/head/head.2/Gemm": "reaches the model output 'logits'"}

    concat = PruneStructured(ratio=0.5).plan(prepare(nets["concat"]))
    assert concat.layers["/inception/b/b.0/Conv"] == {"channels": 12, "kept": 6, "ratio": 0.5, "coupled_with": []}
    assert set(concat.skipped) == {"/head/head.3/Gemm"}


def test_depthwise_group_and_flatten_gemm_shapes_follow(nets):
    ctx = PassContext(workdir=Path("."))
    pruned = get_pass("prune-structured")(ratio=0.5).apply(nets["resnet"], ctx)
    depthwise = next(n for n in pruned.graph.node if n.name == "/depthwise/depthwise.0/Conv")
    assert next(a.i for a in depthwise.attribute if a.name == "group") == 16
    inits = {i.name: tuple(i.dims) for i in pruned.graph.initializer}
    assert inits[depthwise.input[1]] == (16, 1, 3, 3)
    head = next(n for n in pruned.graph.node if n.op_type == "Gemm")
    assert inits[head.input[1]] == (10, 16)
    cnn = get_pass("prune-structured")(ratio=0.5).apply(nets["cnn"], ctx)
    fc1 = next(n for n in cnn.graph.node if n.name == "/10/Gemm")
    assert tuple(next(i.dims for i in cnn.graph.initializer if i.name == fc1.input[1])) == (32, 16 * 4 * 4)
    details = ctx.details["prune-structured"]
    assert details["macs_before"] / details["macs_after"] >= 1.8


def test_per_layer_ratios_and_unknown_layer_names(nets):
    plan = PruneStructured(ratio=0.5, layer_ratios={"/3/Conv": 0.25, "/10/Gemm": 0.0}).plan(prepare(nets["cnn"]))
    assert plan.layers["/3/Conv"]["kept"] == 24 and plan.layers["/0/Conv"]["kept"] == 8
    assert plan.layers["/10/Gemm"]["kept"] == 64
    with pytest.raises(UserInputError, match=r"no prunable layer named '/3/conv'.*did you mean '/3/Conv'"):
        PruneStructured(layer_ratios={"/3/conv": 0.5}).plan(prepare(nets["cnn"]))
    with pytest.raises(UserInputError, match=r"must be in \[0.0, 1.0\)"):
        PruneStructured(layer_ratios={"/3/Conv": 1.0}).plan(prepare(nets["cnn"]))
    with pytest.raises(UserInputError, match=r"'ratio' must be in \[0.0, 1.0\)"):
        PruneStructured(ratio=1.0)
    plan = PruneStructured(ratio=0.5, round_to=8).plan(prepare(nets["concat"]))
    assert plan.layers["/inception/b/b.0/Conv"]["kept"] == 8  # 6 rounded up to a multiple of 8


def _grouped_and_channel_softmax() -> onnx.ModelProto:
    """conv_a (1→8) → grouped conv (2 groups) → relu → conv_b (8→6) → Softmax over channels → conv_c."""
    rng = np.random.default_rng(0)

    def w(*shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32))

    inits = []
    for name, shape in (("wa", (8, 1, 3, 3)), ("wg", (8, 4, 3, 3)), ("wb", (6, 8, 1, 1)), ("wc", (4, 6, 1, 1))):
        t = w(*shape)
        t.name = name
        inits.append(t)
    nodes = [h.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             h.make_node("Conv", ["a", "wg"], ["g"], name="grouped", group=2, pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["g"], ["r"], name="relu"),
             h.make_node("Conv", ["r", "wb"], ["b"], name="conv_b"),
             h.make_node("Softmax", ["b"], ["s"], name="channel_softmax", axis=1),
             h.make_node("Conv", ["s", "wc"], ["y"], name="conv_c")]
    graph = h.make_graph(nodes, "blocked", [h.make_tensor_value_info("x", T.FLOAT, ["N", 1, 8, 8])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", 4, 8, 8])], initializer=inits)
    return onnx.shape_inference.infer_shapes(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))


def test_layers_that_cannot_be_pruned_are_left_and_listed():
    model = _grouped_and_channel_softmax()
    ctx = PassContext(workdir=Path("."))
    pruned = get_pass("prune-structured")(ratio=0.5).apply(model, ctx)
    skipped = ctx.details["prune-structured"]["skipped"]
    assert "grouped convolution 'grouped' (Conv)" in skipped["conv_a"]
    assert "grouped convolution" in skipped["grouped"]
    assert "'channel_softmax' (Softmax)" in skipped["conv_b"]
    assert "reaches the model output 'y'" in skipped["conv_c"]
    assert ctx.details["prune-structured"]["layers"] == {}
    assert "removed no channel" in ctx.notes[-1]
    x = np.random.default_rng(1).random((2, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(_run(pruned, x), _run(model, x), rtol=1e-5)


# -- unstructured --------------------------------------------------------------------------------
def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_pruning_zeroes_the_smallest_weights(nets, scope):
    ctx = PassContext(workdir=Path("."))
    model = nets["cnn"]
    pruned = get_pass("prune-unstructured")(sparsity=0.8, scope=scope).apply(model, ctx)
    details = ctx.details["prune-unstructured"]
    before, after = _weights(model), _weights(pruned)
    assert set(details["skipped"]) == {"/0/Conv", "/13/Gemm"}  # first and last layers stay dense
    for layer in ("/0/Conv", "/13/Gemm"):
        weight = next(n.input[1] for n in pruned.graph.node if n.name == layer)
        np.testing.assert_array_equal(after[weight], before[weight])
    assert set(details["layers"]) == {"/3/Conv", "/7/Conv", "/10/Gemm"}
    pooled = np.concatenate([np.abs(before[d["weight"]]).ravel() for d in details["layers"].values()])
    for d in details["layers"].values():
        w0, w1 = before[d["weight"]], after[d["weight"]]
        assert d["zeros"] == int((w1 == 0).sum())
        kept = w1 != 0
        np.testing.assert_array_equal(w1[kept], w0[kept])  # survivors unchanged
        # every removed weight is smaller than every kept one (per layer, or over all layers)
        if scope == "layer":
            assert d["sparsity"] == pytest.approx(0.8, abs=1 / d["params"])
            assert np.abs(w0[~kept]).max() <= np.abs(w0[kept]).min()
        else:
            threshold = np.sort(pooled)[int(round(0.8 * pooled.size)) - 1]
            assert np.abs(w0[~kept]).max() <= threshold <= np.abs(w0[kept]).min()
    assert details["sparsity"] == pytest.approx(0.8, abs=1e-3)
    if scope == "global":  # one threshold: the layers end up with different sparsities
        assert len({round(d["sparsity"], 2) for d in details["layers"].values()}) > 1


def test_unstructured_bad_input():
    with pytest.raises(UserInputError, match=r"'sparsity' must be in \[0.0, 1.0\)"):
        get_pass("prune-unstructured")(sparsity=1.2)
    model = h.make_model(h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g",
                                      [h.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                                      [h.make_tensor_value_info("y", T.FLOAT, [1, 4])]))
    with pytest.raises(UserInputError, match="no Conv, Gemm or MatMul layer"):
        get_pass("prune-unstructured")(sparsity=0.5).apply(model, PassContext(workdir=Path(".")))
