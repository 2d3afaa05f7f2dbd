"""Per-node INT8 sensitivity and the search for the fewest float nodes that meet an accuracy budget.

Shared by ``edgeopt analyze`` (the ranking), the ``quantize-int8`` pass (``min_cosine`` /
``max_accuracy_drop``: when the all-INT8 model misses the budget, the most sensitive nodes stay float,
as few as galloping and bisection over the ranking find -- O(log k) quantizations) and the tflite
target, which runs the same search with LiteRT's quantizer. Every quantization reads the activation
ranges from one calibration, so a node's cost is one quantizer rewrite and one run on the validation
inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeopt.converters.validate import Parity, accuracy
from edgeopt.data import Dataset
from edgeopt.errors import UserInputError
from edgeopt.runtime import run_batched
from edgeopt.runtime.onnxruntime import OnnxRuntime

WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
BATCH = 8
COSINE_SAMPLES = 64  # validation samples a cosine budget compares on
ACCURACY_SAMPLES = 2048  # and an accuracy budget: enough that one sample is not the whole budget

# quantize(out_path, nodes_to_quantize=None, nodes_to_exclude=None): writes a QDQ model of the same
# pre-processed float model, ranges from the same calibration
Quantize = Callable[..., None]


@dataclass(frozen=True)
class Budget:
    """What a mixed-precision model must reach against the float model: a cosine (no labels needed)
    and/or a drop of the labelled metric (top-1 points, or the MAE increase for regression labels)."""

    min_cosine: float | None = None
    max_accuracy_drop: float | None = None

    @classmethod
    def given(cls, min_cosine: float | None, max_accuracy_drop: float | None, validation: Dataset | None) -> Budget:
        """The budget a search can hold: an accuracy drop only where the validation data has labels."""
        labelled = validation is not None and validation.labels is not None
        return cls(min_cosine, max_accuracy_drop if labelled else None)

    def scoring_data(self, validation: Dataset) -> tuple[Dataset, np.ndarray | None]:
        """The validation samples the search scores on, and the labels when the accuracy counts."""
        labelled = self.max_accuracy_drop is not None and validation.labels is not None
        data = validation.take(ACCURACY_SAMPLES if labelled else COSINE_SAMPLES)
        return data, data.labels if labelled else None

    def __bool__(self) -> bool:
        return self.min_cosine is not None or self.max_accuracy_drop is not None

    def met(self, facts: Mapping[str, Any]) -> bool:
        if self.min_cosine is not None and (facts.get("cosine") is None or facts["cosine"] < self.min_cosine):
            return False
        drop = facts.get("accuracy_drop")
        return self.max_accuracy_drop is None or (drop is not None and drop <= self.max_accuracy_drop)

    def to_json(self) -> dict[str, float]:
        return {k: v for k, v in (("min_cosine", self.min_cosine), ("max_accuracy_drop", self.max_accuracy_drop))
                if v is not None}

    def __str__(self) -> str:
        parts = [f"cosine >= {self.min_cosine}"] if self.min_cosine is not None else []
        if self.max_accuracy_drop is not None:
            parts.append(f"accuracy drop <= {self.max_accuracy_drop}")
        return ", ".join(parts)


# run(model) -> the model's float outputs by name, samples along axis 0
Run = Callable[[Any], dict[str, np.ndarray]]


class Scorer:
    """Outputs of a quantized model against the float model's on fixed inputs, and against the labels
    when there are any (the accuracy drop the gate measures)."""

    def __init__(self, run: Run, float_model: Any, labels: np.ndarray | None = None, task: str | None = None):
        self.run, self.labels, self.task = run, labels, task
        self.reference = run(float_model)
        self.names = list(self.reference)

    @classmethod
    def onnx(cls, float_model: Path, inputs: Mapping[str, np.ndarray], labels: np.ndarray | None = None,
             task: str | None = None) -> Scorer:
        """Both models run by ONNX Runtime, one thread, without its memory arena."""
        feeds = dict(inputs)
        return cls(lambda m: run_batched(OnnxRuntime(m, threads=1, memory_arena=False), feeds, BATCH),
                   float_model, labels, task)

    def __call__(self, model: Any) -> dict[str, Any]:
        got = self.run(model)
        acc = Parity(self.names)
        acc.add([self.reference[n] for n in self.names], [got[n] for n in self.names])
        par = acc.result()
        facts = {"cosine": par["cosine"], "max_abs_err": par["max_abs_err"], "top1_agreement": par["top1_agreement"]}
        if self.labels is not None:
            first = self.names[0]
            facts["accuracy_drop"] = accuracy(self.labels, self.reference[first], got[first], self.task)["drop"]
        return facts


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


def fewest_float_nodes(quantize: Quantize, score: Scorer, ranking: Sequence[str], budget: Budget, out: Path,
                       tick: Callable[..., None] = lambda *a, **k: None) -> dict[str, Any] | None:
    """A short prefix of ``ranking`` (most sensitive first) that, kept in float, meets ``budget`` (the
    all-INT8 model is known to miss it); the model is left at ``out``. None when even every ranked node
    in float misses it."""
    tried: dict[int, dict[str, Any]] = {}
    calls: list[int] = []

    def passes(k: int) -> bool:
        quantize(out, nodes_to_exclude=list(ranking[:k]))
        tried[k] = score(out)
        calls.append(k)
        tick(1)
        return budget.met(tried[k])

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
    found = {"kept_float": list(ranking[:hi]), "cosine": tried[hi]["cosine"], "quantizations": len(calls),
             "tried": {str(k): v["cosine"] for k, v in sorted(tried.items())}}
    if "accuracy_drop" in tried[hi]:
        found["accuracy_drop"] = tried[hi]["accuracy_drop"]
        found["tried_accuracy_drop"] = {str(k): v["accuracy_drop"] for k, v in sorted(tried.items())}
    return found


def kept_float_nodes(value: str | None) -> list[str]:
    """The node names of a --keep-float value ("a,b"; repeated flags arrive joined), blanks dropped."""
    return [n.strip() for n in (value or "").split(",") if n.strip()]


def refuse_unknown_nodes(nodes: Sequence[str], known: Iterable[str], lowered_to: str = "") -> None:
    """--keep-float naming nodes the model (as ``lowered_to`` a format lowers it) does not have: refused,
    naming them."""
    if unknown := sorted(set(nodes) - set(known)):
        where = f" as lowered to {lowered_to}" if lowered_to else ""
        raise UserInputError(f"--keep-float: no node named {', '.join(map(repr, unknown))} in the model{where} "
                             f"(`edgeopt inspect` lists the node names)")


# where the pass details keep a mixed-precision search's record: ONNX Runtime's pass, the tflite target
SEARCHES = (("quantize-int8", "onnxruntime"), ("quantize-tflite", "litert-quantizer"), ("quantize-coreml", "coremltools"))


def searched(details: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """The mixed-precision record in a conversion's pass details, and the quantizer that made it."""
    for name, quantizer in SEARCHES:
        if found := (details.get(name) or {}).get("mixed_precision"):
            return found, quantizer
    return None


