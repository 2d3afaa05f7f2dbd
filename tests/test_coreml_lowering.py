"""The ONNX → MIL lowering, op by op: small real exports (torch) and hand-built graphs for
opset-specific semantics, converted at fp32, reloaded from the saved .mlpackage and evaluated with
tests/mil_reference.py, against ONNX Runtime on the source model.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mil_reference import run_package
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

pytestmark = pytest.mark.slow


def _torch():
    import torch

    torch.manual_seed(0)
    return torch


def _export(module, path, *shapes, opset=17):
    torch = _torch()
    inputs = tuple(torch.randn(*s) for s in shapes)
    names = [f"x{i}" for i in range(len(shapes))]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = module(*inputs)
        n_out = len(out) if isinstance(out, tuple) else 1
        torch.onnx.export(module.eval(), inputs, str(path), dynamo=False, input_names=names,
                          output_names=[f"y{i}" for i in range(n_out)], opset_version=opset,
                          dynamic_axes={n: {0: "batch"} for n in names})
    return onnx.load(str(path))


def _convert(model: onnx.ModelProto, out_dir):
    """Canonicalise and compile with the Core ML target at fp32, as `edgeopt convert` does."""
    from edgeopt.converters.passes import PassContext, get_pass
    from edgeopt.converters.targets import get_target

    target = get_target("coreml")(compute_precision="fp32")
    ctx = PassContext(workdir=out_dir)
    canonical = get_pass("canonicalize")(**target.canonicalize_settings()).apply(model, ctx)
    target.check_supported(canonical)
    return target.compile(canonical, "none", ctx, out_dir).path, canonical


def _check(model: onnx.ModelProto, tmp_path, expect_ops=(), atol=1e-4, seed=0):
    package, canonical = _convert(model, tmp_path)
    ops = {n.op_type for n in canonical.graph.node}
    assert set(expect_ops) <= ops, f"the canonical graph lacks {set(expect_ops) - ops}: the test would not cover them"
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        if vi.name in {i.name for i in model.graph.initializer}:
            continue
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    got = run_package(package, feeds)
    assert set(got) == set(want)
    for name, ref in want.items():
        assert got[name].shape == ref.shape, name
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(got[name], ref, atol=atol * scale, rtol=0, err_msg=name)
    return ops


# -- real exports ------------------------------------------------------------------------------------

def test_convolutions(tmp_path):
    nn = _torch().nn

    class Convs(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
            self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
            self.dw = nn.Conv2d(8, 8, 5, padding=(2, 1), groups=8, bias=False)
            self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1)
            self.c1d = nn.Conv1d(4, 5, 3, padding=1)
            self.up1d = nn.ConvTranspose1d(5, 3, 4, stride=2, padding=1)

        def forward(self, x, s):
            y = self.up(self.dw(self.c2(self.c1(x))))
            return y, self.up1d(self.c1d(s))

    model = _export(Convs(), tmp_path / "convs.onnx", (1, 4, 12, 10), (1, 4, 16))
    _check(model, tmp_path, expect_ops={"Conv", "ConvTranspose"})


def test_pooling_with_ceil_mode_and_padding(tmp_path):
    nn = _torch().nn

    class Pools(nn.Module):
        def __init__(self):
            super().__init__()
            self.mp = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)
            self.ap = nn.AvgPool2d(3, 2, padding=1, count_include_pad=False, ceil_mode=True)
            self.ap_incl = nn.AvgPool2d(2, 2, padding=1, count_include_pad=True)
            self.mp1 = nn.MaxPool1d(2)
            self.gmp = nn.AdaptiveMaxPool2d(1)
            self.gap = nn.AdaptiveAvgPool2d(1)

        def forward(self, x, s):
            return self.mp(x), self.ap(x), self.ap_incl(x), self.mp1(s), self.gmp(x) + self.gap(x)

    model = _export(Pools(), tmp_path / "pools.onnx", (1, 3, 10, 9), (1, 3, 11))
    _check(model, tmp_path, expect_ops={"MaxPool", "AveragePool", "GlobalAveragePool"})


def test_activations_and_elementwise(tmp_path):
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional

    class Acts(nn.Module):
        def __init__(self):
            super().__init__()
            self.prelu = nn.PReLU(6)
            self.prelu1 = nn.PReLU()

        def forward(self, x):
            a = F.gelu(x) + F.gelu(x, approximate="tanh") + F.elu(x, 0.7) + F.selu(x) + F.leaky_relu(x, 0.2)
            b = F.mish(x) + F.softplus(x) + F.softsign(x) + F.hardtanh(x, -0.5, 2.0) + F.relu6(x) + F.silu(x)
            c = F.hardswish(x) * F.hardsigmoid(x) + torch.tanh(x) * torch.sigmoid(x) + torch.erf(x)
            d = torch.sqrt(x.abs() + 1) + torch.log(x.abs() + 2) + torch.exp(-x.abs()) + 1.0 / (x.abs() + 1)
            e = torch.maximum(x, -x * 0.5) - torch.minimum(x, x ** 2) + x.pow(3) / 7 + x.clamp(min=0.1)
            return a, b, c, d + e, self.prelu(x) + self.prelu1(x), x.clamp(max=0.3)

    model = _export(Acts(), tmp_path / "acts.onnx", (1, 6, 5, 4))
    _check(model, tmp_path, expect_ops={"Elu", "Selu", "LeakyRelu", "Softplus", "Clip", "HardSwish", "HardSigmoid",
                                        "Erf", "Sqrt", "Log", "Exp", "Max", "Min", "Pow", "PRelu", "Div"}, atol=2e-4)


def test_activations_from_newer_opsets(tmp_path):
    """Gelu (opset 20) and Mish (opset 18) as single ops, which torch's exporter decomposes."""
    x = h.make_tensor_value_info("x", T.FLOAT, [1, 3, 4])
    names = ["gelu", "gelu_tanh", "mish", "softsign", "neg", "recip", "sum", "sign", "sincos", "floor", "ceil"]
    nodes = [h.make_node("Gelu", ["x"], ["gelu"]),
             h.make_node("Gelu", ["x"], ["gelu_tanh"], approximate="tanh"),
             h.make_node("Mish", ["x"], ["mish"]),
             h.make_node("Softsign", ["x"], ["softsign"]),
             h.make_node("Neg", ["x"], ["neg"]),
             h.make_node("Abs", ["x"], ["abs"]),
             h.make_node("Add", ["abs", "one"], ["abs1"]),
             h.make_node("Reciprocal", ["abs1"], ["recip"]),
             h.make_node("Sum", ["x", "abs", "neg"], ["sum"]),
             h.make_node("Sign", ["x"], ["sign"]),
             h.make_node("Sin", ["x"], ["sin"]),
             h.make_node("Cos", ["x"], ["cos"]),
             h.make_node("Mul", ["sin", "cos"], ["sincos"]),
             h.make_node("Mul", ["x", "ten"], ["x10"]),
             h.make_node("Floor", ["x10"], ["floor"]),
             h.make_node("Ceil", ["x10"], ["ceil"])]
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(10.3, np.float32), "ten")]
    model = _graph(nodes, [x], [h.make_tensor_value_info(n, T.FLOAT, [1, 3, 4]) for n in names], inits, opset=20)
    _check(model, tmp_path, expect_ops={"Gelu", "Mish", "Softsign", "Neg", "Reciprocal", "Sum", "Sign", "Sin",
                                        "Cos", "Floor", "Ceil"}, atol=2e-4)


