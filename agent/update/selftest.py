"""SELF_TEST: load a staged artifact the way the agent will run it and check its golden vectors
(``edgeopt.golden_vectors``) before it may serve.

    python -m edgeopt.agent.update.selftest SLOT_DIR [--runtime NAME] [--threads N] [--budget-ms X]

prints one JSON line ``{"ok": bool, "reason": str|null, ...measurements}`` and exits 0 either way.
The agent runs this in a child process with a timeout: a model that crashes its runtime on load
(a native library that aborts, a runtime bug) kills the child, not the agent, and the crash becomes
the reason for the rollback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgeopt.agent.model import load_model
from edgeopt.errors import EdgeoptError
from edgeopt.fsutil import strict_json
from edgeopt.golden_vectors import SelfTestResult, check_golden


def check_slot(slot: Path, runtime_name: str = "", threads: int = 1, budget_ms: float | None = None) -> SelfTestResult:
    """The agent's own loading (one input, its windowing) first, then the golden vectors."""
    try:
        model = load_model(slot, None, runtime_name, threads)
    except EdgeoptError as exc:
        return SelfTestResult(False, f"does not load: {exc}", {})
    return check_golden(slot, model.runtime, budget_ms)


def run_in_child(slot: Path, runtime_name: str = "", threads: int = 1, budget_ms: float | None = None,
                 timeout_s: float = 60.0) -> SelfTestResult:
    """``check_slot`` in a child process; a crash or a hang is a failed self-test."""
    import subprocess  # here: 0.6 MiB of the agent's memory until an update comes

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
    result = check_slot(args.slot, args.runtime, args.threads, args.budget_ms)
    print(strict_json({"ok": result.ok, "reason": result.reason, "details": result.details}), flush=True)


if __name__ == "__main__":
    main()
