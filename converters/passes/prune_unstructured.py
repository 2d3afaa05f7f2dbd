"""Unstructured magnitude pruning: the smallest weights of Conv / Gemm / MatMul layers become exact zeros.

The model keeps its shapes (it is as dense as before for ONNX Runtime); the zeros make the file
compress well and let formats with sparse storage (TFLite's sparsity metadata, Core ML's sparse
weights) skip them. By default the first and the last prunable layers are left dense: they hold few
weights and are the most sensitive to pruning.

Exactly ``round(sparsity * n)`` weights are zeroed per layer (``scope=layer``) or over all eligible
layers together (``scope=global``, one magnitude threshold for the whole model: layers with many
small weights lose more). The per-layer sparsity actually in the weights is recorded in
``ctx.details['prune-unstructured']``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import numpy_helper

from edgeopt.converters.passes import Pass, PassContext
from edgeopt.errors import UserInputError, closest
from edgeopt.params import Param, in_range

PRUNABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def weight_layers(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """(node, weight initializer name) of every Conv / ConvTranspose / Gemm / MatMul with a constant
    float weight, in graph order."""
    inits = {i.name: i for i in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type not in PRUNABLE_OPS or node.domain not in ("", "ai.onnx"):
            continue
        # MatMul may hold its constant on either side; the others keep the weight in input 1.
        candidates = node.input[:2] if node.op_type == "MatMul" else node.input[1:2]
        for name in candidates:
            init = inits.get(name)
            if init is not None and init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                       onnx.TensorProto.DOUBLE) and len(init.dims) >= 2:
                layers.append((node, name))
                break
    return layers


def _mapping(v: Any) -> dict:
    if not isinstance(v, dict):
        raise TypeError(v)
    return dict(v)


class PruneUnstructured(Pass):
    name: ClassVar[str] = "prune-unstructured"
    summary: ClassVar[str] = "magnitude pruning: the smallest Conv/Gemm/MatMul weights become exact zeros"
    params: ClassVar[tuple[Param, ...]] = (
        Param("sparsity", float, 0.5, "fraction of weights set to zero in each pruned layer (or overall)",
              check=in_range(0.0, 1.0, hi_open=True)),
        Param("scope", str, "global", "one magnitude threshold over all pruned layers, or one per layer",
              choices=("global", "layer")),
        Param("skip_first_last", bool, True, "leave the first and the last weight layer dense"),
        Param("layer_sparsity", _mapping, None, "sparsity per layer (node name → fraction), overriding "
              "'sparsity' for those layers; they are pruned on their own threshold"),
    )

    def _apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        layers = weight_layers(model)
        if not layers:
            raise UserInputError("prune-unstructured: the model has no Conv, Gemm or MatMul layer with "
                                 "constant weights to prune")
        overrides = self._layer_overrides(layers)
        skipped: dict[str, str] = {}
        chosen = []
        for i, (node, weight) in enumerate(layers):
            if node.name in overrides:
                chosen.append((node, weight))
            elif self.config["skip_first_last"] and len(layers) > 2 and i in (0, len(layers) - 1):
                skipped[node.name] = "first weight layer" if i == 0 else "last weight layer"
            else:
                chosen.append((node, weight))
        inits = {i.name: i for i in model.graph.initializer}
        arrays = {w: numpy_helper.to_array(inits[w]) for _, w in chosen}
        masks = self._masks(chosen, arrays, overrides)
        report: dict[str, Any] = {}
        for node, weight in chosen:
            pruned = np.where(masks[weight], arrays[weight], 0).astype(arrays[weight].dtype)
            inits[weight].CopyFrom(numpy_helper.from_array(pruned, weight))
            zeros = int(pruned.size - np.count_nonzero(pruned))
            report[node.name] = {"op": node.op_type, "weight": weight, "params": int(pruned.size),
                                 "zeros": zeros, "sparsity": zeros / pruned.size}
        total = sum(r["params"] for r in report.values())
        zeros = sum(r["zeros"] for r in report.values())
        ctx.details[self.name] = {"layers": report, "skipped": skipped, "pruned_params": total,
                                  "zeros": zeros, "sparsity": zeros / total if total else 0.0}
        return model

    def _layer_overrides(self, layers: list[tuple[onnx.NodeProto, str]]) -> dict[str, float]:
        given = self.config["layer_sparsity"] or {}
        names = [n.name for n, _ in layers]
        out = {}
        for name, value in given.items():
            if name not in names:
                raise UserInputError(f"prune-unstructured: no Conv/Gemm/MatMul layer named '{name}'"
                                     f"{closest(name, names)}")
            out[name] = Param("layer_sparsity", float, None, "", check=in_range(0.0, 1.0, hi_open=True)).coerce(
                value, self.name)
        return out

    def _masks(self, chosen, arrays: dict[str, np.ndarray], overrides: dict[str, float]) -> dict[str, np.ndarray]:
        """Keep-masks per weight: exactly round(s * n) smallest magnitudes are dropped."""
        masks: dict[str, np.ndarray] = {}
        pooled = [w for node, w in chosen if node.name not in overrides]
        if self.config["scope"] == "global" and pooled:
            flat = np.concatenate([np.abs(arrays[w]).ravel() for w in pooled])
            keep = _keep_largest(flat, self.config["sparsity"])
            offset = 0
            for w in pooled:
                n = arrays[w].size
                masks[w] = keep[offset:offset + n].reshape(arrays[w].shape)
                offset += n
        for node, w in chosen:
            if w not in masks:
                s = overrides.get(node.name, self.config["sparsity"])
                masks[w] = _keep_largest(np.abs(arrays[w]).ravel(), s).reshape(arrays[w].shape)
        return masks


def _keep_largest(magnitudes: np.ndarray, sparsity: float) -> np.ndarray:
    """Boolean mask dropping exactly round(sparsity * n) of the smallest magnitudes (stable on ties)."""
    n_drop = int(round(sparsity * magnitudes.size))
    keep = np.ones(magnitudes.size, dtype=bool)
    if n_drop:
        keep[np.argsort(magnitudes, kind="stable")[:n_drop]] = False
    return keep
