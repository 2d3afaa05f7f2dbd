"""Reductions, Softmax / LogSoftmax and the normalizations built from them (InstanceNorm, LayerNorm).

Reduction axes are mapped through the input's stored axis order, so a reduction over the spatial
axes of a channels-last tensor needs no transpose.
"""

from __future__ import annotations

import numpy as np

from edgeopt.converters.targets.tflite import layout
from edgeopt.converters.targets.tflite.lowering import Lowering, Node, lowers

_REDUCE = {"ReduceMean": "MEAN", "ReduceMax": "REDUCE_MAX", "ReduceMin": "REDUCE_MIN", "ReduceSum": "SUM"}


def _reduce_axes(ctx: Lowering, node: Node, rank: int) -> list[int] | None:
    """The reduced ONNX axes; None means the node is a no-op (empty axes with noop_with_empty_axes)."""
    if node.has_input(1):
        axes = ctx.const(node.inputs[1]).astype(np.int64).ravel().tolist()
    else:
        axes = node.attr("axes", [])
    if not axes:
        return None if node.attr("noop_with_empty_axes", 0) else list(range(rank))
    return sorted({int(a) % rank for a in axes})


def reduce(ctx: Lowering, builtin: str, name: str, axes: list[int], keepdims: bool, out_name: str,
           hint: str) -> None:
    """Reduce ONNX value ``name`` over ONNX ``axes`` into ONNX value ``out_name`` (any stored order)."""
    rank = ctx.rank(name)
    x, perm = ctx.get_stored(name)
    stored_axes = sorted(layout.axis_in(a, perm) for a in axes)
    if keepdims:
        out_perm = perm
    else:
        # the remaining axes keep their stored order; renumber them as ONNX axes of the output
        remaining = [a for a in range(rank) if a not in axes]
        out_perm = None if perm is None else tuple(remaining.index(p) for p in perm if p not in axes)
    out = ctx.output(out_name, out_perm)
    ctx.op(builtin, [x, ctx.const_tensor(np.array(stored_axes, np.int32), hint + "/axes")], [out],
           "ReducerOptions", keepDims=bool(keepdims))


@lowers(*_REDUCE, constant_inputs=(1,))
def lower_reduce(ctx: Lowering, node: Node) -> None:
    name = node.inputs[0]
    axes = _reduce_axes(ctx, node, ctx.rank(name))
    if axes is None:
        x, perm = ctx.get_stored(name)
        ctx.alias(node.outputs[0], x, perm)
        return
    reduce(ctx, _REDUCE[node.op], name, axes, bool(node.attr("keepdims", 1)), node.outputs[0], node.name)


# -- Softmax / LogSoftmax -----------------------------------------------------------------------------
@lowers("Softmax", "LogSoftmax")
def lower_softmax(ctx: Lowering, node: Node) -> None:
    """TFLite normalizes over the last stored axis. From opset 13 ONNX normalizes over one axis: store
    the input with that axis last (a transpose only when it is not already). Before opset 13 the input
    is flattened to 2-D at ``axis`` and normalized over the second part."""
    name = node.inputs[0]
    rank = ctx.rank(name)
    builtin = "SOFTMAX" if node.op == "Softmax" else "LOG_SOFTMAX"
    opts = {"options_type": "SoftmaxOptions", "beta": 1.0} if builtin == "SOFTMAX" else {}
    if ctx.opset >= 13:
        axis = int(node.attr("axis", -1)) % rank
        x, perm = ctx.get_stored(name)
        if layout.axis_in(axis, perm) != rank - 1:
            perm = tuple(a for a in range(rank) if a != axis) + (axis,)
            x = ctx.get(name, perm)
        out = ctx.output(node.outputs[0], perm)
        ctx.op(builtin, [x], [out], **opts)
        return
    axis = int(node.attr("axis", 1)) % rank
    shape = ctx.shape(name)
    rows, cols = int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))
    x, perm = ctx.get_stored(name)
    if not layout.same_memory_order(shape, perm):
        x = ctx.get(name)
    flat = ctx.reshape(x, (rows, cols), f"{node.name}/2d")
    normed = ctx.tmp(f"{node.name}/normed", (rows, cols))
    ctx.op(builtin, [flat], [normed], **opts)
    ctx.reshape(normed, shape, node.name, out=ctx.output(node.outputs[0]))


