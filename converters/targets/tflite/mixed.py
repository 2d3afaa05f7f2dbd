"""Mixed precision on the tflite target: INT8 with some layers left in float.

TFLite's classic calibrator (``quantize.full_integer``) quantizes every operator or fails; LiteRT's
own quantizer (litert-quantizer) takes a recipe per operator scope, and its ``no_quantize`` entries
leave an operator float between a DEQUANTIZE and a QUANTIZE. So once nodes are to stay float --
named by ``--keep-float``, or found by the search for ``--min-cosine`` / ``--max-accuracy-drop`` --
the model is quantized by litert-quantizer from **one** calibration (its calibration result is
reused by every recipe), and:

- the all-INT8 model from the classic path is scored first; a model that meets the budget is kept;
- otherwise every candidate (each ONNX node, through the operators it was lowered to) is quantized
  alone and scored: its sensitivity, as ``edgeopt analyze`` ranks ONNX Runtime's nodes;
- ``mixed_precision.fewest_float_nodes`` gallops and bisects over that ranking.

Scores compare LiteRT outputs with the float .tflite's on the validation inputs (in the model's layout),
with the labels' metric where ``--max-accuracy-drop`` asks for it. Nodes are ONNX node names
throughout, mapped to operators by the lowering (``Builder.node_scopes``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from edgeopt.converters.passes import ConversionError, PassContext
from edgeopt.converters.passes.mixed_precision import (
    Budget,
    Quantize,
    Scorer,
    cosine_distances,
    fewest_float_nodes,
    refuse_unknown_nodes,
    sensitivities,
)
from edgeopt.converters.passes.quantize import KEPT_PRECISIONS
from edgeopt.converters.targets.tflite.quantize import (
    calibration_batches,
    input_details,
    litert_quantize,
    quiet_litert_quantizer,
)
from edgeopt.data import Dataset
from edgeopt.errors import UserInputError
from edgeopt.runtime import run_batched
from edgeopt.runtime.litert import LiteRtRuntime, interpreter_module

WEIGHT_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "BATCH_MATMUL"})
RANKING_KEPT = 20


class Candidate(NamedTuple):  # what mixed_precision.sensitivities reads of a node
    name: str
    op_type: str


class LiteRtQuantizer:
    """litert-quantizer's static INT8 (int8 activations, channel-wise int8 weights) of one float model,
    calibrated once; ``quantize`` writes any mix of float and INT8 operators."""

    def __init__(self, data: bytes, batches: Sequence[Sequence[np.ndarray]], input_names: Sequence[str]):
        from litert_quantizer import quantizer, recipe

        self.data = data
        self.static = recipe.static_wi8_ai8()
        self.wide = recipe.static_wi8_ai16()
        qt = quantizer.Quantizer(bytearray(data))
        qt.load_quantization_recipe(self.static)
        signatures = _signature_inputs(data)
        if len(signatures) != 1:
            raise ConversionError(f"tflite: mixed precision needs a model with one signature, found {len(signatures)}")
        (key, names), = signatures.items()
        if sorted(names) != sorted(input_names):
            raise ConversionError(f"tflite: the model's signature inputs {names} are not its input tensors "
                                  f"{list(input_names)}")
        with quiet_litert_quantizer():
            self.ranges = qt.calibrate({key: [dict(zip(input_names, b, strict=True)) for b in batches]})

    def quantize(self, out: Path, *, float_scopes: Iterable[str] = (), only_scopes: Iterable[str] | None = None,
                 wide: bool = False) -> None:
        """INT8 except the operators of ``float_scopes`` (float, or with ``wide`` int16 activations and
        int8 weights: LiteRT's 16x8); with ``only_scopes``, float except those."""
        if only_scopes is not None:
            recipe = [{**self.static[0], "regex": _anchored(s)} for s in only_scopes]
        elif wide:
            a16w8 = self.wide[0]
            recipe = list(self.static) + [{**a16w8, "regex": _anchored(s)} for s in float_scopes]
        else:
            recipe = list(self.static) + [{"regex": _anchored(s), "operation": "*", "algorithm_key": "no_quantize",
                                           "op_config": {"compute_precision": "FLOAT"}} for s in float_scopes]
        out.write_bytes(litert_quantize(self.data, recipe, self.ranges))


def _anchored(scope: str) -> str:
    return f"^{re.escape(scope)}$"


def _signature_inputs(data: bytes) -> dict[str, list[str]]:
    it = interpreter_module().Interpreter(model_content=data)
    return {k: list(v["inputs"]) for k, v in it.get_signature_list().items()}


def model_inputs(data: Dataset, io_transposes: Mapping[str, list[int]]) -> dict[str, np.ndarray]:
    """The dataset's inputs (samples along axis 0) in the .tflite model's layout."""
    if any(data.axes.get(name, 0) != 0 for name in data.inputs):
        raise UserInputError("mixed precision on the tflite target needs every input's samples along axis 0 "
                             f"(--batch-axis gave {data.axes})")
    return {name: np.transpose(arr, io_transposes[name]) if name in io_transposes else arr
            for name, arr in data.inputs.items()}


def mixed_int8(float_data: bytes, all_int8: bytes | None, ctx: PassContext, *, keep: Sequence[str], budget: Budget,
               node_scopes: Mapping[str, Sequence[tuple[str, str]]], io_transposes: Mapping[str, list[int]],
               wide: bool = False) -> tuple[bytes, dict[str, Any]]:
    """The quantized model and the report's ``mixed_precision`` details. ``all_int8``: the classic
    calibrator's model (None when ``keep`` names nodes, which it cannot leave float); ``node_scopes``:
    ONNX node → (TFLite builtin, scope) of each operator it was lowered to; ``wide``: the nodes kept out
    of INT8 get int16 activations and int8 weights (16x8) instead of float."""
    refuse_unknown_nodes(keep, node_scopes, "TFLite")
    work = ctx.workdir
    float_path, out = work / "mixed-float.tflite", work / "mixed-int8.tflite"
    float_path.write_bytes(float_data)
    score = _scorer(float_path, ctx, budget, io_transposes)
    details: dict[str, Any] = {**budget.to_json(), "kept_float": list(keep), "quantizer": "litert-quantizer",
                               "precision": KEPT_PRECISIONS["int16" if wide else "float"]}
    if all_int8 is not None:
        out.write_bytes(all_int8)
        facts = score(out) if score is not None else {}
        details.update(quantizer="tflite-calibrator", cosine_all_int8=facts.get("cosine"),
                       cosine=facts.get("cosine"), size_bytes_all_int8=len(all_int8))
        if "accuracy_drop" in facts:
            details["accuracy_drop_all_int8"] = details["accuracy_drop"] = facts["accuracy_drop"]
        if score is None or budget.met(facts):
            return all_int8, details
        ctx.all_int8 = work / "all-int8.tflite"
        ctx.all_int8.write_bytes(all_int8)
    quantize = node_quantizer(calibrated(float_data, ctx, io_transposes), node_scopes, keep, wide)
    quantize(out)
    if score is None:  # --keep-float alone: nothing to search
        return out.read_bytes(), details
    # every node the lowering made operators for: weights alone are not enough where the error builds
    # up in the adds, activations and pools between them (the PP-LCNet classifier: all 54 weight layers
    # float still miss cosine 0.997)
    candidates = node_candidates(node_scopes, exclude=keep)
    with ctx.progress("ranking layers for mixed precision", len(candidates)) as tick:
        rows = sensitivities(quantize, score, candidates, work, tick)
    details["ranking"] = rows[:RANKING_KEPT]  # the report's analysis when the gate still fails
    ranking = [row["node"] for row in rows]
    with ctx.progress("keeping the fewest layers float", None) as tick:
        search = fewest_float_nodes(quantize, score, ranking, budget, out, tick)
    details["candidates"] = len(ranking)
    if search is None:
        kept = "the all-INT8 model" if all_int8 is not None else "the model with only the --keep-float nodes float"
        ctx.notes.append(f"tflite: even with all {len(ranking)} nodes in float the budget ({budget}) is missed; "
                         f"{kept} is kept")
        if all_int8 is not None:
            return all_int8, details
        quantize(out)  # the search left its last try at `out`
        return out.read_bytes(), details
    details.update(search, kept_float=list(keep) + search["kept_float"], quantizer="litert-quantizer")
    return out.read_bytes(), details


def calibrated(float_data: bytes, ctx: PassContext, io_transposes: Mapping[str, list[int]]) -> LiteRtQuantizer:
    """litert-quantizer calibrated once on ``ctx.calibration`` (in the model's layout)."""
    inputs = input_details(float_data)
    batches = calibration_batches(ctx, "int8", inputs, dict(io_transposes))
    with ctx.progress("calibrating (litert-quantizer)", None):
        return LiteRtQuantizer(float_data, batches, [d["name"] for d in inputs])


def node_quantizer(lq: LiteRtQuantizer, node_scopes: Mapping[str, Sequence[tuple[str, str]]],
                   keep: Sequence[str] = (), wide: bool = False) -> Quantize:
    """``mixed_precision``'s quantize call in ONNX node names: INT8 but ``keep`` and ``nodes_to_exclude``
    (float, or 16x8 with ``wide``), or (``nodes_to_quantize``) float but those, through the operators
    each node was lowered to."""
    scopes = {node: [scope for _, scope in ops] for node, ops in node_scopes.items()}
    kept_scopes = [s for node in keep for s in scopes[node]]

    def quantize(path: Path, nodes_to_quantize=None, nodes_to_exclude=()) -> None:
        if nodes_to_quantize is not None:
            lq.quantize(path, only_scopes=[s for n in nodes_to_quantize for s in scopes[n]])
        else:
            lq.quantize(path, float_scopes=kept_scopes + [s for n in nodes_to_exclude for s in scopes[n]], wide=wide)

    return quantize


def node_candidates(node_scopes: Mapping[str, Sequence[tuple[str, str]]], exclude: Sequence[str] = (),
                    weights_only: bool = False) -> list[Candidate]:
    """Every ONNX node the lowering made operators for, named by its weight-carrying operator where it
    has one (else its first)."""
    found = [Candidate(node, next((b for b, _ in ops if b in WEIGHT_OPS), ops[0][0]))
             for node, ops in node_scopes.items() if node not in exclude and ops]
    return [c for c in found if not weights_only or c.op_type in WEIGHT_OPS]


def analyze_int8(float_data: bytes, ctx: PassContext, io_transposes: Mapping[str, list[int]],
                 node_scopes: Mapping[str, Sequence[tuple[str, str]]], weights_only: bool = False
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``edgeopt analyze --target tflite``: (the all-INT8 model against float, every node quantized
    alone against float, most sensitive first), LiteRT running both on ``ctx.validation``."""
    work = ctx.workdir
    float_path, whole = work / "analyze-float.tflite", work / "analyze-int8.tflite"
    float_path.write_bytes(float_data)
    feeds = model_inputs(ctx.validation, io_transposes)
    score = Scorer(lambda path: run_batched(LiteRtRuntime(path, threads=1), feeds), float_path)
    quantize = node_quantizer(calibrated(float_data, ctx, io_transposes), node_scopes)
    quantize(whole)
    baseline = score(whole)
    candidates = node_candidates(node_scopes, weights_only=weights_only)
    with ctx.progress("quantizing one node at a time", len(candidates)) as tick:
        rows = sensitivities(quantize, score, candidates, work, tick)
    errors = layer_errors(float_path, whole, node_scopes, {k: v[:LAYER_ERROR_SAMPLES] for k, v in feeds.items()})
    return baseline, [{**row, "layer_error": errors.get(row["node"])} for row in rows]


# Keeping every tensor needs LiteRT's reference kernels (XNNPACK computes inside its delegate): slower, so
# the per-layer error is taken over the first samples only.
LAYER_ERROR_SAMPLES = 16


def layer_errors(float_path: Path, int8_path: Path, node_scopes: Mapping[str, Sequence[tuple[str, str]]],
                 feeds: Mapping[str, np.ndarray]) -> dict[str, float | None]:
    """Where the INT8 model's error stands at each ONNX node: 1 - cosine of the output tensor of the last
    operator the node was lowered to (dequantized) against the float model's, LiteRT keeping every
    tensor (``preserve_all_tensors``), a sample at a time."""
    outputs = {node: ops[-1][1].split(";")[0] for node, ops in node_scopes.items() if ops}
    run_float, run_int8 = _all_tensors(float_path), _all_tensors(int8_path)
    samples = ({k: v[i:i + 1] for k, v in feeds.items()} for i in range(len(next(iter(feeds.values())))))
    return cosine_distances({node: (name, name) for node, name in outputs.items()},
                            ((run_float(s), run_int8(s)) for s in samples))


def _all_tensors(path: Path):
    """A function running the .tflite at ``path`` on float feeds (quantized for an integer input) and
    returning every tensor it computed, as float, by name."""
    rt = LiteRtRuntime(path, threads=1, xnnpack=False, preserve_all_tensors=True)

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rt.run_float(feeds)
        return rt.all_tensors()

    return run


def _scorer(float_path: Path, ctx: PassContext, budget: Budget, io_transposes: Mapping[str, list[int]]
            ) -> Scorer | None:
    """LiteRT outputs against the float .tflite's on the validation inputs; None without a budget."""
    if not budget:
        return None
    data, labels = budget.scoring_data(ctx.validation if ctx.validation is not None else ctx.calibration)
    feeds = model_inputs(data, io_transposes)
    return Scorer(lambda path: run_batched(LiteRtRuntime(path, threads=1), feeds), float_path, labels, data.task)