def test_norms_softmax_and_reductions(tmp_path):
    torch = _torch()
    nn = torch.nn

    class Norms(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(8)
            self.inorm = nn.InstanceNorm2d(3, affine=True)
            self.bn1d = nn.BatchNorm1d(5)

        def forward(self, seq, img, flat):
            self.inorm.weight.data.uniform_(0.5, 1.5)
            self.inorm.bias.data.uniform_(-0.5, 0.5)
            return (self.ln(seq), torch.log_softmax(seq, dim=-1) + torch.softmax(seq, dim=1),
                    self.inorm(img), img.mean(dim=(2, 3)) + img.amax(dim=(2, 3)) - img.amin(dim=(2, 3)),
                    img.sum(dim=1, keepdim=True),
                    torch.logsumexp(seq, dim=-1) + seq.norm(dim=-1) + seq.prod(dim=-1) * 0.01,
                    self.bn1d(flat))

    bn = Norms()
    bn.bn1d.running_mean.uniform_(-1, 1)
    bn.bn1d.running_var.uniform_(0.5, 2)
    model = _export(bn.eval(), tmp_path / "norms.onnx", (1, 4, 8), (1, 3, 5, 6), (1, 5, 7))
    _check(model, tmp_path, expect_ops={"LayerNormalization", "InstanceNormalization", "Softmax", "LogSoftmax",
                                        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceLogSumExp",
                                        "ReduceL2", "ReduceProd", "BatchNormalization"})


def test_shape_ops(tmp_path):
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional

    class Shapes(nn.Module):
        def forward(self, x, v):
            a = x.reshape(1, 3, -1).permute(0, 2, 1)                       # Reshape, Transpose
            b = torch.cat([x[:, :, 1:7:2, :], x[:, :, -3:, :]], dim=2)    # Slice with steps, Concat
            c = torch.flip(x, dims=[3])                                    # Slice with a negative step
            d1, d2 = torch.split(x, [1, 2], dim=1)                          # Split
            e = x[:, 2] + x[:, 0]                                           # Gather (scalar index)
            f = v.unsqueeze(1).expand(1, 3, 5) + v.unsqueeze(-1).repeat(1, 1, 1)[..., :1].squeeze(-1).unsqueeze(1)
            g = F.pad(x, (1, 2, 0, 1), mode="reflect") + 0.0
            i = F.pad(x, (2, 0, 1, 1), mode="replicate")
            j = F.pad(x, (1, 1, 1, 1, 1, 0), value=0.5)
            k = torch.index_select(x, 3, torch.tensor([3, 0, 2]))          # Gather (vector index)
            return a, b, c, d1 * 2, d2, e, f, g, i, j, k, v.repeat(2, 3)

    model = _export(Shapes(), tmp_path / "shapes.onnx", (1, 3, 8, 6), (1, 5))
    _check(model, tmp_path, expect_ops={"Reshape", "Transpose", "Slice", "Concat", "Split", "Gather", "Pad",
                                        "Unsqueeze", "Tile"})


def test_resize(tmp_path):
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional

    class Resizes(nn.Module):
        def forward(self, x):
            return (F.interpolate(x, scale_factor=2, mode="nearest"),
                    F.interpolate(x, size=(10, 12), mode="nearest"),
                    F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False),
                    F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=True),
                    F.interpolate(x, scale_factor=(3, 2), mode="bilinear", align_corners=False))

    model = _export(Resizes(), tmp_path / "resize.onnx", (1, 2, 5, 6))
    _check(model, tmp_path, expect_ops={"Resize"})


