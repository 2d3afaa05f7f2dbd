"""Structured pruning: remove whole output channels / hidden units, giving a smaller dense ONNX model.

Channels are ranked by the L1 (or L2) norm of the weights that produce them; the lowest-ranked
``ratio`` of each layer's channels are removed, together with everything that depends on them (see
``edgeopt.converters.channel_deps``): BatchNormalization parameters, depthwise filters, the input
weights of the next Conv / Gemm / MatMul (through Flatten and Concat), and — for channels joined by a
residual Add — the same channels of every coupled layer, ranked by their summed norms. Layers whose
channels cannot be removed safely (they reach the model output, meet a grouped convolution or an op
that mixes channels) are left as they are and listed in ``ctx.details['prune-structured']['skipped']``.

The result is an ordinary dense ONNX model with smaller tensors: every target compiles it and every
runtime runs it faster, unlike sparse weights.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeopt.converters.channel_deps import ChannelGraph, analyse, constants_to_initializers
from edgeopt.converters.passes import Pass, PassContext
from edgeopt.errors import UserInputError, closest
from edgeopt.onnx_io import count_macs, count_params
from edgeopt.params import Param, in_range

RATIO = in_range(0.0, 1.0, hi_open=True)


def _mapping(v: Any) -> dict:
    if not isinstance(v, dict):
        raise TypeError(v)
    return dict(v)


class PruneStructured(Pass):
    name: ClassVar[str] = "prune-structured"
    summary: ClassVar[str] = "remove the lowest-norm output channels / hidden units (smaller dense model)"
    params: ClassVar[tuple[Param, ...]] = (
        Param("ratio", float, 0.5, "fraction of the output channels / hidden units removed from each "
              "prunable layer", check=RATIO),
        Param("norm", str, "l1", "rank channels by the L1 or L2 norm of the weights producing them",
              choices=("l1", "l2")),
        Param("layer_ratios", _mapping, None, "ratio per layer (node name → fraction) overriding 'ratio'"),
        Param("round_to", int, 1, "keep a multiple of this many channels per layer (e.g. 8 for SIMD widths)",
              check=lambda v: None if v >= 1 else "must be >= 1"),
    )

    def _apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        model = prepare(model)
        plan = self.plan(model)
        before = {"params": count_params(model), "macs": count_macs(model)}
        apply_pruning(model, plan.graph, plan.keep)
        ctx.details[self.name] = {"layers": plan.layers, "skipped": plan.skipped,
                                  "params_before": before["params"], "params_after": count_params(model),
                                  "macs_before": before["macs"], "macs_after": count_macs(model)}
        if self.config["ratio"] > 0 and not any(v["kept"] < v["channels"] for v in plan.layers.values()):
            why = "; ".join(f"{k}: {v}" for k, v in plan.skipped.items())
            ctx.notes.append("prune-structured removed no channel" + (f" (skipped: {why})" if why else ""))
        return model

    def plan(self, model: onnx.ModelProto) -> PruningPlan:
        """Which channels each group keeps (``model`` as returned by ``prepare``; it is not changed)."""
        graph = analyse(model)
        names = self._producer_names(model, graph)
        overrides = self._overrides(names)
        weights = {i.name: i for i in model.graph.initializer}
        plan = PruningPlan(graph)
        for root in graph.roots():
            members = [names[g] for g in graph.members(root)]
            if root in graph.blocked:
                for member in members:
                    plan.skipped[member] = "; ".join(graph.blocked[root])
                continue
            ratios = [overrides[m] for m in members if m in overrides]
            ratio = min(ratios) if ratios else self.config["ratio"]
            size = graph.sizes[root]
            n_keep = self._kept_count(size, ratio)
            score = self._channel_scores(model, graph, root, weights)
            plan.keep[root] = np.sort(np.argsort(-score, kind="stable")[:n_keep])
            for member in members:
                plan.layers[member] = {"channels": size, "kept": n_keep, "ratio": ratio,
                                       "coupled_with": [m for m in members if m != member]}
        return plan

    def _kept_count(self, size: int, ratio: float) -> int:
        n_keep = max(1, size - int(ratio * size + 1e-9))
        step = self.config["round_to"]
        return min(size, -(-n_keep // step) * step)

    @staticmethod
    def _producer_names(model: onnx.ModelProto, graph: ChannelGraph) -> dict[int, str]:
        nodes = model.graph.node
        return {g: nodes[prods[0][0]].name or f"#{prods[0][0]}:{nodes[prods[0][0]].op_type}"
                for g, prods in graph.producers.items()}

    def _overrides(self, names: dict[int, str]) -> dict[str, float]:
        given = self.config["layer_ratios"] or {}
        known = sorted(names.values())
        out = {}
        for name, value in given.items():
            if name not in known:
                raise UserInputError(f"prune-structured: no prunable layer named '{name}'{closest(name, known)}; "
                                     f"layers: {', '.join(known)}")
            out[name] = Param("layer_ratios", float, None, "", check=RATIO).coerce(value, f"{self.name} {name}")
        return out

    def _channel_scores(self, model, graph: ChannelGraph, root: int, weights) -> np.ndarray:
        """Summed L1 / L2 norms of every coupled producer's weights, per channel."""
        score = np.zeros(graph.sizes[root])
        for g in graph.members(root):
            for node_idx, index, axis in graph.producers[g]:
                w = numpy_helper.to_array(weights[model.graph.node[node_idx].input[index]]).astype(np.float64)
                w = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
                score += np.abs(w).sum(1) if self.config["norm"] == "l1" else np.sqrt((w * w).sum(1))
        return score


