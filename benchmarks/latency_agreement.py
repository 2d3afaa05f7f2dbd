"""Do `edgeopt convert`'s report latency and `edgeopt bench` agree for one artifact? Both run as a
user runs them (the console scripts, in subprocesses) on the same artifact, batch 1, 1 thread, with
their default settings; each artifact is converted and benched several times, alternating, and the
ratios (bench / convert) of p50 latency and throughput are printed per run and as the median.

    python benchmarks/latency_agreement.py                       # prints the table only
    python benchmarks/latency_agreement.py --out DIR   # and writes DIR/latency_agreement.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import add_out_option, print_table, write_json

EXE = Path(sys.executable).parent / "edgeopt"
# (label, digits model, convert options)
CASES = [
    ("cnn onnx fp32", "cnn", ["--target", "onnx"]),
    ("cnn onnx int8", "cnn", ["--target", "onnx", "--quantize", "int8"]),
    ("mlp-1m onnx fp32", "mlp-1m", ["--target", "onnx"]),
    ("cnn tflite int8", "cnn", ["--target", "tflite", "--quantize", "int8"]),
]
FIELDS = ("p50_ms", "throughput_per_s")


def edgeopt(*args: str | Path) -> dict:
    proc = subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"edgeopt {' '.join(map(str, args))} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="conversions (each followed by a bench) per artifact")
    add_out_option(ap)
    args = ap.parse_args()
    import digits  # examples/, put on the path by common

    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        made = {kind: digits.make(kind, tmp / kind) for kind in {kind for _, kind, _ in CASES}}
        for label, kind, options in CASES:
            runs = []
            for i in range(args.runs):
                out = tmp / f"{label.replace(' ', '-')}-{i}"
                report = edgeopt("convert", made[kind]["model"], "-o", out, *options, "--calibration",
                                 made[kind]["calibration"], "--threads", "1", "-q", "--json")["latency"]
                benched = edgeopt("bench", out, "--batch", "1", "--threads", "1", "--json")["results"][0]
                runs.append({"convert": {k: report[k] for k in FIELDS}, "bench": {k: benched[k] for k in FIELDS},
                             "ratio": {k: benched[k] / report[k] for k in FIELDS}})
                rows.append([label, i + 1, report["p50_ms"], benched["p50_ms"], runs[-1]["ratio"]["p50_ms"],
                             report["throughput_per_s"], benched["throughput_per_s"],
                             runs[-1]["ratio"]["throughput_per_s"]])
            median = {k: statistics.median(r["ratio"][k] for r in runs) for k in FIELDS}
            rows.append([label, "median", None, None, median["p50_ms"], None, None, median["throughput_per_s"]])
            results.append({"case": label, "options": options, "runs": runs, "median_ratio": median})
    print_table("convert report vs edgeopt bench: same artifact, batch 1, 1 thread, default settings",
                ["artifact", "run", "convert p50 ms", "bench p50 ms", "p50 ratio", "convert /s", "bench /s",
                 "throughput ratio"], rows)
    worst = max(abs(r["median_ratio"][k] - 1) for r in results for k in FIELDS)
    print(f"largest deviation of a median ratio from 1: {worst:.1%}")
    write_json("latency_agreement", {"results": results})


if __name__ == "__main__":
    main()
