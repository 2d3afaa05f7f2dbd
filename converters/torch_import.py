"""ONNX → torch: a ``torch.nn.Module`` that runs an ONNX graph with torch ops, its weights trainable.

Hand-written on purpose: onnx2torch, the library for this, imports torchvision, and no torchvision
build loads beside the CPU torch wheel this project pins ("operator torchvision::nms does not
exist"). The op set of the models edgeopt prunes and distils is small (below), so a graph
interpreter is shorter than working around that.

The module executes the nodes in graph order. Float initializers that are weights — of Conv,
ConvTranspose, Gemm, MatMul (and the bias Add after a MatMul), BatchNormalization / Instance- /
LayerNormalization scale and bias, PRelu slopes — are ``nn.Parameter``s *in their ONNX layout*;
everything else (BatchNorm statistics, shapes, constants) is a buffer. BatchNormalization always runs
with its stored statistics (frozen-statistics fine-tuning). Training therefore changes only numbers
that already exist in the graph, and ``write_back`` puts them into a copy of the original ONNX model:
the structure, node names and op set stay exactly those of the model that was checked against the
targets, with no re-export.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeopt.onnx_io import iter_nodes

# node inputs (by position) that hold trainable weights when they are float initializers
TRAINABLE_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
                    "BatchNormalization": (1, 2), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2),
                    "PRelu": (1,)}
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _supported() -> set[str]:
    return {name[4:] for name in dir(_Ops) if name.startswith("_op_")}


def unsupported_ops(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Ops the importer cannot run, with their node names (subgraphs — If / Loop — are not supported)."""
    ops = _supported()
    found: dict[str, list[str]] = {}
    for i, node in enumerate(iter_nodes(model.graph)):
        if node.op_type not in ops or node.domain not in ("", "ai.onnx"):
            found.setdefault(node.op_type, []).append(node.name or f"#{i}")
    return found


def trainable_names(model: onnx.ModelProto) -> list[str]:
    """Initializer names that become ``nn.Parameter``s."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    names: list[str] = []
    for node in model.graph.node:
        positions = TRAINABLE_INPUTS.get(node.op_type, ())
        if node.op_type == "Add" and any(producers.get(i) == "MatMul" for i in node.input):
            positions = (0, 1)  # MatMul + Add is a Linear layer with its bias
        for pos in positions:
            if pos < len(node.input) and node.input[pos] in inits:
                init = inits[node.input[pos]]
                if init.data_type in FLOAT_TYPES and node.input[pos] not in names:
                    names.append(node.input[pos])
    return names


def import_model(model: onnx.ModelProto):
    """An ``nn.Module`` computing ``model``; ``module(**inputs)`` returns the graph outputs in order."""
    import torch

    class OnnxModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.graph = model.graph
            self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
            trainable = set(trainable_names(model))
            self.weights = torch.nn.ParameterDict()
            self.key: dict[str, str] = {}  # ONNX initializer name → attribute key
            for i, init in enumerate(model.graph.initializer):
                array = numpy_helper.to_array(init)
                key = f"t{i}_" + re.sub(r"\W", "_", init.name)[:40]
                self.key[init.name] = key
                tensor = torch.from_numpy(np.array(array))
                if init.name in trainable:
                    self.weights[key] = torch.nn.Parameter(tensor.float())
                else:
                    self.register_buffer(key, tensor, persistent=False)
            self.input_names = [vi.name for vi in model.graph.input if vi.name not in self.key]
            self.output_names = [vi.name for vi in model.graph.output]
            self.ops = _Ops(torch, self.opset)

        def tensor(self, name: str):
            key = self.key[name]
            return self.weights[key] if key in self.weights else getattr(self, key)

        def forward(self, *args, **kwargs):
            env: dict[str, Any] = dict(zip(self.input_names, args, strict=False))
            env.update(kwargs)
            for node in self.graph.node:
                ins = [None if not n else env[n] if n in env else self.tensor(n) for n in node.input]
                outs = getattr(self.ops, f"_op_{node.op_type}")(node, ins, _attrs(node))
                if not isinstance(outs, tuple):
                    outs = (outs,)
                for name, value in zip(node.output, outs, strict=False):
                    if name:
                        env[name] = value
            return [env[n] for n in self.output_names]

        def parameter_for(self, name: str):
            return self.weights[self.key[name]]

    return OnnxModule()


def write_back(model: onnx.ModelProto, module) -> onnx.ModelProto:
    """A copy of ``model`` whose trainable initializers hold the module's current weights."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    for init in out.graph.initializer:
        key = module.key.get(init.name)
        if key is not None and key in module.weights:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            value = module.weights[key].detach().cpu().numpy().astype(dtype)
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    return out