@pytest.mark.parametrize("bidirectional,batch_first", [(True, True), (False, False)])
def test_lstm_and_gru(tmp_path, bidirectional, batch_first):
    torch = _torch()
    nn = torch.nn

    class Rnns(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(5, 7, batch_first=batch_first, bidirectional=bidirectional)
            self.gru = nn.GRU(5, 6, batch_first=batch_first, bidirectional=bidirectional)

        def forward(self, x):
            y, (hn, cn) = self.lstm(x)
            z, gn = self.gru(x)
            return y, hn, cn, z, gn

    shape = (1, 9, 5) if batch_first else (9, 1, 5)
    model = _export(Rnns(), tmp_path / "rnn.onnx", shape)
    if not batch_first:  # the batch is axis 1 here; a fixed shape keeps the export simple
        for vi in model.graph.input:
            vi.type.tensor_type.shape.dim[0].dim_value = 9
    _check(model, tmp_path, expect_ops={"LSTM", "GRU"})


def test_lstm_with_initial_state_inputs(tmp_path):
    """Streaming models feed the LSTM state back in: initial_h / initial_c as model inputs."""
    torch = _torch()

    class Stateful(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(3, 4, batch_first=True)

        def forward(self, x, h, c):
            y, (hn, cn) = self.lstm(x, (h, c))
            return y, hn, cn

    model = _export(Stateful(), tmp_path / "stateful.onnx", (1, 6, 3), (1, 1, 4), (1, 1, 4))
    for vi in model.graph.input[1:]:  # h / c: [layers, batch, hidden], batch is not axis 0
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    _check(model, tmp_path, expect_ops={"LSTM"})


# -- hand-built graphs: opset-specific semantics torch does not export ---------------------------------

def _graph(nodes, inputs, outputs, inits=(), opset=17):
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def test_softmax_before_opset_13_flattens_at_its_axis(tmp_path):
    """Opset 11 Softmax(axis=1) on a rank-3 tensor normalises over the last two axes together."""
    model = _graph([h.make_node("Softmax", ["x"], ["y"], axis=1), h.make_node("LogSoftmax", ["x"], ["z"], axis=1)],
                   [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 4])],
                   [h.make_tensor_value_info("y", T.FLOAT, [1, 3, 4]), h.make_tensor_value_info("z", T.FLOAT, [1, 3, 4])],
                   opset=11)
    _check(model, tmp_path, expect_ops={"Softmax", "LogSoftmax"})


def test_global_max_pool_and_auto_pad(tmp_path):
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [h.make_node("Conv", ["x", "w"], ["c"], strides=[2, 2], auto_pad="SAME_UPPER"),
             h.make_node("Conv", ["x", "w"], ["d"], strides=[2, 2], auto_pad="SAME_LOWER"),
             h.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], auto_pad="SAME_UPPER"),
             h.make_node("Add", ["p", "d"], ["s"]),
             h.make_node("GlobalMaxPool", ["s"], ["y"])]
    model = _graph(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 7, 8])],
                   [h.make_tensor_value_info("y", T.FLOAT, [1, 4, 1, 1])], [w])
    _check(model, tmp_path, expect_ops={"Conv", "MaxPool", "GlobalMaxPool"})