# -- normalizations -----------------------------------------------------------------------------------
def _normalize(ctx: Lowering, node: Node, name: str, axes: list[int], eps: float,
               out_perm) -> tuple[int, int, int]:
    """(x - mean) / sqrt(var + eps) over ONNX ``axes`` of a value stored with ``out_perm``;
    returns the normalized tensor, the mean and 1 / sqrt(var + eps) (reduced axes kept as 1)."""
    n = node.name
    x = ctx.get(name, out_perm)
    stored_axes = np.array(sorted(layout.axis_in(a, out_perm) for a in axes), np.int32)
    axes_t = ctx.const_tensor(stored_axes, f"{n}/axes")
    reduced_shape = tuple(1 if i in stored_axes else d for i, d in enumerate(ctx.b.shape(x)))
    mean = ctx.tmp(f"{n}/mean", reduced_shape)
    ctx.op("MEAN", [x, axes_t], [mean], "ReducerOptions", keepDims=True)
    centered = ctx.binary("SUB", x, mean, f"{n}/centered")
    var = ctx.tmp(f"{n}/var", reduced_shape)
    ctx.op("MEAN", [ctx.binary("MUL", centered, centered, f"{n}/sq"), axes_t], [var], "ReducerOptions",
           keepDims=True)
    inv_std = ctx.unary("RSQRT", ctx.binary("ADD", var, ctx.const_tensor(np.array(eps, np.float32), f"{n}/eps"),
                                            f"{n}/var_eps"), f"{n}/inv_std")
    return ctx.binary("MUL", centered, inv_std, f"{n}/normalized"), mean, inv_std


@lowers("InstanceNormalization", constant_inputs=(1, 2))
def lower_instance_norm(ctx: Lowering, node: Node) -> None:
    name = node.inputs[0]
    rank = ctx.rank(name)
    perm = layout.channels_last(rank)
    normed, _, _ = _normalize(ctx, node, name, list(range(2, rank)), float(node.attr("epsilon", 1e-5)), perm)
    per_channel = (1,) * (rank - 1) + (-1,)
    scale = ctx.const(node.inputs[1]).astype(np.float32).reshape(per_channel)
    bias = ctx.const(node.inputs[2]).astype(np.float32).reshape(per_channel)
    scaled = ctx.binary("MUL", normed, ctx.const_tensor(scale, f"{node.name}/scale"), f"{node.name}/scaled")
    out = ctx.output(node.outputs[0], perm)
    ctx.op("ADD", [scaled, ctx.const_tensor(bias, f"{node.name}/bias")], [out], "AddOptions",
           fusedActivationFunction=0)


@lowers("LayerNormalization", constant_inputs=(1, 2))
def lower_layer_norm(ctx: Lowering, node: Node) -> None:
    name = node.inputs[0]
    rank = ctx.rank(name)
    axis = int(node.attr("axis", -1)) % rank
    perm = ctx.perm(name)
    normed, mean, inv_std = _normalize(ctx, node, name, list(range(axis, rank)), float(node.attr("epsilon", 1e-5)),
                                       perm)
    scaled = ctx.binary("MUL", normed, ctx.broadcast_to_rank(node.inputs[1], rank, perm), f"{node.name}/scaled")
    out = ctx.output(node.outputs[0], perm)
    if node.has_input(2):
        ctx.op("ADD", [scaled, ctx.broadcast_to_rank(node.inputs[2], rank, perm)], [out], "AddOptions",
               fusedActivationFunction=0)
    else:
        ctx.reshape(scaled, ctx.b.shape(out), node.name, out=out)
    # the optional Mean and InvStdDev outputs (reduced axes kept as size 1, same axis order)
    for index, tensor in ((1, mean), (2, inv_std)):
        if len(node.outputs) > index and node.outputs[index]:
            extra = ctx.output(node.outputs[index], perm)
            ctx.reshape(tensor, ctx.b.shape(extra), node.outputs[index], out=extra)
