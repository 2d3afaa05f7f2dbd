"""The golden-vector check a device runs on a new artifact before it may serve: the agent's
SELF_TEST (in a child process, see ``edgeopt.agent.update.selftest``) and the fleet simulator's
``self_test="golden"`` both use it.

Checks, in order: the artifact's hashes; the runtime loads it; every golden input, one at a time
and as one batch where the model takes batches, gives finite outputs within the manifest's
tolerance of the golden outputs (``expected:`` — the converted model's own — tightly, and the
original model's ``output:`` within ``golden.atol``); batch-1 latency p50 within the budget.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.artifact import load_expected, load_golden, open_artifact
from edgeopt.batching import run_samples, stack
from edgeopt.errors import EdgeoptError, MissingDependency, UserInputError
from edgeopt.runtime import EXTRA_FOR_FORMAT, Runtime, manifest_batch_axes, runtime_class

SELFTEST_CALLS = 20


@dataclass
class SelfTestResult:
    ok: bool
    reason: str | None
    details: dict[str, Any]


def load_runtime(root: Path, runtime_name: str = "", threads: int = 1) -> Runtime:
    """The artifact at ``root``, hashes verified, loaded with the runtime its manifest names."""
    artifact = open_artifact(root)
    artifact.verify()
    cls = runtime_class(artifact.manifest, runtime_name)
    try:
        return cls(artifact.model_file, threads=threads)
    except ImportError as exc:
        raise MissingDependency(exc.name or str(exc), EXTRA_FOR_FORMAT.get(artifact.format, "all"),
                                f"runtime '{cls.name}' (model format {artifact.format})") from exc


def check_artifact(root: Path, runtime_name: str = "", threads: int = 1,
                   budget_ms: float | None = None) -> SelfTestResult:
    """Load the artifact at ``root`` and run ``check_golden`` on it."""
    try:
        runtime = load_runtime(Path(root), runtime_name, threads)
    except EdgeoptError as exc:
        return SelfTestResult(False, f"does not load: {exc}", {})
    return check_golden(Path(root), runtime, budget_ms)


TOLERANCE_KEYS = {"expected": "expected_atol", "original": "atol"}


def _tolerance(golden_cfg: dict[str, Any], key: str) -> float | None:
    """The manifest's tolerance ``key`` when it is a finite, non-negative number, else None."""
    tol = golden_cfg.get(key)
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not math.isfinite(tol) or tol < 0:
        return None
    return float(tol)


def _compare_golden(outs: dict[str, np.ndarray], golden_cfg: dict[str, Any],
                    references: dict[str, dict[str, np.ndarray]], details: dict[str, Any]) -> str | None:
    """Why the outputs ``outs`` are not within tolerance of the golden references, or None.

    Fails closed: the original outputs must be there for every model output, and a reference set
    that is there must come with a finite tolerance and finite values (a NaN tolerance or reference
    would make every comparison false, so a broken model would pass). An artifact from before the
    converted model's own outputs were stored has no ``expected:`` set, and is compared with the
    original outputs only.
    """
    if not references["original"]:
        return "golden vectors hold no outputs to compare with"
    for kind, reference in references.items():
        if not reference:
            continue
        key = TOLERANCE_KEYS[kind]
        tol = _tolerance(golden_cfg, key)
        if tol is None:
            what = "missing" if golden_cfg.get(key) is None else f"not a finite number ({golden_cfg.get(key)!r})"
            return (f"manifest golden.{key} is {what}: the golden vectors cannot be checked (convert where the "
                    f"model runs, so its tolerance is measured)")
        for o in outs:
            if o not in reference:
                return f"golden vectors have no {kind} outputs for output '{o}'"
            ref = reference[o].astype(np.float64)
            if ref.shape != outs[o].shape:
                return (f"golden vectors: the {kind} outputs for '{o}' have shape {list(ref.shape)}, the model "
                        f"gives {list(outs[o].shape)}")
            if not np.isfinite(ref).all():
                return f"golden vectors: the {kind} outputs for '{o}' hold NaN or Inf"
            err = float(np.abs(outs[o].astype(np.float64) - ref).max())
            if math.isfinite(err):  # details travel as strict JSON
                details[f"{kind}_max_abs_err"] = max(err, details.get(f"{kind}_max_abs_err", 0.0))
            if not err <= tol:  # written so that a NaN error fails too
                return f"golden vectors: output '{o}' is {err:.4g} from the {kind} outputs (tolerance {tol:.4g})"
    return None


def check_golden(root: Path, rt: Runtime, budget_ms: float | None = None) -> SelfTestResult:
    """The golden vectors of the artifact at ``root`` through the loaded runtime ``rt``."""
    details: dict[str, Any] = {}
    manifest = open_artifact(root).manifest
    golden_cfg = manifest.get("golden") or {}
    if not isinstance(golden_cfg, dict):
        return SelfTestResult(False, "manifest 'golden' is not an object: the golden vectors cannot be checked", details)
    try:  # golden vectors hold samples along axis 0; each call stacks them along the manifest's batch axes
        rt.set_batch_axes(manifest_batch_axes(manifest, Path(root)))
    except UserInputError as exc:
        return SelfTestResult(False, str(exc), details)
    inputs, originals = load_golden(root / golden_cfg.get("file", "golden.npz"))
    expected = load_expected(root / golden_cfg.get("file", "golden.npz"))
    feeds = [spec.name for spec in rt.inputs]
    for name in feeds:
        if name not in inputs:
            return SelfTestResult(False, f"golden vectors have no input '{name}'", details)
    x = {name: inputs[name] for name in feeds}
    for name, arr in x.items():
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            bad = int(np.argmin(np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)))
            return SelfTestResult(False, f"golden vectors: input '{name}' sample {bad} holds NaN or Inf", details)
    n = len(x[feeds[0]])
    output_names = [spec.name for spec in rt.outputs]
    try:
        outs = run_samples(rt.run_float, rt.inputs, rt.outputs, x, 1)  # one sample per call
        for o, v in outs.items():
            if not np.isfinite(v).all():
                return SelfTestResult(False, f"output '{o}' has NaN/Inf on golden inputs", details)
        if rt.fixed_batch is None and n > 1:  # the same inputs as one batch must agree
            batched = run_samples(rt.run_float, rt.inputs, rt.outputs, x, n)
            for o in output_names:
                if not np.allclose(batched[o], outs[o], rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(outs[o]).max()))):
                    return SelfTestResult(False, f"output '{o}' differs between batch 1 and batch {n}", details)
    except EdgeoptError as exc:
        return SelfTestResult(False, f"inference failed on golden inputs: {exc}", details)
    problem = _compare_golden(outs, golden_cfg, {"expected": expected, "original": originals}, details)
    if problem is not None:
        return SelfTestResult(False, problem, details)
    fixed = rt.fixed_batch
    one = stack(rt.inputs, {k: v[:1] if fixed in (None, 1) else np.resize(v, (fixed, *v.shape[1:]))
                            for k, v in x.items()})
    times = []
    for _ in range(SELFTEST_CALLS):
        t0 = time.perf_counter()
        rt.run_float(one)
        times.append((time.perf_counter() - t0) * 1000)
    p50 = float(np.percentile(times, 50))
    details["latency_p50_ms"] = round(p50, 4)
    budget = budget_ms if budget_ms is not None else manifest.get("latency_budget_ms")
    details["latency_budget_ms"] = budget
    if budget is not None and p50 > float(budget):
        return SelfTestResult(False, f"latency p50 {p50:.3f} ms exceeds the budget {float(budget):g} ms", details)
    return SelfTestResult(True, None, details)
