"""Quality gates: is the converted model close enough to the original to ship?

Which gates apply (each lands in the report's ``gates`` with its value, threshold and source):

- validation data with class labels: the top-1 accuracy drop (default: warn above
  ``DEFAULT_MAX_ACCURACY_DROP`` points; ``--max-accuracy-drop`` makes it a failure);
- otherwise (no labels, or regression targets) the parity gate: cosine of the converted outputs with
  the original's (default: warn below ``DEFAULT_MIN_COSINE``) and, for classifier-shaped outputs
  ([N, C], C >= 2) on real inputs, top-1 agreement (default: warn below
  ``DEFAULT_MIN_TOP1_AGREEMENT``); not on generated random inputs, where healthy int4 conversions
  disagree on up to 4.7 % of samples (benchmarks/parity_gates.py) because random inputs sit near the
  decision boundaries;
- ``--min-cosine`` / ``--min-top1-agreement`` always apply, as failures.

A default gate that is missed gives ``status: warning`` (exit 0); a threshold the user set gives
``status: failed`` (exit 1, the artifact kept). The default thresholds are set from
benchmarks/parity_gates.py (numbers in docs/converter.md): healthy conversions of the digits CNN and
MLP and the IMU CNN, every quantization mode of the onnx and tflite targets, reach cosine >= 0.9974,
top-1 agreement >= 0.991 on real inputs and lose <= 0.54 points of accuracy; int8 calibrated on
unrepresentative data reaches cosine <= 0.84, agreement <= 0.85 and loses >= 13 points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MIN_COSINE = 0.99
DEFAULT_MIN_TOP1_AGREEMENT = 0.98
DEFAULT_MAX_ACCURACY_DROP = 1.0  # points of top-1 accuracy

# lowest to highest precision, for the hint
PRECISION_ORDER = ("int4", "int8-dynamic", "int8", "int16x8", "fp16", "none")


@dataclass(frozen=True)
class Thresholds:
    """What the user asked for (None: the default gate, a warning, where one applies)."""

    max_accuracy_drop: float | None = None
    min_cosine: float | None = None
    min_top1_agreement: float | None = None


@dataclass
class GateResult:
    checks: list[dict[str, Any]] = field(default_factory=list)  # the report's "gates"
    warnings: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _check(result: GateResult, gate: str, metric: str, label: str, value: float | None, threshold: float, *,
           lower_is_better: bool, flag: str | None, default_why: str, fmt: str) -> None:
    """Record one check and, when it misses its threshold, its warning (default) or failure (flag)."""
    missed = None if value is None else (value > threshold if lower_is_better else value < threshold)
    outcome = ("failed" if flag else "not measured") if value is None else (
        "failed" if missed and flag else "warning" if missed else "pass")
    result.checks.append({"gate": gate, "metric": metric, "value": value, "threshold": threshold,
                          "rule": "max" if lower_is_better else "min", "source": flag or "default",
                          "outcome": outcome})
    if value is None and flag:
        result.failures.append(f"{flag} {threshold:g}: the {label} could not be measured")
    elif missed:
        why = f"{flag} {threshold:g}" if flag else f"default gate: {default_why}"
        line = (f"{gate}: {label} {fmt.format(value)} is {'above' if lower_is_better else 'below'} "
                f"{fmt.format(threshold)} ({why})")
        (result.failures if flag else result.warnings).append(line)


def evaluate(par: dict[str, Any], acc: dict[str, Any], thresholds: Thresholds, task: str | None,
             generated_inputs: bool) -> GateResult:
    """The gates for one conversion. ``par`` / ``acc``: the report's parity and accuracy; ``task``:
    what the validation labels are ("classification", "regression" or None for no labels)."""
    result = GateResult()
    t = thresholds
    if task is not None and (t.max_accuracy_drop is not None or task == "classification"):
        top1 = task == "classification"
        _check(result, "accuracy", "top1_percent_drop" if top1 else "mae_increase",
               "top-1 accuracy drop" if top1 else "increase of the mean absolute error", acc.get("drop"),
               t.max_accuracy_drop if t.max_accuracy_drop is not None else DEFAULT_MAX_ACCURACY_DROP,
               lower_is_better=True, flag="--max-accuracy-drop" if t.max_accuracy_drop is not None else None,
               default_why="the validation data has class labels", fmt="{:.2f} points" if top1 else "{:.4g}")
    labelled = task == "classification"
    if t.min_cosine is not None or not labelled:
        _check(result, "parity", "cosine", "cosine", par.get("cosine"),
               t.min_cosine if t.min_cosine is not None else DEFAULT_MIN_COSINE, lower_is_better=False,
               flag="--min-cosine" if t.min_cosine is not None else None,
               default_why="no class labels" if task is None else "regression labels", fmt="{:.4f}")
    classifier = par.get("top1_agreement") is not None
    if t.min_top1_agreement is not None or (classifier and not labelled and task != "regression"
                                            and not generated_inputs):
        _check(result, "parity", "top1_agreement", "top-1 agreement", par.get("top1_agreement"),
               t.min_top1_agreement if t.min_top1_agreement is not None else DEFAULT_MIN_TOP1_AGREEMENT,
               lower_is_better=False, flag="--min-top1-agreement" if t.min_top1_agreement is not None else None,
               default_why="no class labels", fmt="{:.2%}")
    return result


def hint(quantize: str, quantize_modes: Sequence[str], compressed: bool, generated_inputs: bool) -> str:
    """What to try when a gate is missed, from what this conversion did."""
    tries = []
    if generated_inputs:
        tries.append("validate on real inputs (--validation DATA): these numbers come from random inputs")
    if quantize in ("int8", "int16x8"):
        tries.append("calibration data that looks like the real inputs (--calibration)")
    if quantize == "int4":
        tries.append("smaller INT4 blocks (--int4-block-size 16)")
    if quantize in PRECISION_ORDER:
        higher = [m for m in PRECISION_ORDER[PRECISION_ORDER.index(quantize) + 1:] if m in quantize_modes]
        if higher:
            tries.append(f"a higher precision (--quantize {' / '.join(higher)})")
    if compressed:
        tries.append("a lower pruning ratio or more --epochs (the report's steps give the agreement after "
                     "each step)")
    if not tries:  # a float conversion that disagrees: the target, not the settings
        tries.append("another --target, and report it with the output of `edgeopt inspect MODEL --json`")
    return "try " + "; or ".join(tries)
