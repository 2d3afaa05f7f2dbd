"""Convolutions and pools: channels-last in, channels-last out, so consecutive layers need no
transposes. 1-D variants run as 2-D with a height of 1 (a free reshape in NLC order). ONNX's
explicit padding becomes TFLite SAME / VALID when it is equivalent, else an explicit PAD (or PADV2
with -inf for max pooling) followed by VALID.
"""

from __future__ import annotations

import math

import numpy as np

from edgeopt.converters.targets.tflite import layout
from edgeopt.converters.targets.tflite.flatbuffer import schema
from edgeopt.converters.targets.tflite.lowering import GraphFacts, Lowering, LoweringError, Node, lowers

FLOAT_LOWEST = float(np.finfo(np.float32).min)


# -- padding --------------------------------------------------------------------------------------
def spatial_pads(node: Node, in_sizes, kernel_eff, strides) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial axis, from ``pads`` or ``auto_pad``."""
    n = len(in_sizes)
    auto = node.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for size, k, s in zip(in_sizes, kernel_eff, strides, strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            small, big = total // 2, total - total // 2
            out.append((small, big) if auto == "SAME_UPPER" else (big, small))
        return out
    if auto == "VALID":
        return [(0, 0)] * n
    pads = list(node.attr("pads", [0] * (2 * n)))
    return [(int(pads[i]), int(pads[i + n])) for i in range(n)]


def tf_padding(pads, in_sizes, out_sizes, kernel_eff, strides) -> str | None:
    """'VALID' or 'SAME' when TFLite's padding gives exactly these pads and output sizes, else None."""
    if all(p == (0, 0) for p in pads) and all(
            o == (i - k) // s + 1 for i, o, k, s in zip(in_sizes, out_sizes, kernel_eff, strides, strict=True)):
        return "VALID"
    for (b, e), i, o, k, s in zip(pads, in_sizes, out_sizes, kernel_eff, strides, strict=True):
        total = max((math.ceil(i / s) - 1) * s + k - i, 0)
        if o != math.ceil(i / s) or (b, e) != (total // 2, total - total // 2):
            return None
    return "SAME"


def padding_enum(name: str) -> int:
    return getattr(schema().Padding, name)


def pad_spatial(ctx: Lowering, x: int, pads, hint: str, value: float | None = None) -> int:
    """PAD (zeros) or PADV2 (``value``) on the spatial axes of a channels-last tensor."""
    shape = ctx.b.shape(x)
    paddings = np.array([[0, 0], *[[b, e] for b, e in pads], [0, 0]], np.int32)
    out = ctx.tmp(hint, [d + int(p.sum()) for d, p in zip(shape, paddings, strict=True)])
    table = ctx.const_tensor(paddings, hint + "/paddings")
    if value is None:
        ctx.op("PAD", [x, table], [out])
    else:
        ctx.op("PADV2", [x, table, ctx.const_tensor(np.array(value, np.float32), hint + "/value")], [out])
    return out


# -- geometry shared by convolutions and pools -------------------------------------------------------
class Window:
    """Kernel, strides, dilations and pads of a conv/pool node, always as 2-D (1-D gets height 1)."""

    def __init__(self, node: Node, in_shape, out_shape, kernel):
        self.spatial = len(in_shape) - 2
        strides = list(node.attr("strides", [1] * self.spatial))
        dilations = list(node.attr("dilations", [1] * self.spatial))
        kernel = list(kernel)
        in_sizes, out_sizes = list(in_shape[2:]), list(out_shape[2:])
        eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
        pads = spatial_pads(node, in_sizes, eff, strides)
        if self.spatial == 1:
            strides, dilations, kernel, eff = [1, *strides], [1, *dilations], [1, *kernel], [1, *eff]
            in_sizes, out_sizes, pads = [1, *in_sizes], [1, *out_sizes], [(0, 0), *pads]
        self.strides, self.dilations, self.kernel, self.eff = strides, dilations, kernel, eff
        self.in_sizes, self.out_sizes, self.pads = in_sizes, out_sizes, pads

    def ceil_overhang(self) -> list[int]:
        """Extra end padding that ceil_mode needs for the last window, per axis."""
        return [max((o - 1) * s + k - (i + b + e), 0) for o, s, k, i, (b, e)
                in zip(self.out_sizes, self.strides, self.eff, self.in_sizes, self.pads, strict=True)]


def _as_2d(ctx: Lowering, x: int, spatial: int, hint: str) -> int:
    """A channels-last 1-D tensor (N, L, C) as (N, 1, L, C)."""
    if spatial == 2:
        return x
    n, length, c = ctx.b.shape(x)
    return ctx.reshape(x, (n, 1, length, c), hint + "/as2d")


def _finish_2d(ctx: Lowering, name: str, spatial: int, produce) -> None:
    """Create the channels-last output of ONNX value ``name`` and let ``produce(tensor_2d)`` write it."""
    rank = ctx.rank(name)
    if spatial == 2:
        produce(ctx.output(name, layout.channels_last(rank)))
        return
    n, c, length = ctx.shape(name)
    tmp = ctx.tmp(name + "/2d", (n, 1, length, c))
    produce(tmp)
    ctx.reshape(tmp, (n, length, c), name, out=ctx.output(name, layout.channels_last(rank)))


def _check_spatial_rank(node: Node, facts: GraphFacts, weight_input: int | None = None) -> str | None:
    if weight_input is not None and facts.with_graph:
        w = facts.const(node.inputs[weight_input])
        if w is not None and w.ndim not in (3, 4):
            return f"{w.ndim - 2}-D kernels"
    kernel = node.attr("kernel_shape")
    if kernel is not None and len(kernel) not in (1, 2):
        return f"{len(kernel)}-D kernels"
    return None


# -- Conv -------------------------------------------------------------------------------------------
def _check_conv(node: Node, facts: GraphFacts) -> str | None:
    return _check_spatial_rank(node, facts, weight_input=1)


@lowers("Conv", check=_check_conv, constant_inputs=(1, 2))
def lower_conv(ctx: Lowering, node: Node) -> None:
    w = ctx.const(node.inputs[1]).astype(np.float32)
    m = w.shape[0]
    bias = ctx.const(node.inputs[2]).astype(np.float32) if node.has_input(2) else np.zeros(m, np.float32)
    in_shape, out_shape = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
    c, group = in_shape[1], int(node.attr("group", 1))
    win = Window(node, in_shape, out_shape, w.shape[2:])
    if win.spatial == 1:
        w = w[:, :, None, :]
    x = _as_2d(ctx, ctx.get_channels_last(node.inputs[0]), win.spatial, node.inputs[0])
    padding = tf_padding(win.pads, win.in_sizes, win.out_sizes, win.eff, win.strides)
    if padding is None:
        x = pad_spatial(ctx, x, win.pads, f"{node.name}/pad")
        padding = "VALID"
    common = dict(padding=padding_enum(padding), strideH=win.strides[0], strideW=win.strides[1],
                  dilationHFactor=win.dilations[0], dilationWFactor=win.dilations[1], fusedActivationFunction=0)
    bias_t = ctx.const_tensor(bias, f"{node.name}/bias")

    def produce(out: int) -> None:
        if group == c and group > 1 and m % c == 0:
            # depthwise: output channel ci * multiplier + k reads input channel ci, as in ONNX
            kh, kw = w.shape[2:]
            filt = ctx.const_tensor(w.reshape(m, kh, kw).transpose(1, 2, 0)[None], f"{node.name}/filter")
            ctx.op("DEPTHWISE_CONV_2D", [x, filt, bias_t], [out], "DepthwiseConv2DOptions",
                   depthMultiplier=m // c, **common)
        else:
            # group == 1, or grouped: TFLite infers the groups from the filter's input depth (C / group)
            filt = ctx.const_tensor(w.transpose(0, 2, 3, 1), f"{node.name}/filter")
            ctx.op("CONV_2D", [x, filt, bias_t], [out], "Conv2DOptions", **common)

    _finish_2d(ctx, node.outputs[0], win.spatial, produce)


# -- ConvTranspose ------------------------------------------------------------------------------------
def _check_conv_transpose(node: Node, facts: GraphFacts) -> str | None:
    if int(node.attr("group", 1)) != 1:
        return "group > 1"
    if any(d != 1 for d in node.attr("dilations", [])):
        return "dilations"
    return _check_spatial_rank(node, facts, weight_input=1)


@lowers("ConvTranspose", check=_check_conv_transpose, constant_inputs=(1, 2))
def lower_conv_transpose(ctx: Lowering, node: Node) -> None:
    """TRANSPOSE_CONV with VALID padding computes the full (in - 1) * stride + kernel output; the
    ONNX pads are then cropped off with a STRIDED_SLICE (output_padding extends past the full
    output with zeros, which TFLite writes when the output shape asks for them)."""
    w = ctx.const(node.inputs[1]).astype(np.float32)  # (C, M, kh, kw)
    m = w.shape[1]
    bias = ctx.const(node.inputs[2]).astype(np.float32) if node.has_input(2) else np.zeros(m, np.float32)
    in_shape, out_shape = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
    spatial = len(in_shape) - 2
    if spatial == 1:
        w = w[:, :, None, :]
    kernel = list(w.shape[2:])
    strides = list(node.attr("strides", [1] * spatial))
    in_sizes, out_sizes = list(in_shape[2:]), list(out_shape[2:])
    if spatial == 1:
        strides, in_sizes, out_sizes = [1, *strides], [1, *in_sizes], [1, *out_sizes]
    full = [(i - 1) * s + k for i, s, k in zip(in_sizes, strides, kernel, strict=True)]
    begins = _conv_transpose_pad_begins(node, spatial, in_sizes, out_sizes, full)
    span = [max(f, b + o) for f, b, o in zip(full, begins, out_sizes, strict=True)]
    x = _as_2d(ctx, ctx.get_channels_last(node.inputs[0]), spatial, node.inputs[0])
    n = in_shape[0]
    if kernel == strides and kernel[0] == kernel[1] > 1 and span == out_sizes and not any(begins):
        _finish_2d(ctx, node.outputs[0], spatial, lambda out: _patch_conv_transpose(ctx, node, x, w, bias, out))
        return
    full_t = ctx.tmp(f"{node.name}/full", (n, *span, m))
    ctx.op("TRANSPOSE_CONV",
           [ctx.const_tensor(np.array([n, *span, m], np.int32), f"{node.name}/output_shape"),
            ctx.const_tensor(w.transpose(1, 2, 3, 0), f"{node.name}/filter"), x,
            ctx.const_tensor(bias, f"{node.name}/bias")],
           [full_t], "TransposeConvOptions", padding=padding_enum("VALID"), strideH=strides[0],
           strideW=strides[1], fusedActivationFunction=0)

    def produce(out: int) -> None:
        if span == out_sizes:
            ctx.reshape(full_t, ctx.b.shape(out), node.name, out=out)
            return
        begin = np.array([0, *begins, 0], np.int32)
        end = np.array([n, *[b + o for b, o in zip(begins, out_sizes, strict=True)], m], np.int32)
        ctx.op("STRIDED_SLICE", [full_t, ctx.const_tensor(begin, f"{node.name}/begin"),
                                 ctx.const_tensor(end, f"{node.name}/end"),
                                 ctx.const_tensor(np.ones(4, np.int32), f"{node.name}/strides")],
               [out], "StridedSliceOptions", beginMask=0, endMask=0, ellipsisMask=0, newAxisMask=0,
               shrinkAxisMask=0, offset=False)

    _finish_2d(ctx, node.outputs[0], spatial, produce)


def _patch_conv_transpose(ctx: Lowering, node: Node, x: int, w: np.ndarray, bias: np.ndarray, out: int) -> None:
    """A transposed convolution whose stride equals its (square) kernel writes each input pixel's
    k x k output patch alone, without overlap: that is a 1x1 CONV_2D to k*k*M channels and a
    DEPTH_TO_SPACE. XNNPACK runs those far faster than TRANSPOSE_CONV: on a 2x2/2 upsampling layer
    0.61 vs 16.1 ms in INT8 and 0.89 vs 3.2 ms in float (docs/benchmarks.md, int8_speed)."""
    c, m, k = w.shape[0], w.shape[1], w.shape[2]
    n, h, wd, _ = ctx.b.shape(x)
    # DEPTH_TO_SPACE: channel (dy * k + dx) * M + co of pixel (y, x) goes to pixel (y*k + dy, x*k + dx), channel co
    filt = w.transpose(2, 3, 1, 0).reshape(k * k * m, c)[:, None, None, :]
    patches = ctx.tmp(f"{node.name}/patches", (n, h, wd, k * k * m))
    ctx.op("CONV_2D", [x, ctx.const_tensor(filt, f"{node.name}/filter"),
                       ctx.const_tensor(np.tile(bias, k * k), f"{node.name}/bias")],
           [patches], "Conv2DOptions", padding=padding_enum("VALID"), strideH=1, strideW=1, dilationHFactor=1,
           dilationWFactor=1, fusedActivationFunction=0)
    ctx.op("DEPTH_TO_SPACE", [patches], [out], "DepthToSpaceOptions", blockSize=k)


def _conv_transpose_pad_begins(node: Node, spatial: int, in_sizes, out_sizes, full) -> list[int]:
    """How many leading rows/columns of the full transposed-conv output ONNX drops."""
    auto = node.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER") or (node.attr("output_shape") and not node.attr("pads")):
        out_pad = list(node.attr("output_padding", [0] * spatial))
        if spatial == 1:
            out_pad = [0, *out_pad]
        begins = []
        for f, o, op in zip(full, out_sizes, out_pad, strict=True):
            total = f + op - o
            # ONNX: SAME_UPPER puts the odd row at the end (pads begin = total // 2); SAME_LOWER, and an
            # output_shape without auto_pad, put it at the begin
            begins.append(total // 2 if auto == "SAME_UPPER" else total - total // 2)
        return begins
    if auto == "VALID":
        return [0] * len(full)
    pads = list(node.attr("pads", [0] * (2 * spatial)))
    begins = [int(pads[i]) for i in range(spatial)]
    return [0, *begins] if spatial == 1 else begins


# -- pools ------------------------------------------------------------------------------------------
def _check_pool(node: Node, facts: GraphFacts) -> str | None:
    if len([o for o in node.outputs if o]) > 1:
        return "Indices output"
    if any(d != 1 for d in node.attr("dilations", [])):
        return "dilations"
    return _check_spatial_rank(node, facts)


@lowers("MaxPool", "AveragePool", check=_check_pool)
def lower_pool(ctx: Lowering, node: Node) -> None:
    in_shape, out_shape = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
    win = Window(node, in_shape, out_shape, node.attr("kernel_shape"))
    x = _as_2d(ctx, ctx.get_channels_last(node.inputs[0]), win.spatial, node.inputs[0])
    overhang = win.ceil_overhang()
    padded = [(b, e + extra) for (b, e), extra in zip(win.pads, overhang, strict=True)]
    is_max = node.op == "MaxPool"
    include_pad = bool(node.attr("count_include_pad", 0))
    padding = None if any(overhang) else tf_padding(win.pads, win.in_sizes, win.out_sizes, win.eff, win.strides)
    if padding == "SAME" and not is_max and include_pad:
        padding = None  # TFLite's SAME average excludes the padding from the count
    correction = None
    if padding is None:
        x = pad_spatial(ctx, x, padded, f"{node.name}/pad", value=FLOAT_LOWEST if is_max else None)
        padding = "VALID"
        if not is_max:
            correction = _average_correction(win, include_pad)
    opts = dict(padding=padding_enum(padding), strideH=win.strides[0], strideW=win.strides[1],
                filterHeight=win.kernel[0], filterWidth=win.kernel[1], fusedActivationFunction=0)
    builtin = "MAX_POOL_2D" if is_max else "AVERAGE_POOL_2D"

    def produce(out: int) -> None:
        if correction is None:
            ctx.op(builtin, [x], [out], "Pool2DOptions", **opts)
            return
        pooled = ctx.tmp(f"{node.name}/pooled", ctx.b.shape(out))
        ctx.op(builtin, [x], [pooled], "Pool2DOptions", **opts)
        ctx.op("MUL", [pooled, ctx.const_tensor(correction, f"{node.name}/divisor")], [out], "MulOptions",
               fusedActivationFunction=0)

    _finish_2d(ctx, node.outputs[0], win.spatial, produce)


def _average_correction(win: Window, include_pad: bool) -> np.ndarray:
    """Per-position factor turning a VALID average over the zero-padded input into ONNX's average:
    kernel area / number of counted elements (the input only, or the input plus explicit pads)."""
    counts = []
    for o, s, k, i, (b, e) in zip(win.out_sizes, win.strides, win.kernel, win.in_sizes, win.pads, strict=True):
        lo, hi = (-b, i + e) if include_pad else (0, i)
        starts = np.arange(o) * s - b
        counts.append(np.clip(np.minimum(starts + k, hi) - np.maximum(starts, lo), 1, None))
    area = win.kernel[0] * win.kernel[1]
    return (area / np.outer(counts[0], counts[1])).astype(np.float32)[None, :, :, None]


@lowers("GlobalAveragePool", "GlobalMaxPool")
def lower_global_pool(ctx: Lowering, node: Node) -> None:
    rank = ctx.rank(node.inputs[0])
    x = ctx.get_channels_last(node.inputs[0])
    axes = ctx.const_tensor(np.arange(1, rank - 1, dtype=np.int32), f"{node.name}/axes")
    out = ctx.output(node.outputs[0], layout.channels_last(rank))
    ctx.op("MEAN" if node.op == "GlobalAveragePool" else "REDUCE_MAX", [x, axes], [out], "ReducerOptions",
           keepDims=True)


__all__ = ["LoweringError", "lower_conv", "lower_pool"]
