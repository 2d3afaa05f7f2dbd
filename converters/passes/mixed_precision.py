"""Per-node INT8 sensitivity and the search for the fewest float nodes that meet a cosine budget.

Shared by ``edgeopt analyze`` (the ranking) and the ``quantize-int8`` pass (``min_cosine``: when the
all-INT8 model misses it, the most sensitive nodes stay float, as few as bisection over the ranking
finds -- O(log n) quantizations). Every quantization reads the activation ranges from one calibration
(ONNX Runtime's calibration cache), so a node's cost is one ``quantize_static`` rewrite and one
session run on the validation inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeopt.converters.validate import Parity
from edgeopt.runtime import run_batched
from edgeopt.runtime.onnxruntime import OnnxRuntime

WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
BATCH = 8

# quantize(out_path, nodes_to_quantize=None, nodes_to_exclude=None): writes a QDQ model of the same
# pre-processed float model, ranges from the same calibration
Quantize = Callable[..., None]


class Scorer:
    """Outputs of a quantized model against the float model's, on fixed inputs."""

    def __init__(self, float_model: Path, inputs: Mapping[str, np.ndarray]):
        self.inputs = dict(inputs)
        rt = OnnxRuntime(float_model, threads=1, memory_arena=False)
        self.names = [o.name for o in rt.outputs]
        self.reference = run_batched(rt, self.inputs, BATCH)

    def __call__(self, model: Path) -> dict[str, Any]:
        got = run_batched(OnnxRuntime(model, threads=1, memory_arena=False), self.inputs, BATCH)
        acc = Parity(self.names)
        acc.add([self.reference[n] for n in self.names], [got[n] for n in self.names])
        par = acc.result()
        return {"cosine": par["cosine"], "max_abs_err": par["max_abs_err"], "top1_agreement": par["top1_agreement"]}


def quantized_nodes(float_model: onnx.ModelProto, quantized: onnx.ModelProto,
                    weights_only: bool = False) -> list[onnx.NodeProto]:
    """The float model's nodes that the all-INT8 model runs on quantized inputs (a DequantizeLinear
    feeds them), in graph order."""
    producers = {o: n for n in quantized.graph.node for o in n.output}
    fed = {n.name for n in quantized.graph.node
           if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
           and any(i in producers and producers[i].op_type == "DequantizeLinear" for i in n.input)}
    return [n for n in float_model.graph.node
            if n.name and n.name in fed and (not weights_only or n.op_type in WEIGHT_OPS)]


def sensitivities(quantize: Quantize, score: Scorer, nodes: Sequence[onnx.NodeProto], work: Path,
                  tick: Callable[..., None] = lambda *a, **k: None) -> list[dict[str, Any]]:
    """Every node quantized alone, most sensitive first: ``{"node", "op", "sensitivity", "cosine",
    "max_abs_err", "top1_agreement"}`` with sensitivity = 1 - cosine against the float model."""
    rows = []
    path = work / "one-node.onnx"
    for node in nodes:
        quantize(path, nodes_to_quantize=[node.name])
        facts = score(path)
        cos = facts["cosine"]
        rows.append({"node": node.name, "op": node.op_type,
                     "sensitivity": None if cos is None else max(0.0, 1.0 - cos), **facts})
        tick(1)
    path.unlink(missing_ok=True)
    rows.sort(key=lambda r: -1.0 if r["sensitivity"] is None else r["sensitivity"], reverse=True)
    return rows


def fewest_float_nodes(quantize: Quantize, score: Scorer, ranking: Sequence[str], min_cosine: float, out: Path,
                       tick: Callable[..., None] = lambda *a, **k: None) -> dict[str, Any] | None:
    """A short prefix of ``ranking`` (most sensitive first) that, kept in float, lifts the cosine to
    ``min_cosine`` (the all-INT8 model is known to miss it); the model is left at ``out``. None when
    even every ranked node in float misses it."""
    tried: dict[int, float | None] = {}
    calls: list[int] = []

    def passes(k: int) -> bool:
        quantize(out, nodes_to_exclude=list(ranking[:k]))
        tried[k] = score(out)["cosine"]
        calls.append(k)
        tick(1)
        return tried[k] is not None and tried[k] >= min_cosine

    # Galloping from the top of the ranking (1, 2, 4, ... nodes), then bisection between the last
    # prefix that missed and the first that met the budget: O(log k) quantizations for an answer of k
    # nodes, and it finds a short prefix first where the cosine is not monotonic in the prefix length
    # (the PP-OCRv4 detector: the top 10 meet 0.99, the top 20 do not).
    lo, hi = 0, 1
    while hi < len(ranking) and not passes(hi):
        lo, hi = hi, min(2 * hi, len(ranking))
    if hi >= len(ranking) and not passes(len(ranking)):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    if calls[-1] != hi:  # leave the chosen model at `out`
        passes(hi)
    return {"kept_float": list(ranking[:hi]), "cosine": tried[hi], "quantizations": len(calls),
            "tried": {str(k): v for k, v in sorted(tried.items())}}
