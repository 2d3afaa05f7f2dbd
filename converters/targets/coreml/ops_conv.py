"""Convolutions, linear layers and pooling → MIL."""

from __future__ import annotations

import math

import numpy as np

from edgeopt.converters.targets.coreml.rules import LoweringError, all_of, only, rule

AUTO_PAD = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


def _explicit_pads(attrs, spatial: tuple[int, ...], kernel, strides, dilations) -> list[int]:
    """ONNX padding (explicit ``pads`` or ``auto_pad``) as MIL's custom pad: [begin0, end0, begin1, ...].

    SAME_* paddings are computed here rather than left to MIL's "same", whose split of an odd total
    differs between ops and opsets; explicit pads mean the same thing everywhere.
    """
    n = len(spatial)
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = list(attrs.get("pads", [0] * 2 * n))
        begins, ends = pads[:n], pads[n:]
    elif auto == "VALID":
        begins, ends = [0] * n, [0] * n
    else:
        begins, ends = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else big)
            ends.append(big if auto == "SAME_UPPER" else small)
    return [int(p) for pair in zip(begins, ends, strict=True) for p in pair]


def _spatial_params(attrs, n: int, kernel=None):
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    kernel = list(attrs.get("kernel_shape", kernel if kernel is not None else []))
    return kernel, strides, dilations


@rule("Conv", check=only(auto_pad=AUTO_PAD), const_inputs=(1, 2))
def conv(cx, node, attrs):
    return cx.mb.conv(**_conv_operands(cx, node, attrs, max_dims=3, supported="1 to 3"), name=cx.name())


def _conv_operands(cx, node, attrs, max_dims: int, supported: str) -> dict:
    """The arguments ``mb.conv`` and ``mb.conv_transpose`` share, from an ONNX Conv / ConvTranspose."""
    x = cx.input(node, 0)
    weight = cx.const(node, 1).astype(np.float32)
    shape = cx.shape(x)
    n = len(shape) - 2
    if not 1 <= n <= max_dims:
        raise LoweringError(f"{node.op_type} over {n} spatial dims (Core ML supports {supported})")
    kernel, strides, dilations = _spatial_params(attrs, n, list(weight.shape[2:]))
    pad = _explicit_pads(attrs, shape[2:], kernel, strides, dilations)
    bias = cx.const(node, 2).astype(np.float32) if cx.has(node, 2) else None
    return {"x": x, "weight": weight, "bias": bias, "strides": strides, "pad_type": "custom", "pad": pad,
            "dilations": dilations, "groups": int(attrs.get("group", 1))}


def _no_output_padding(node, attrs):
    if any(attrs.get("output_padding", [])):
        return f"output_padding={list(attrs['output_padding'])}"
    if "output_shape" in attrs:
        return "output_shape"
    return None


@rule("ConvTranspose", check=all_of(only(auto_pad=("NOTSET", "VALID")), _no_output_padding), const_inputs=(1, 2))
def conv_transpose(cx, node, attrs):
    return cx.mb.conv_transpose(**_conv_operands(cx, node, attrs, max_dims=2, supported="1 and 2"), name=cx.name())


@rule("Gemm")
def gemm(cx, node, attrs):
    a, b = cx.input(node, 0), cx.input(node, 1)
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    trans_a, trans_b = bool(attrs.get("transA", 0)), bool(attrs.get("transB", 0))
    c = cx.input(node, 2) if cx.has(node, 2) else None
    if trans_a:
        a = cx.mb.transpose(x=a, perm=[1, 0])
    if isinstance(b, np.ndarray):
        weight = (b if trans_b else b.T).astype(np.float32) * np.float32(alpha)  # linear takes [out, in]
        n_out = weight.shape[0]
        bias = None
        if isinstance(c, np.ndarray) and c.size in (1, n_out) and (c.ndim < 2 or c.shape[0] == 1):
            bias = np.broadcast_to(c.astype(np.float32).reshape(-1) * np.float32(beta), (n_out,)).copy()
            c = None
        y = cx.mb.linear(x=a, weight=np.ascontiguousarray(weight), bias=bias,
                         **cx.name_if(c is None))
    else:
        y = cx.mb.matmul(x=a, y=b, transpose_y=trans_b)
        if alpha != 1.0:
            y = cx.mb.mul(x=y, y=np.float32(alpha))
        if c is None:
            return cx.mb.identity(x=y, name=cx.name())
    if c is None:
        return y
    c = c.astype(np.float32) * np.float32(beta) if isinstance(c, np.ndarray) else (
        cx.mb.mul(x=c, y=np.float32(beta)) if beta != 1.0 else c)
    return cx.mb.add(x=y, y=c, name=cx.name())


@rule("MatMul")
def matmul(cx, node, attrs):
    a, b = cx.input(node, 0), cx.input(node, 1)
    if isinstance(a, np.ndarray):
        a = a.astype(np.float32)
    if isinstance(b, np.ndarray):
        b = b.astype(np.float32)
    return cx.mb.matmul(x=a, y=b, name=cx.name())


def _pool_geometry(cx, attrs, shape):
    n = len(shape) - 2
    if not 1 <= n <= 3:
        raise LoweringError(f"pooling over {n} spatial dims (Core ML supports 1 to 3)")
    kernel, strides, dilations = _spatial_params(attrs, n)
    if any(d != 1 for d in dilations):
        raise LoweringError(f"dilated pooling (dilations={dilations})")
    pad = _explicit_pads(attrs, shape[2:], kernel, strides, dilations)
    extra = [0] * n
    if attrs.get("ceil_mode", 0):
        # ONNX ceil mode: one more window where the input runs out, unless it would start in the
        # right padding. Core ML's own ceil mode needs symmetric pads, so add the extra end padding.
        for i, (size, k, s) in enumerate(zip(shape[2:], kernel, strides, strict=True)):
            begin, end = pad[2 * i], pad[2 * i + 1]
            out = math.ceil((size + begin + end - k) / s) + 1
            if (out - 1) * s >= size + begin:
                out -= 1
            extra[i] = max(0, (out - 1) * s + k - (size + begin + end))
            pad[2 * i + 1] += extra[i]
    return kernel, strides, pad, extra


def _single_output(node, attrs):
    if len([o for o in node.output if o]) > 1:
        return "the Indices output"
    return None


@rule("MaxPool", check=all_of(only(auto_pad=AUTO_PAD, storage_order=0), _single_output))
def max_pool(cx, node, attrs):
    x = cx.input(node, 0)
    kernel, strides, pad, _ = _pool_geometry(cx, attrs, cx.shape(x))
    return cx.mb.max_pool(x=x, kernel_sizes=kernel, strides=strides, pad_type="custom", pad=pad, name=cx.name())


@rule("AveragePool", check=only(auto_pad=AUTO_PAD))
def avg_pool(cx, node, attrs):
    x = cx.input(node, 0)
    kernel, strides, pad, extra = _pool_geometry(cx, attrs, cx.shape(x))
    include_pad = bool(attrs.get("count_include_pad", 0))
    if include_pad and any(extra):
        raise LoweringError("ceil_mode with count_include_pad=1 (windows past the padded input)")
    return cx.mb.avg_pool(x=x, kernel_sizes=kernel, strides=strides, pad_type="custom", pad=pad,
                          exclude_padding_from_average=not include_pad, name=cx.name())
