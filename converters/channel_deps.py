"""Which channels of an ONNX graph must be removed together: the dependency graph of structured pruning.

Every Conv / ConvTranspose / Gemm / MatMul with constant weights *produces* a channel group (its
output channels or hidden units). Walking the graph in order, each tensor that carries pruned
channels gets a ``Layout``: the axis they live on and, along it, a list of segments — a group's
channels (each spanning ``repeat`` consecutive features after a Flatten of [C, H, W]) or channels
that cannot change (``group=None``). The walk records what must be sliced when channels go:

- per-channel ops (activations, pooling, BatchNormalization, depthwise Conv, Transpose, Squeeze…)
  pass the layout on and slice their per-channel parameters;
- elementwise ops with two graph inputs (residual Add, squeeze-excitation Mul) *couple* the groups
  meeting there: the same channel indices must go from both (a union-find merges them);
- Concat along the channel axis concatenates segments; Flatten / Reshape to [N, C·H·W] multiply
  ``repeat``; the next Conv / Gemm / MatMul slices its input weights accordingly;
- a group that reaches a model output, an op that mixes channels in a way not modelled here
  (Softmax over channels, grouped Conv, Shape, Split…), or is coupled with channels that cannot
  change is *blocked*, with the reason, and left as it is.

Hand-written because no library does this on ONNX graphs: torch-pruning does it on torch modules
(after an import the ONNX → torch importer here does not need), and onnx / onnxslim have no pruning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeopt.onnx_io import static_shapes

PRODUCER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# ops that act on each channel on its own, whatever the axis (one data input, output 0 same layout)
UNARY_PER_ELEMENT = {
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus",
    "Softsign", "Gelu", "Mish", "Erf", "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal", "Identity", "Dropout",
    "Cast", "Clip", "Floor", "Ceil", "Round", "Sin", "Cos", "ThresholdedRelu", "Shrink", "Sign",
}
# spatial ops on NC... tensors: channel axis 1 in, channel axis 1 out
SPATIAL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sum", "Mean", "PRelu"}
NORM_PER_CHANNEL = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}


@dataclass(frozen=True)
class Segment:
    group: int | None  # channel group id; None: channels that stay
    size: int          # channels in the segment
    repeat: int = 1    # features per channel along the axis (H*W after a Flatten of [C, H, W])


@dataclass(frozen=True)
class Layout:
    axis: int
    segments: tuple[Segment, ...]

    def width(self) -> int:
        return sum(s.size * s.repeat for s in self.segments)


@dataclass
class SliceAction:
    """Keep only the indices ``layout`` keeps along ``axis`` of the constant at ``node.input[index]``."""

    node: int  # index into graph.node
    index: int
    axis: int
    layout: Layout
    role: str = "param"  # "input": weights that read the channels; "output": weights that make them


@dataclass
class ChannelGraph:
    """Result of the analysis: groups (union-find), their producers, blocks, and the slices to apply."""

    sizes: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    producers: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)  # group → (node, input, axis)
    blocked: dict[int, list[str]] = field(default_factory=dict)  # root → reasons
    slices: list[SliceAction] = field(default_factory=list)
    group_attrs: list[tuple[int, Layout]] = field(default_factory=list)  # depthwise Conv 'group' = width
    reshapes: list[tuple[int, Layout]] = field(default_factory=list)     # Reshape shape[1] = width

    # -- union-find --------------------------------------------------------------------------
    def new_group(self, size: int) -> int:
        self.sizes.append(size)
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            self.blocked.setdefault(ra, []).extend(self.blocked.pop(rb, []))
            if not self.blocked[ra]:
                del self.blocked[ra]

    def block(self, layout: Layout | None, reason: str) -> None:
        if layout is None:
            return
        for seg in layout.segments:
            if seg.group is not None:
                reasons = self.blocked.setdefault(self.find(seg.group), [])
                if reason not in reasons:
                    reasons.append(reason)

    def roots(self) -> list[int]:
        return sorted({self.find(g) for g in range(len(self.parent))})

    def members(self, root: int) -> list[int]:
        return [g for g in range(len(self.parent)) if self.find(g) == root]

    def is_blocked(self, group: int) -> bool:
        return self.find(group) in self.blocked

    # -- indices -----------------------------------------------------------------------------
    def kept_indices(self, layout: Layout, keep: dict[int, np.ndarray]) -> np.ndarray:
        """Indices along the layout's axis that survive, given the kept channels of each root group."""
        parts, offset = [], 0
        for seg in layout.segments:
            channels = np.arange(seg.size) if seg.group is None else keep.get(self.find(seg.group),
                                                                               np.arange(seg.size))
            parts.append((offset + channels[:, None] * seg.repeat + np.arange(seg.repeat)).ravel())
            offset += seg.size * seg.repeat
        return np.concatenate(parts) if parts else np.arange(0)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Walker:
    """One pass over the graph in order, giving each tensor that carries prunable channels a Layout."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.consts = {i.name: i for i in model.graph.initializer}
        self.shapes = static_shapes(model)
        self.cg = ChannelGraph()
        self.layouts: dict[str, Layout] = {}

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def const(self, name: str) -> np.ndarray | None:
        init = self.consts.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def node_label(self, node: onnx.NodeProto) -> str:
        return f"'{node.name}' ({node.op_type})" if node.name else node.op_type

    # -- the walk ----------------------------------------------------------------------------
    def run(self) -> ChannelGraph:
        for idx, node in enumerate(self.graph.node):
            ins = [self.layouts.get(n) for n in node.input]
            if node.op_type in PRODUCER_OPS and self._producer(idx, node, ins):
                continue
            if not any(ins):
                continue
            handler = getattr(self, f"_op_{node.op_type}", None)
            if node.domain not in ("", "ai.onnx"):
                handler = None
            if handler is None:
                if node.op_type in UNARY_PER_ELEMENT:
                    handler = self._unary
                elif node.op_type in SPATIAL:
                    handler = self._spatial
                elif node.op_type in BINARY:
                    handler = self._broadcast
                elif node.op_type in NORM_PER_CHANNEL:
                    handler = self._norm
            if handler is None:
                for lay in ins:
                    self.cg.block(lay, f"read by {self.node_label(node)}, which mixes channels")
                continue
            handler(idx, node, ins)
        for out in self.graph.output:
            self.cg.block(self.layouts.get(out.name), f"reaches the model output '{out.name}'")
        return self.cg

    def _set(self, name: str, layout: Layout | None) -> None:
        if layout is not None and name:
            self.layouts[name] = layout

    # -- weight layers -----------------------------------------------------------------------
    def _producer(self, idx: int, node: onnx.NodeProto, ins: list[Layout | None]) -> bool:
        """Conv / ConvTranspose / Gemm / MatMul: slice the weights' input side, start a new group.

        Returns False when the node is not a weight layer this analysis handles (the caller then
        blocks whatever it reads)."""
        op = node.op_type
        if op == "MatMul":
            w = self.const(node.input[1])
            a_rank = self.rank(node.input[0])
            if w is None or w.ndim != 2 or a_rank is None or a_rank < 2 or node.input[0] in self.consts:
                return False
            in_axis, w_in, w_out, out_axis = a_rank - 1, 0, 1, a_rank - 1
        elif op == "Gemm":
            w = self.const(node.input[1])
            if w is None or _attr(node, "transA", 0):
                return False
            trans_b = _attr(node, "transB", 0)
            in_axis, w_in, w_out, out_axis = 1, (1 if trans_b else 0), (0 if trans_b else 1), 1
        else:  # Conv, ConvTranspose
            w = self.const(node.input[1])
            if w is None:
                return False
            group = _attr(node, "group", 1)
            if group != 1:
                return self._grouped_conv(idx, node, ins, w, group)
            in_axis, out_axis = 1, 1
            w_in, w_out = (1, 0) if op == "Conv" else (0, 1)
        lay = ins[0]
        if lay is not None:
            if lay.axis != in_axis:
                self.cg.block(lay, f"{self.node_label(node)} reads its channels on another axis")
            else:
                self.cg.slices.append(SliceAction(idx, 1, w_in, lay, "input"))
        channels = int(w.shape[w_out])
        g = self.cg.new_group(channels)
        own = Layout(out_axis, (Segment(g, channels),))
        self.cg.producers[g] = [(idx, 1, w_out)]
        self.cg.slices.append(SliceAction(idx, 1, w_out, own, "output"))
        if len(node.input) > 2 and node.input[2] in self.consts:
            if op == "Gemm":  # C broadcasts against [M, N]
                self._slice_broadcast_const(idx, 2, own, out_rank=2)
            else:  # Conv / ConvTranspose bias: one value per output channel
                self.cg.slices.append(SliceAction(idx, 2, 0, own))
        self._set(node.output[0], own)
        return True

    def _grouped_conv(self, idx, node, ins, w, group) -> bool:
        lay = ins[0]
        channels_in = self.shapes.get(node.input[0], (0, 0))[1]
        depthwise = (node.op_type == "Conv" and group == channels_in == w.shape[0] and w.shape[1] == 1)
        if not depthwise:
            reason = f"grouped convolution {self.node_label(node)} ties channels to its groups"
            self.cg.block(lay, reason)
            g = self.cg.new_group(int(w.shape[0]))  # listed as a layer, but never pruned
            self.cg.producers[g] = [(idx, 1, 0)]
            own = Layout(1, (Segment(g, int(w.shape[0])),))
            self.cg.block(own, reason)
            self._set(node.output[0], own)
            return True
        if lay is None:
            return True
        # depthwise: filter c reads only channel c, so it goes with that channel
        self.cg.slices.append(SliceAction(idx, 1, 0, lay))
        if len(node.input) > 2 and node.input[2]:
            self.cg.slices.append(SliceAction(idx, 2, 0, lay))
        self.cg.group_attrs.append((idx, lay))
        self._set(node.output[0], lay)
        return True

    # -- per-channel ops ---------------------------------------------------------------------
    def _unary(self, idx, node, ins) -> None:
        self._set(node.output[0], ins[0])
        if node.op_type in ("Clip",) and any(ins[1:]):
            self.cg.block(ins[0], f"{self.node_label(node)} has data-dependent bounds")

    def _spatial(self, idx, node, ins) -> None:
        lay = ins[0]
        if lay.axis != 1:
            self.cg.block(lay, f"{self.node_label(node)} pools over the channel axis")
            return
        self._set(node.output[0], lay)

    def _norm(self, idx, node, ins) -> None:
        lay = ins[0]
        if lay is None or lay.axis != 1 or any(ins[1:]):
            self.cg.block(lay, f"{self.node_label(node)} normalises over the channel axis")
            for other in ins[1:]:
                self.cg.block(other, f"{self.node_label(node)} takes parameters from the graph")
            return
        for i in NORM_PER_CHANNEL[node.op_type]:
            if i < len(node.input) and node.input[i] in self.consts:
                self.cg.slices.append(SliceAction(idx, i, 0, lay))
        self._set(node.output[0], lay)

    def _slice_broadcast_const(self, idx: int, index: int, lay: Layout, out_rank: int) -> None:
        """A constant operand broadcast against ``lay``: slice it where it has one value per channel."""
        value = self.const(self.graph.node[idx].input[index])
        if value is None:
            return
        axis = lay.axis - (out_rank - value.ndim)
        if 0 <= axis < value.ndim and value.shape[axis] > 1:
            self.cg.slices.append(SliceAction(idx, index, axis, lay))

    def _broadcast(self, idx, node, ins) -> None:
        """Elementwise ops with numpy broadcasting: Add / Mul / … (and PRelu's slope)."""
        out_rank = self.rank(node.output[0])
        if out_rank is None:
            for lay in ins:
                self.cg.block(lay, f"{self.node_label(node)} has no inferred shape")
            return
        aligned: list[Layout] = []
        for lay, name in zip(ins, node.input, strict=True):
            if lay is not None:
                shift = out_rank - (self.rank(name) or out_rank)
                aligned.append(Layout(lay.axis + shift, lay.segments))
        axes = {lay.axis for lay in aligned}
        if len(axes) > 1:
            for lay in ins:
                self.cg.block(lay, f"{self.node_label(node)} combines channels on different axes")
            return
        axis = axes.pop()
        out = aligned[0]
        for other in aligned[1:]:
            out = self._couple(out, other, node)
            if out is None:
                return
        for i, name in enumerate(node.input):
            if ins[i] is not None or not name:
                continue
            if name in self.consts:
                self._slice_broadcast_const(idx, i, out, out_rank)
                continue
            shape = self.shapes.get(name)
            dim_axis = None if shape is None else axis - (out_rank - len(shape))
            if shape is None or (0 <= dim_axis < len(shape) and shape[dim_axis] > 1):
                fixed = Layout(axis, (Segment(None, out.width()),))
                if self._couple(out, fixed, node) is None:
                    return
        self._set(node.output[0], out)

    def _couple(self, a: Layout, b: Layout, node: onnx.NodeProto) -> Layout | None:
        """Channels that meet elementwise must be pruned alike: merge their groups segment by segment."""
        shape_a = [(s.size, s.repeat) for s in a.segments]
        shape_b = [(s.size, s.repeat) for s in b.segments]
        if shape_a != shape_b:
            reason = f"{self.node_label(node)} joins channel sets that do not line up"
            self.cg.block(a, reason)
            self.cg.block(b, reason)
            return None
        for sa, sb in zip(a.segments, b.segments, strict=True):
            if sa.group is not None and sb.group is not None:
                self.cg.union(sa.group, sb.group)
            elif sa.group is not None or sb.group is not None:
                self.cg.block(Layout(a.axis, (sa if sa.group is not None else sb,)),
                              f"added to channels that cannot be pruned at {self.node_label(node)}")
        # keep the group side of each segment, so later nodes see the (merged) groups
        merged = tuple(sa if sa.group is not None else sb for sa, sb in zip(a.segments, b.segments, strict=True))
        return Layout(a.axis, merged)

    # -- shape ops ---------------------------------------------------------------------------
    def _op_Concat(self, idx, node, ins) -> None:
        out_rank = self.rank(node.output[0]) or 0
        axis = _attr(node, "axis") % out_rank if out_rank else None
        laid = [lay for lay in ins if lay is not None]
        if axis is None or any(lay.axis != laid[0].axis for lay in laid):
            for lay in laid:
                self.cg.block(lay, f"{self.node_label(node)} joins channels on different axes")
            return
        if axis != laid[0].axis:  # concatenation along another axis: channels line up as in Add
            self._broadcast(idx, node, ins)
            return
        segments: list[Segment] = []
        for lay, name in zip(ins, node.input, strict=True):
            if lay is not None:
                segments.extend(lay.segments)
            else:
                segments.append(Segment(None, int(self.shapes.get(name, ())[axis])))
        self._set(node.output[0], Layout(axis, tuple(segments)))

    def _flatten_to(self, idx, node, lay: Layout, start: int) -> Layout | None:
        """[d0 .. d_start-1 | d_start ..] → 2-D; channels must be the first flattened dim."""
        shape = self.shapes.get(node.input[0])
        if shape is None or lay.axis != start:
            self.cg.block(lay, f"{self.node_label(node)} flattens the channels with other dims")
            return None
        inner = int(np.prod(shape[lay.axis + 1:], dtype=np.int64))
        return Layout(1, tuple(Segment(s.group, s.size, s.repeat * inner) for s in lay.segments))

    def _op_Flatten(self, idx, node, ins) -> None:
        rank = self.rank(node.input[0]) or 0
        self._set(node.output[0], self._flatten_to(idx, node, ins[0], _attr(node, "axis", 1) % max(rank, 1)))

    def _op_Reshape(self, idx, node, ins) -> None:
        lay = ins[0]
        src, dst = self.shapes.get(node.input[0]), self.shapes.get(node.output[0])
        target = self.const(node.input[1]) if len(node.input) > 1 else None
        if (src is None or dst is None or target is None or len(dst) != 2 or lay.axis != 1
                or dst[0] != src[0]):
            self.cg.block(lay, f"{self.node_label(node)} reshapes the channel axis")
            return
        out = self._flatten_to(idx, node, lay, 1)
        if out is not None:
            self.cg.reshapes.append((idx, out))
        self._set(node.output[0], out)

    def _op_Transpose(self, idx, node, ins) -> None:
        lay = ins[0]
        rank = self.rank(node.input[0]) or 0
        perm = list(_attr(node, "perm", list(range(rank))[::-1]))
        self._set(node.output[0], Layout(perm.index(lay.axis), lay.segments))

    def _axes(self, node: onnx.NodeProto) -> list[int] | None:
        axes = _attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            value = self.const(node.input[1])
            axes = None if value is None else value.tolist()
        return None if axes is None else list(axes)

    def _op_Squeeze(self, idx, node, ins) -> None:
        lay = ins[0]
        rank = self.rank(node.input[0])
        axes = self._axes(node)
        if axes is None or rank is None:
            self.cg.block(lay, f"{self.node_label(node)} squeezes unknown axes")
            return
        axes = [a % rank for a in axes]
        if lay.axis in axes:
            self.cg.block(lay, f"{self.node_label(node)} squeezes the channel axis")
            return
        self._set(node.output[0], Layout(lay.axis - sum(a < lay.axis for a in axes), lay.segments))

    def _op_Unsqueeze(self, idx, node, ins) -> None:
        lay = ins[0]
        out_rank = self.rank(node.output[0])
        axes = self._axes(node)
        if axes is None or out_rank is None:
            self.cg.block(lay, f"{self.node_label(node)} unsqueezes unknown axes")
            return
        inserted = sorted(a % out_rank for a in axes)
        kept = [i for i in range(out_rank) if i not in inserted]
        self._set(node.output[0], Layout(kept[lay.axis], lay.segments))

    def _reduce(self, idx, node, ins) -> None:
        lay = ins[0]
        rank = self.rank(node.input[0])
        axes = self._axes(node)
        if axes is None or rank is None or any(ins[1:]):
            self.cg.block(lay, f"{self.node_label(node)} reduces over the channel axis")
            return
        axes = [a % rank for a in axes]
        if lay.axis in axes:
            self.cg.block(lay, f"{self.node_label(node)} reduces over the channel axis")
            return
        shift = 0 if _attr(node, "keepdims", 1) else sum(a < lay.axis for a in axes)
        self._set(node.output[0], Layout(lay.axis - shift, lay.segments))

    _op_ReduceMean = _op_ReduceMax = _op_ReduceSum = _op_ReduceMin = _reduce

    def _softmax(self, idx, node, ins) -> None:
        lay = ins[0]
        rank = self.rank(node.input[0]) or 0
        axis = _attr(node, "axis", -1) % max(rank, 1)
        if axis == lay.axis:
            self.cg.block(lay, f"{self.node_label(node)} normalises over the channels")
            return
        self._set(node.output[0], lay)

    _op_Softmax = _op_LogSoftmax = _softmax

    def _op_Resize(self, idx, node, ins) -> None:
        lay = ins[0]
        sizes = node.input[3] if len(node.input) > 3 else ""
        if lay.axis != 1 or sizes or any(ins[1:]):
            self.cg.block(lay, f"{self.node_label(node)} resizes with explicit sizes")
            return
        self._set(node.output[0], lay)

    def _op_Pad(self, idx, node, ins) -> None:
        lay = ins[0]
        pads = self.const(node.input[1]) if len(node.input) > 1 else _attr(node, "pads")
        rank = self.rank(node.input[0])
        if pads is None or rank is None or len(node.input) > 3 or any(ins[1:]):
            self.cg.block(lay, f"{self.node_label(node)} pads unknown axes")
            return
        pads = np.asarray(pads)
        if pads[lay.axis] or pads[lay.axis + rank]:
            self.cg.block(lay, f"{self.node_label(node)} pads the channel axis")
            return
        self._set(node.output[0], lay)


def constants_to_initializers(model: onnx.ModelProto) -> None:
    """Turn ``Constant`` nodes holding a tensor into initializers, so weights look alike everywhere."""
    keep = []
    for node in model.graph.node:
        value = _attr(node, "value") if node.op_type == "Constant" else None
        if isinstance(value, onnx.TensorProto):
            model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(value), node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def analyse(model: onnx.ModelProto) -> ChannelGraph:
    """The channel groups of ``model`` (with Constant nodes already made initializers)."""
    return _Walker(model).run()