def report_summary(details: dict[str, Any], model_bytes: int, fmt: str,
                   latency: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The report's summary of an INT8 model with nodes left float (by --keep-float or the budget
    search): which, at what precision, what the budget asked and reached, and the size and (when the
    all-INT8 model ran beside it: ``latency``) the time it costs."""
    found = (searched(details) or ({}, ""))[0]
    kept = (details.get("quantize-int8") or {}).get("kept_float") or found.get("kept_float")
    if not kept:
        return None
    precision = found.get("precision") or (details.get("quantize-int8") or {}).get("precision") or "float32"
    summary = {"kept": [{"node": n, "precision": precision} for n in kept],
               "budget": {k: found[k] for k in ("min_cosine", "max_accuracy_drop") if k in found}}
    for key in ("cosine_all_int8", "cosine", "accuracy_drop_all_int8", "accuracy_drop", "quantizations"):
        if key in found:
            summary[key] = found[key]
    if "size_bytes_all_int8" in found and fmt in ("onnx", "tflite"):  # the same format as the artifact
        summary.update(size_bytes=model_bytes, size_bytes_all_int8=found["size_bytes_all_int8"],
                       size_increase=round(model_bytes / found["size_bytes_all_int8"], 4))
    if latency is not None:
        summary["latency"] = latency
    return summary


def cosine_distances(pairs: Mapping[str, tuple[str, str]],
                     runs: Iterable[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]) -> dict[str, float | None]:
    """For each key of ``pairs`` (a node: its tensor's name in the float run, in the quantized run),
    1 - cosine of the two tensors over all ``runs`` (float tensors, quantized tensors: one per sample,
    accumulated, so no more than one sample's tensors are held). None where a run lacks the tensor."""
    sums = {node: np.zeros(3) for node in pairs}  # a.b, a.a, b.b
    for a, b in runs:
        for node, (f, q) in pairs.items():
            if f in a and q in b and a[f].size == b[q].size:
                x, y = np.asarray(a[f], np.float64).ravel(), np.asarray(b[q], np.float64).ravel()
                sums[node] += (x @ y, x @ x, y @ y)
    return {node: max(0.0, 1.0 - dot / np.sqrt(xx * yy)) if xx > 0 and yy > 0 else None
            for node, (dot, xx, yy) in ((n, map(float, v)) for n, v in sums.items())}
