"""SELF_TEST: load a staged artifact with its runtime and check it before it may serve.

    python -m edgeopt.agent.update.selftest SLOT_DIR [--runtime NAME] [--threads N] [--budget-ms X]

prints one JSON line ``{"ok": bool, "reason": str|null, ...measurements}`` and exits 0 either way.
The agent runs this in a child process with a timeout: a model that crashes its runtime on load
(a native library that aborts, a runtime bug) kills the child, not the agent, and the crash becomes
the reason for the rollback.

Checks, in order: the artifact's hashes; the runtime loads it; every golden input, one at a time
and as one batch where the model takes batches, gives finite outputs within the manifest's
tolerance of the golden outputs (``expected:`` — the converted model's own — tightly, and the
original model's ``output:`` within ``golden.atol``); batch-1 latency p50 within the budget.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SELFTEST_CALLS = 20


@dataclass
class SelfTestResult:
    ok: bool
    reason: str | None
    details: dict[str, Any]


def check_artifact(slot: Path, runtime_name: str = "", threads: int = 1, budget_ms: float | None = None) -> SelfTestResult:
    import numpy as np

    from edgeopt.agent.model import load_model
    from edgeopt.artifact import load_expected, load_golden
    from edgeopt.errors import EdgeoptError

    details: dict[str, Any] = {}
    try:
        model = load_model(slot, None, runtime_name, threads)
    except EdgeoptError as exc:
        return SelfTestResult(False, f"does not load: {exc}", details)
    manifest = model_manifest(slot)
    golden_cfg = manifest.get("golden") or {}
    inputs, originals = load_golden(slot / golden_cfg.get("file", "golden.npz"))
    expected = load_expected(slot / golden_cfg.get("file", "golden.npz"))
    feed_name = model.input_name
    if feed_name not in inputs:
        return SelfTestResult(False, f"golden vectors have no input '{feed_name}'", details)
    x = inputs[feed_name]
    rt = model.runtime
    try:
        singles = [rt.run_float({feed_name: x[i:i + 1]}) for i in range(len(x))]
        outs = {n: np.concatenate([s[n] for s in singles]) for n in model.output_names}
        for n, v in outs.items():
            if not np.isfinite(v).all():
                return SelfTestResult(False, f"output '{n}' has NaN/Inf on golden inputs", details)
        if rt.fixed_batch is None and len(x) > 1:  # the same inputs as one batch must agree
            batched = rt.run_float({feed_name: x})
            for n in model.output_names:
                if not np.allclose(batched[n], outs[n], rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(outs[n]).max()))):
                    return SelfTestResult(False, f"output '{n}' differs between batch 1 and batch {len(x)}", details)
    except EdgeoptError as exc:
        return SelfTestResult(False, f"inference failed on golden inputs: {exc}", details)
    for kind, reference, tol in (("expected", expected, golden_cfg.get("expected_atol")),
                                 ("original", originals, golden_cfg.get("atol"))):
        for n, ref in reference.items():
            if n not in outs or tol is None:
                continue
            err = float(np.abs(outs[n].astype(np.float64) - ref).max())
            details[f"{kind}_max_abs_err"] = max(err, details.get(f"{kind}_max_abs_err", 0.0))
            if err > tol:
                return SelfTestResult(False, f"golden vectors: output '{n}' is {err:.4g} from the {kind} outputs "
                                             f"(tolerance {tol:.4g})", details)
    one = {feed_name: x[:1] if rt.fixed_batch in (None, 1) else np.resize(x, (rt.fixed_batch, *x.shape[1:]))}
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


def model_manifest(slot: Path) -> dict[str, Any]:
    return json.loads((slot / "manifest.json").read_text())


def run_in_child(slot: Path, runtime_name: str = "", threads: int = 1, budget_ms: float | None = None,
                 timeout_s: float = 60.0) -> SelfTestResult:
    """``check_artifact`` in a child process; a crash or a hang is a failed self-test."""
    cmd = [sys.executable, "-m", "edgeopt.agent.update.selftest", str(slot), "--threads", str(threads)]
    if runtime_name:
        cmd += ["--runtime", runtime_name]
    if budget_ms is not None:
        cmd += ["--budget-ms", repr(budget_ms)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return SelfTestResult(False, f"self-test did not finish within {timeout_s:g} s", {})
    if proc.returncode < 0:
        return SelfTestResult(False, f"the runtime crashed loading the model (signal {-proc.returncode})", {})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return SelfTestResult(False, f"self-test exited {proc.returncode}: {tail}", {})
    out = json.loads(lines[-1])
    return SelfTestResult(bool(out["ok"]), out.get("reason"), out.get("details", {}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m edgeopt.agent.update.selftest", description=__doc__.split("\n")[0])
    ap.add_argument("slot", type=Path)
    ap.add_argument("--runtime", default="")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget-ms", type=float, default=None)
    args = ap.parse_args(argv)
    result = check_artifact(args.slot, args.runtime, args.threads, args.budget_ms)
    print(json.dumps({"ok": result.ok, "reason": result.reason, "details": result.details}), flush=True)


if __name__ == "__main__":
    main()
