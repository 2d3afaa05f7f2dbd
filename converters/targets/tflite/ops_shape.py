"""Shape and data-movement operators: Reshape-like ops (Reshape, Flatten, Squeeze, Unsqueeze),
Transpose, Concat, Split, Slice, Gather and Pad.

Reshapes need the ONNX memory order, unless only size-1 axes differ (GlobalAveragePool → Flatten
reads the channels-last tensor as is). Transpose costs nothing: its output is recorded as the same
tensor in another axis order, and a transpose is only emitted if a later consumer needs it.
Axis-taking ops map their axes through the input's stored order.
"""

from __future__ import annotations

import numpy as np

from edgeopt.converters.targets.tflite import layout
from edgeopt.converters.targets.tflite.lowering import GraphFacts, Lowering, LoweringError, Node, lowers


@lowers("Constant", float_only=False)
def lower_constant(ctx: Lowering, node: Node) -> None:
    """Constants are folded into the operators that read them (see ``Lowering.const``)."""


# -- reshapes ---------------------------------------------------------------------------------------
def _check_reshape(node: Node, facts: GraphFacts) -> str | None:
    if node.op == "Reshape" and node.attr("allowzero", 0) and facts.with_graph:
        shape = facts.const(node.inputs[1]) if node.has_input(1) else None
        if shape is not None and (shape == 0).any():
            return "allowzero with a 0 dim"
    return None


@lowers("Reshape", check=_check_reshape, constant_inputs=(1,))
@lowers("Flatten", "Squeeze", "Unsqueeze", constant_inputs=(1,))
def lower_reshape(ctx: Lowering, node: Node) -> None:
    """Every reshape-like op becomes one RESHAPE to the ONNX output shape (known statically)."""
    name = node.inputs[0]
    x, perm = ctx.get_stored(name)
    if not layout.same_memory_order(ctx.shape(name), perm):
        x = ctx.get(name)
    out = ctx.output(node.outputs[0])
    ctx.reshape(x, ctx.shape(node.outputs[0]), node.name, out=out)


@lowers("Transpose")
def lower_transpose(ctx: Lowering, node: Node) -> None:
    name = node.inputs[0]
    rank = ctx.rank(name)
    t = tuple(node.attr("perm", list(range(rank))[::-1]))
    x, stored = ctx.get_stored(name)
    stored = stored or layout.identity(rank)
    # stored = in.T(stored) and out = in.T(t), so the stored tensor is out.T(inverse(t) ∘ stored)
    ctx.alias(node.outputs[0], x, layout.compose(layout.inverse(t), stored))


# -- Concat / Split -----------------------------------------------------------------------------------
def _common_perm(ctx: Lowering, names: list[str]):
    rank = ctx.rank(names[0])
    for name in names:
        if not ctx.is_const(name) and ctx.perm(name) is not None and ctx.rank(name) == rank:
            return ctx.perm(name)
    return None


@lowers("Concat")
def lower_concat(ctx: Lowering, node: Node) -> None:
    names = [n for n in node.inputs if n and np.prod(ctx.shape(n)) > 0]
    rank = ctx.rank(node.outputs[0])
    axis = int(node.attr("axis")) % rank
    perm = _common_perm(ctx, names)
    tensors = [ctx.get(n, perm) for n in names]
    out = ctx.output(node.outputs[0], perm)
    if len(tensors) == 1:
        ctx.reshape(tensors[0], ctx.b.shape(out), node.name, out=out)
        return
    ctx.op("CONCATENATION", tensors, [out], "ConcatenationOptions", axis=layout.axis_in(axis, perm),
           fusedActivationFunction=0)


def _split_sizes(ctx: Lowering, node: Node) -> list[int]:
    return [ctx.shape(o)[int(node.attr("axis", 0)) % ctx.rank(node.inputs[0])] for o in node.outputs]


def _check_split(node: Node, facts: GraphFacts) -> str | None:
    if any(not o for o in node.outputs):
        return "unnamed outputs"
    return None


@lowers("Split", check=_check_split, constant_inputs=(1,))
def lower_split(ctx: Lowering, node: Node) -> None:
    name = node.inputs[0]
    rank = ctx.rank(name)
    axis = int(node.attr("axis", 0)) % rank
    sizes = _split_sizes(ctx, node)
    x, perm = ctx.get_stored(name)
    outs = [ctx.output(o, perm) for o in node.outputs]
    if len(outs) == 1:
        ctx.reshape(x, ctx.b.shape(outs[0]), node.name, out=outs[0])
        return
    if 0 in sizes:
        raise LoweringError(node, "zero-size outputs")
    stored_axis = layout.axis_in(axis, perm)
    if len(set(sizes)) == 1:
        axis_t = ctx.const_tensor(np.array(stored_axis, np.int32), f"{node.name}/axis")
        ctx.op("SPLIT", [axis_t, x], outs, "SplitOptions", numSplits=len(outs))
        return
    # Uneven parts: one SLICE each (XNNPACK refuses some uneven SPLIT_V graphs at load time)
    shape = ctx.b.shape(x)
    start = 0
    for i, (out, size) in enumerate(zip(outs, sizes, strict=True)):
        begin = [0] * len(shape)
        extent = list(shape)
        begin[stored_axis], extent[stored_axis] = start, size
        ctx.op("SLICE", [x, ctx.const_tensor(np.array(begin, np.int32), f"{node.name}/begin{i}"),
                         ctx.const_tensor(np.array(extent, np.int32), f"{node.name}/size{i}")], [out])
        start += size


