"""The ONNX operator test cases shipped with the onnx package, for every op the tflite target claims:
how many convert and match their expected outputs on LiteRT (XNNPACK on), how many are refused with
a reason (unsupported attribute, dtype or mode), per op.

    python benchmarks/onnx_node_cases_tflite.py     # prints a table, writes benchmarks/results/onnx_node_cases_tflite.json
"""

from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

from common import ROOT, cli, print_table, write_json

sys.path.insert(0, str(ROOT / "tests"))

from tflite_harness import claimed_node_cases, run_node_case  # noqa: E402


def main() -> None:
    cli(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_node_case(case, Path(tmp) / str(i)) for i, case in enumerate(claimed_node_cases())]
    by_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    reasons: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in results:
        op = r.ops if "+" not in r.ops else "function expansions (several ops)"
        by_op[op][r.outcome] += 1
        by_op[op]["strict"] += r.within_1e4
        if r.outcome == "rejected":
            reasons[op][r.detail.split(": ", 1)[-1][:90]] += 1
    rows = []
    for op in sorted(by_op):
        c = by_op[op]
        total = sum(c[k] for k in ("passed", "rejected", "mismatch", "crashed"))
        rows.append([op, total, c["passed"], c["strict"], c["rejected"], c["mismatch"] + c["crashed"]])
    totals = [sum(r[i] for r in rows) for i in range(1, 6)]
    rows.append(["all", *totals])
    print_table("ONNX operator test cases through --target tflite (LiteRT, XNNPACK on)",
                ["op", "cases", "passed", "within 1e-4", "refused", "wrong"], rows)
    write_json("onnx_node_cases_tflite", {
        "per_op": {op: dict(c) for op, c in by_op.items()},
        "refusal_reasons": {op: dict(c) for op, c in reasons.items()},
        "passed": sorted(r.name for r in results if r.outcome == "passed"),
        "not_passed": [r.__dict__ for r in results if r.outcome != "passed"]})


if __name__ == "__main__":
    main()