@dataclass
class PruningPlan:
    graph: ChannelGraph
    keep: dict[int, np.ndarray] = field(default_factory=dict)  # root group → kept channel indices
    layers: dict[str, Any] = field(default_factory=dict)       # producer node → channels, kept, ratio
    skipped: dict[str, str] = field(default_factory=dict)      # producer node → why it was left


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with Constant nodes as initializers: what ``plan`` and ``apply_pruning`` take."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    constants_to_initializers(model)
    return model


def apply_pruning(model: onnx.ModelProto, graph: ChannelGraph, keep: dict[int, np.ndarray]) -> None:
    """Slice every recorded constant, fix depthwise ``group`` and Reshape targets, redo shapes (in place)."""
    nodes = model.graph.node
    inits = {i.name: i for i in model.graph.initializer}
    uses = collections.Counter(name for n in nodes for name in n.input)
    work: dict[tuple[int, int], np.ndarray] = {}
    for act in graph.slices:
        key = (act.node, act.index)
        original = numpy_helper.to_array(inits[nodes[act.node].input[act.index]])
        if original.shape[act.axis] != act.layout.width():
            raise ValueError(f"node '{nodes[act.node].name}': input {act.index} has {original.shape[act.axis]} "
                             f"entries on axis {act.axis}, the channel analysis expected {act.layout.width()}")
        array = work.get(key, original)
        work[key] = np.take(array, graph.kept_indices(act.layout, keep), axis=act.axis)
    for node_idx, layout in graph.reshapes:
        key = (node_idx, 1)
        target = work.get(key, numpy_helper.to_array(inits[nodes[node_idx].input[1]])).copy()
        if target[1] > 0:
            target[1] = len(graph.kept_indices(layout, keep))
        work[key] = target
    for (node_idx, index), array in work.items():
        name = nodes[node_idx].input[index]
        if np.array_equal(array, numpy_helper.to_array(inits[name])):
            continue
        if uses[name] > 1:  # shared constant: this node gets its own copy
            name = f"{name}__pruned_{node_idx}_{index}"
            model.graph.initializer.append(numpy_helper.from_array(array, name))
            nodes[node_idx].input[index] = name
        else:
            inits[name].CopyFrom(numpy_helper.from_array(array, name))
    for node_idx, layout in graph.group_attrs:
        for attr in nodes[node_idx].attribute:
            if attr.name == "group":
                attr.CopyFrom(helper.make_attribute("group", len(graph.kept_indices(layout, keep))))
    used = {name for n in nodes for name in n.input}
    kept_inits = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept_inits)
    del model.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    model.graph.value_info.extend(inferred.graph.value_info)