def _ints(value) -> list[int]:
    return [int(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]


class _Ops:
    """One method per supported ONNX op: (node, input tensors, attributes) → output tensor(s)."""

    def __init__(self, torch, opset: int):
        self.torch = torch
        self.F = torch.nn.functional
        self.opset = opset

    # -- weight layers -----------------------------------------------------------------------
    def _pads(self, x, a: dict, spatial: int, kernel: list[int], pad_value: float = 0.0):
        """Symmetric padding for torch's ``padding=``, or an explicit F.pad for asymmetric / SAME pads."""
        strides = a.get("strides", [1] * spatial)
        dilations = a.get("dilations", [1] * spatial)
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            begins, ends = [], []
            for dim, k, s, d in zip(x.shape[2:], kernel, strides, dilations, strict=True):
                total = max((-(-int(dim) // s) - 1) * s + (k - 1) * d + 1 - int(dim), 0)
                small, big = total // 2, total - total // 2
                begins.append(small if auto == "SAME_UPPER" else big)
                ends.append(big if auto == "SAME_UPPER" else small)
        elif auto == "VALID":
            begins = ends = [0] * spatial
        else:
            pads = a.get("pads", [0] * (2 * spatial))
            begins, ends = list(pads[:spatial]), list(pads[spatial:])
        if begins == ends:
            return x, begins
        pairs = []
        for b, e in zip(reversed(begins), reversed(ends), strict=True):
            pairs += [b, e]
        return self.F.pad(x, pairs, value=pad_value), [0] * spatial

    def _op_Conv(self, node, ins, a):
        x, w = ins[0], ins[1]
        b = ins[2] if len(ins) > 2 else None
        spatial = w.dim() - 2
        x, padding = self._pads(x, a, spatial, list(w.shape[2:]))
        conv = {1: self.F.conv1d, 2: self.F.conv2d, 3: self.F.conv3d}[spatial]
        return conv(x, w, b, a.get("strides", [1] * spatial), padding, a.get("dilations", [1] * spatial),
                    a.get("group", 1))

    def _op_ConvTranspose(self, node, ins, a):
        x, w = ins[0], ins[1]
        b = ins[2] if len(ins) > 2 else None
        spatial = w.dim() - 2
        pads = a.get("pads", [0] * (2 * spatial))
        if list(pads[:spatial]) != list(pads[spatial:]) or a.get("output_shape"):
            raise ValueError(f"ConvTranspose '{node.name}': asymmetric pads / output_shape are not supported")
        conv = {1: self.F.conv_transpose1d, 2: self.F.conv_transpose2d, 3: self.F.conv_transpose3d}[spatial]
        return conv(x, w, b, a.get("strides", [1] * spatial), list(pads[:spatial]),
                    a.get("output_padding", [0] * spatial), a.get("group", 1), a.get("dilations", [1] * spatial))

    def _op_Gemm(self, node, ins, a):
        x, w = ins[0], ins[1]
        x = x.t() if a.get("transA", 0) else x
        w = w.t() if a.get("transB", 0) else w
        y = a.get("alpha", 1.0) * (x @ w)
        if len(ins) > 2 and ins[2] is not None:
            y = y + a.get("beta", 1.0) * ins[2]
        return y

    def _op_MatMul(self, node, ins, a):
        return self.torch.matmul(ins[0], ins[1])

    # -- elementwise -------------------------------------------------------------------------
    def _op_Add(self, node, ins, a):
        return ins[0] + ins[1]

    def _op_Sub(self, node, ins, a):
        return ins[0] - ins[1]

    def _op_Mul(self, node, ins, a):
        return ins[0] * ins[1]

    def _op_Div(self, node, ins, a):
        return ins[0] / ins[1]

    def _op_Pow(self, node, ins, a):
        return self.torch.pow(ins[0], ins[1])

    def _op_Max(self, node, ins, a):
        out = ins[0]
        for t in ins[1:]:
            out = self.torch.maximum(out, t)
        return out

    def _op_Min(self, node, ins, a):
        out = ins[0]
        for t in ins[1:]:
            out = self.torch.minimum(out, t)
        return out

    def _op_Sum(self, node, ins, a):
        out = ins[0]
        for t in ins[1:]:
            out = out + t
        return out

    def _op_Relu(self, node, ins, a):
        return self.F.relu(ins[0])

    def _op_LeakyRelu(self, node, ins, a):
        return self.F.leaky_relu(ins[0], a.get("alpha", 0.01))

    def _op_PRelu(self, node, ins, a):
        x, slope = ins
        return self.torch.where(x >= 0, x, x * slope)

    def _op_Elu(self, node, ins, a):
        return self.F.elu(ins[0], a.get("alpha", 1.0))

    def _op_Sigmoid(self, node, ins, a):
        return self.torch.sigmoid(ins[0])

    def _op_HardSigmoid(self, node, ins, a):
        return self.torch.clamp(a.get("alpha", 0.2) * ins[0] + a.get("beta", 0.5), 0.0, 1.0)

    def _op_HardSwish(self, node, ins, a):
        return self.F.hardswish(ins[0])

    def _op_Tanh(self, node, ins, a):
        return self.torch.tanh(ins[0])

    def _op_Softplus(self, node, ins, a):
        return self.F.softplus(ins[0])

    def _op_Gelu(self, node, ins, a):
        approx = a.get("approximate", b"none")
        return self.F.gelu(ins[0], approximate=approx.decode() if isinstance(approx, bytes) else approx)

    def _op_Erf(self, node, ins, a):
        return self.torch.erf(ins[0])

    def _op_Exp(self, node, ins, a):
        return self.torch.exp(ins[0])

    def _op_Log(self, node, ins, a):
        return self.torch.log(ins[0])

    def _op_Sqrt(self, node, ins, a):
        return self.torch.sqrt(ins[0])

    def _op_Neg(self, node, ins, a):
        return -ins[0]

    def _op_Abs(self, node, ins, a):
        return self.torch.abs(ins[0])

    def _op_Reciprocal(self, node, ins, a):
        return 1.0 / ins[0]

    def _op_Clip(self, node, ins, a):
        lo = ins[1] if len(ins) > 1 and ins[1] is not None else a.get("min")
        hi = ins[2] if len(ins) > 2 and ins[2] is not None else a.get("max")
        lo = None if lo is None else float(lo)
        hi = None if hi is None else float(hi)
        return self.torch.clamp(ins[0], lo, hi)

    def _op_Identity(self, node, ins, a):
        return ins[0]

    def _op_Dropout(self, node, ins, a):
        return ins[0]

    def _op_Cast(self, node, ins, a):
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(a["to"]))
        return ins[0].to({np.dtype("float32"): self.torch.float32, np.dtype("int64"): self.torch.int64,
                          np.dtype("int32"): self.torch.int32, np.dtype("float64"): self.torch.float64,
                          np.dtype("bool"): self.torch.bool}.get(dtype, self.torch.float32))

    def _softmax_axis(self, x, a) -> int:
        return a.get("axis", -1 if self.opset >= 13 else 1)

    def _op_Softmax(self, node, ins, a):
        return self.torch.softmax(ins[0], self._softmax_axis(ins[0], a))

    def _op_LogSoftmax(self, node, ins, a):
        return self.torch.log_softmax(ins[0], self._softmax_axis(ins[0], a))

    # -- normalisation and pooling -----------------------------------------------------------
    def _op_BatchNormalization(self, node, ins, a):
        x, scale, bias, mean, var = ins[:5]
        return self.F.batch_norm(x, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))

    def _op_InstanceNormalization(self, node, ins, a):
        return self.F.instance_norm(ins[0], weight=ins[1], bias=ins[2], eps=a.get("epsilon", 1e-5))

    def _op_LayerNormalization(self, node, ins, a):
        x = ins[0]
        axis = a.get("axis", -1) % x.dim()
        bias = ins[2] if len(ins) > 2 else None
        return self.F.layer_norm(x, tuple(x.shape[axis:]), ins[1], bias, a.get("epsilon", 1e-5))

    def _op_MaxPool(self, node, ins, a):
        kernel = list(a["kernel_shape"])
        spatial = len(kernel)
        x, padding = self._pads(ins[0], a, spatial, kernel, pad_value=float("-inf"))
        pool = {1: self.F.max_pool1d, 2: self.F.max_pool2d, 3: self.F.max_pool3d}[spatial]
        return pool(x, kernel, a.get("strides", [1] * spatial), padding, a.get("dilations", [1] * spatial),
                    ceil_mode=bool(a.get("ceil_mode", 0)))

    def _op_AveragePool(self, node, ins, a):
        kernel = list(a["kernel_shape"])
        spatial = len(kernel)
        x, padding = self._pads(ins[0], a, spatial, kernel)
        include = bool(a.get("count_include_pad", 0))
        if padding == [0] * spatial and a.get("pads") and any(a["pads"]) and not include:
            raise ValueError(f"AveragePool '{node.name}': asymmetric pads without count_include_pad")
        pool = {1: self.F.avg_pool1d, 2: self.F.avg_pool2d, 3: self.F.avg_pool3d}[spatial]
        return pool(x, kernel, a.get("strides", [1] * spatial), padding, ceil_mode=bool(a.get("ceil_mode", 0)),
                    count_include_pad=include)

    def _op_GlobalAveragePool(self, node, ins, a):
        return ins[0].mean(dim=tuple(range(2, ins[0].dim())), keepdim=True)

    def _op_GlobalMaxPool(self, node, ins, a):
        return ins[0].amax(dim=tuple(range(2, ins[0].dim())), keepdim=True)

    # -- shapes ------------------------------------------------------------------------------
    def _op_Flatten(self, node, ins, a):
        x = ins[0]
        axis = a.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
        return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)

    def _op_Reshape(self, node, ins, a):
        x, shape = ins[0], _ints(ins[1])
        if not a.get("allowzero", 0):
            shape = [int(x.shape[i]) if d == 0 else d for i, d in enumerate(shape)]
        return x.reshape(shape)

    def _op_Transpose(self, node, ins, a):
        perm = a.get("perm", list(range(ins[0].dim()))[::-1])
        return ins[0].permute(*perm)

    def _op_Concat(self, node, ins, a):
        return self.torch.cat(list(ins), dim=a["axis"])

    def _axes(self, ins, a):
        if "axes" in a:
            return list(a["axes"])
        return _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else None

    def _op_Squeeze(self, node, ins, a):
        axes = self._axes(ins, a)
        x = ins[0]
        if axes is None:
            return x.squeeze()
        for ax in sorted((ax % x.dim() for ax in axes), reverse=True):
            x = x.squeeze(ax)
        return x

    def _op_Unsqueeze(self, node, ins, a):
        x = ins[0]
        axes = self._axes(ins, a)
        rank = x.dim() + len(axes)
        for ax in sorted(ax % rank for ax in axes):
            x = x.unsqueeze(ax)
        return x

    def _reduce(self, x, ins, a, fn):
        axes = self._axes(ins, a)
        keep = bool(a.get("keepdims", 1))
        if axes is None or not axes:
            axes = list(range(x.dim()))
        return fn(x, dim=tuple(ax % x.dim() for ax in axes), keepdim=keep)

    def _op_ReduceMean(self, node, ins, a):
        return self._reduce(ins[0], ins, a, self.torch.mean)

    def _op_ReduceSum(self, node, ins, a):
        return self._reduce(ins[0], ins, a, self.torch.sum)

    def _op_ReduceMax(self, node, ins, a):
        return self._reduce(ins[0], ins, a, self.torch.amax)

    def _op_Pad(self, node, ins, a):
        x = ins[0]
        mode = a.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        pads = _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else list(a.get("pads", []))
        value = float(ins[2]) if len(ins) > 2 and ins[2] is not None else float(a.get("value", 0.0))
        rank = x.dim()
        pairs = []
        for i in reversed(range(rank)):
            pairs += [pads[i], pads[i + rank]]
        while len(pairs) > 2 and pairs[-2:] == [0, 0]:
            pairs = pairs[:-2]
        return self.F.pad(x, pairs, mode={"constant": "constant", "reflect": "reflect", "edge": "replicate"}[mode],
                          value=value if mode == "constant" else None)

    def _op_Shape(self, node, ins, a):
        return self.torch.tensor(list(ins[0].shape), dtype=self.torch.int64)

    def _op_Gather(self, node, ins, a):
        x, idx = ins
        return self.torch.index_select(x, a.get("axis", 0), idx.reshape(-1).long()).reshape(
            tuple(x.shape[:a.get("axis", 0)]) + tuple(idx.shape) + tuple(x.shape[a.get("axis", 0) + 1:]))

    def _op_Constant(self, node, ins, a):
        return self.torch.from_numpy(np.array(numpy_helper.to_array(a["value"])))