def test_gru_without_linear_before_reset(tmp_path):
    rng = np.random.default_rng(3)
    hidden, features = 5, 3
    inits = [numpy_helper.from_array(rng.standard_normal((1, 3 * hidden, features)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((1, 3 * hidden, hidden)).astype(np.float32), "R"),
             numpy_helper.from_array(rng.standard_normal((1, 6 * hidden)).astype(np.float32), "B")]
    node = h.make_node("GRU", ["x", "W", "R", "B"], ["y", "yh"], hidden_size=hidden, linear_before_reset=0,
                       direction="reverse")
    model = _graph([node], [h.make_tensor_value_info("x", T.FLOAT, [7, 1, features])],
                   [h.make_tensor_value_info("y", T.FLOAT, [7, 1, 1, hidden]),
                    h.make_tensor_value_info("yh", T.FLOAT, [1, 1, hidden])], inits)
    _check(model, tmp_path, expect_ops={"GRU"})


def test_gemm_variants_and_matmul(tmp_path):
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "B"),
             numpy_helper.from_array(rng.standard_normal((3, 6)).astype(np.float32), "C"),
             numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "M")]
    nodes = [h.make_node("Gemm", ["x", "B", "C"], ["y"], alpha=0.5, beta=2.0, transB=1),      # [3,4]x[4,6]^T
             h.make_node("Gemm", ["xt", "B"], ["z"], transA=1),                               # [6,3]^T x [6,4]
             h.make_node("MatMul", ["x", "M"], ["m"]),
             h.make_node("MatMul", ["x3", "M"], ["m3"])]
    model = _graph(nodes, [h.make_tensor_value_info("x", T.FLOAT, [3, 4]), h.make_tensor_value_info("xt", T.FLOAT, [6, 3]),
                           h.make_tensor_value_info("x3", T.FLOAT, [1, 2, 3, 4])],
                   [h.make_tensor_value_info("y", T.FLOAT, [3, 6]), h.make_tensor_value_info("z", T.FLOAT, [3, 4]),
                    h.make_tensor_value_info("m", T.FLOAT, [3, 5]), h.make_tensor_value_info("m3", T.FLOAT, [1, 2, 3, 5])],
                   inits)
    # the leading dims here are not a batch: fix them so canonicalize keeps them
    _check(model, tmp_path, expect_ops={"Gemm", "MatMul"})


def test_real_export_with_if_and_shape_converts_once_the_shape_is_fixed(tmp_path):
    """A TorchScript export keeps Shape arithmetic and an If on the input width while the width is
    dynamic: conversion asks for --input-shape, and with it the graph folds and converts."""
    import arch_models

    from conftest import run_cli

    source = arch_models.export(arch_models.shape_dependent_classifier(), tmp_path / "shape.onnx",
                                arch_models.sample((2, 16)), dynamic_input_dims={1: "width"})
    ops = {n.op_type for n in onnx.load(str(source)).graph.node}
    assert {"If", "Shape"} <= ops, ops
    out = tmp_path / "out"
    res = run_cli("convert", source, "-o", out, "--target", "coreml", "-q")
    assert res.code == 2 and "--input-shape x:N," in res.err and not out.exists(), res.err
    res = run_cli("convert", source, "-o", out, "--target", "coreml", "-q", "--input-shape", "x:1,16",
                  "--compute-precision", "fp32")
    assert res.code == 0, res.err
    x = arch_models.sample((1, 16), seed=5)
    want = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = run_package(out / "model.mlpackage", {"x": x})["y"]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_onnx_names_that_are_not_core_ml_identifiers_are_kept_in_the_artifact(tmp_path):
    """Core ML renames `input.1` to `input_1`; the package's metadata maps it back, so the manifest,
    golden vectors and runtime keep the ONNX names."""
    from edgeopt.runtime.coreml import feature_specs, import_coremltools, read_io_names

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "w")
    model = _graph([h.make_node("MatMul", ["input.1", "w"], ["m"]), h.make_node("Relu", ["m"], ["out:0"])],
                   [h.make_tensor_value_info("input.1", T.FLOAT, [1, 8])],
                   [h.make_tensor_value_info("out:0", T.FLOAT, [1, 4])], [w])
    _check(model, tmp_path)  # run_package feeds and reads the ONNX names
    spec = import_coremltools().utils.load_spec(str(tmp_path / "model.mlpackage"))
    assert [f.name for f in spec.description.input] == ["input_1"]
    assert read_io_names(spec) == {"inputs": {"input_1": "input.1"}, "outputs": {"out_0": "out:0"}}
    inputs, outputs = feature_specs(spec)
    assert [s.name for s in inputs] == ["input.1"] and [s.name for s in outputs] == ["out:0"]