# -- Slice --------------------------------------------------------------------------------------------
def _slice_params(ctx: Lowering, node: Node) -> tuple[list[int], list[int], list[int], list[int]]:
    if ctx.opset < 10:
        starts, ends = node.attr("starts"), node.attr("ends")
        axes = node.attr("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = ctx.const(node.inputs[1]).tolist(), ctx.const(node.inputs[2]).tolist()
        axes = ctx.const(node.inputs[3]).tolist() if node.has_input(3) else list(range(len(starts)))
        steps = ctx.const(node.inputs[4]).tolist() if node.has_input(4) else [1] * len(starts)
    return [int(v) for v in starts], [int(v) for v in ends], [int(a) for a in axes], [int(s) for s in steps]


@lowers("Slice", constant_inputs=(1, 2, 3, 4))
def lower_slice(ctx: Lowering, node: Node) -> None:
    name = node.inputs[0]
    shape = ctx.shape(name)
    rank = len(shape)
    begin, end, stride = [0] * rank, list(shape), [1] * rank
    end_mask = 0
    starts, ends, axes, steps = _slice_params(ctx, node)
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        a %= rank
        # Python's slice.indices clamps exactly as ONNX specifies (including INT_MAX / INT_MIN sentinels)
        b, e2, st = slice(s, e, st).indices(shape[a])
        if len(range(b, e2, st)) == 0:
            raise LoweringError(node, f"empty slice on axis {a}")
        begin[a], end[a], stride[a] = b, e2, st
        if st < 0 and e2 < 0:
            end_mask |= 1 << a  # "run to the front": a negative end would wrap around in TFLite
    x, perm = ctx.get_stored(name)
    order = perm or layout.identity(rank)
    begin, end, stride = ([v[p] for p in order] for v in (begin, end, stride))
    end_mask = sum(1 << i for i, p in enumerate(order) if end_mask >> p & 1)
    out = ctx.output(node.outputs[0], perm)
    if all(s == 1 for s in stride):
        size = [e - b for b, e in zip(begin, end, strict=True)]
        ctx.op("SLICE", [x, ctx.const_tensor(np.array(begin, np.int32), f"{node.name}/begin"),
                         ctx.const_tensor(np.array(size, np.int32), f"{node.name}/size")], [out])
        return
    ctx.op("STRIDED_SLICE", [x, ctx.const_tensor(np.array(begin, np.int32), f"{node.name}/begin"),
                             ctx.const_tensor(np.array(end, np.int32), f"{node.name}/end"),
                             ctx.const_tensor(np.array(stride, np.int32), f"{node.name}/strides")],
           [out], "StridedSliceOptions", beginMask=0, endMask=end_mask, ellipsisMask=0, newAxisMask=0,
           shrinkAxisMask=0, offset=False)


# -- Gather -------------------------------------------------------------------------------------------
@lowers("Gather", constant_inputs=(1,))
def lower_gather(ctx: Lowering, node: Node) -> None:
    name = node.inputs[0]
    shape = ctx.shape(name)
    axis = int(node.attr("axis", 0)) % len(shape)
    indices = ctx.const(node.inputs[1]).astype(np.int64)
    if ((indices < -shape[axis]) | (indices >= shape[axis])).any():
        raise LoweringError(node, f"index out of range for axis {axis} of size {shape[axis]}")
    indices = np.where(indices < 0, indices + shape[axis], indices).astype(np.int32)
    if indices.ndim == 1:  # same rank: gather on the stored tensor, keep its axis order
        x, perm = ctx.get_stored(name)
        out = ctx.output(node.outputs[0], perm)
        stored_axis = layout.axis_in(axis, perm)
    else:
        x, out, stored_axis = ctx.get(name), ctx.output(node.outputs[0]), axis
    ctx.op("GATHER", [x, ctx.const_tensor(indices, f"{node.name}/indices")], [out], "GatherOptions",
           axis=stored_axis, batchDims=0)


# -- Pad ----------------------------------------------------------------------------------------------
def _check_pad(node: Node, facts: GraphFacts) -> str | None:
    mode = node.attr("mode", "constant")
    if mode not in ("constant", "reflect"):
        return f"mode={mode}"
    return None


@lowers("Pad", check=_check_pad, constant_inputs=(1, 2, 3))
def lower_pad(ctx: Lowering, node: Node) -> None:
    name = node.inputs[0]
    rank = ctx.rank(name)
    if ctx.opset < 11:
        pads, value = list(node.attr("pads")), float(node.attr("value", 0.0))
        axes = list(range(rank))
    else:
        pads = ctx.const(node.inputs[1]).astype(np.int64).tolist()
        value = float(ctx.const(node.inputs[2]).reshape(())) if node.has_input(2) else 0.0
        axes = [int(a) % rank for a in ctx.const(node.inputs[3]).tolist()] if node.has_input(3) else list(range(rank))
    table = np.zeros((rank, 2), np.int64)
    for i, a in enumerate(axes):
        table[a] = (pads[i], pads[i + len(axes)])
    if (table < 0).any():
        raise LoweringError(node, "negative pads (cropping)")
    x, perm = ctx.get_stored(name)
    table = table[list(perm)] if perm is not None else table
    out = ctx.output(node.outputs[0], perm)
    paddings = ctx.const_tensor(table.astype(np.int32), f"{node.name}/paddings")
    if node.attr("mode", "constant") == "reflect":
        ctx.op("MIRROR_PAD", [x, paddings], [out], "MirrorPadOptions", mode=0)  # REFLECT
    elif value == 0.0:
        ctx.op("PAD", [x, paddings], [out])
    else:
        ctx.op("PADV2", [x, paddings, ctx.const_tensor(np.array(value, np.float32), f"{node.name}/value")], [out])
