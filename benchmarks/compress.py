"""Compression recipes on the digits CNN: teacher vs structurally pruned vs pruned + distilled vs
+ INT8 (and the same at 25 % and 75 % of channels, and unstructured 80 % sparsity): parameters,
MACs, file size, ONNX Runtime latency (1 thread, batch 1 and 32, every variant measured interleaved
in one run), held-out accuracy, and the CPU time of the conversion (distillation included).

    python benchmarks/compress.py     # prints a table, writes benchmarks/results/compress.json and
                                      # docs/compress_accuracy_vs_size.png
"""

from __future__ import annotations

import gzip
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeopt.bench import measure
from edgeopt.converters.pipeline import ConvertOptions, convert
from edgeopt.runtime.onnxruntime import OnnxRuntime

from common import ROOT, print_table, write_json

PLOT = ROOT / "docs" / "compress_accuracy_vs_size.png"
EPOCHS = 30
# (label, recipe family for the plot, options)
VARIANTS = [
    ("teacher", "teacher", {}),
    ("teacher + int8", "teacher", {"quantize": "int8"}),
    ("pruned 50%", "pruned only", {"prune_channels": 0.5}),
    ("pruned 25% + distilled", "pruned + distilled", {"prune_channels": 0.25, "distill": True}),
    ("pruned 50% + distilled", "pruned + distilled", {"prune_channels": 0.5, "distill": True}),
    ("pruned 75% + distilled", "pruned + distilled", {"prune_channels": 0.75, "distill": True}),
    ("pruned 25% + distilled + int8", "pruned + distilled + int8",
     {"prune_channels": 0.25, "distill": True, "quantize": "int8"}),
    ("pruned 50% + distilled + int8", "pruned + distilled + int8",
     {"prune_channels": 0.5, "distill": True, "quantize": "int8"}),
    ("pruned 75% + distilled + int8", "pruned + distilled + int8",
     {"prune_channels": 0.75, "distill": True, "quantize": "int8"}),
    ("sparse 80% + distilled", "unstructured 80% + distilled", {"prune_sparsity": 0.8, "distill": True}),
    ("sparse 80% + distilled + int8", "unstructured 80% + distilled",
     {"prune_sparsity": 0.8, "distill": True, "quantize": "int8"}),
]


def main() -> None:
    import digits  # examples/ is on sys.path once `common` is imported

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        made = digits.make("cnn", tmp)
        split = digits.load_split()
        train = tmp / "train.npz"
        np.savez(train, image=split.x_train)  # distillation data: the training images, no labels
        paths = {}
        for label, family, opts in VARIANTS:
            out = tmp / label.replace(" ", "_").replace("%", "").replace("+", "")
            cpu0, wall0 = time.process_time(), time.perf_counter()
            res = convert(ConvertOptions(
                model=made["model"], output=out, target="onnx", quantize=opts.get("quantize", "none"),
                calibration=made["calibration"], validation=made["validation"],
                prune_channels=opts.get("prune_channels"), prune_sparsity=opts.get("prune_sparsity"),
                distill=train if opts.get("distill") else None, epochs=EPOCHS if opts.get("distill") else None))
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            report = res.report
            model_file = out / "model.onnx"
            distill = report["pass_details"].get("distill", {})
            results.append({
                "variant": label, "family": family, "options": {k: v for k, v in opts.items()},
                "params": report["artifact"]["params"], "macs": report["artifact"]["macs"],
                "size_bytes": report["artifact"]["size_bytes"],
                "gzip_bytes": len(gzip.compress(model_file.read_bytes(), 9)),
                "accuracy_percent": report["accuracy"]["converted"], "teacher_accuracy_percent": report["accuracy"]["original"],
                "distill_epochs": distill.get("epochs_run"), "distill_seconds": distill.get("seconds"),
                "convert_cpu_seconds": round(cpu, 2), "convert_wall_seconds": round(wall, 2),
            })
            paths[label] = model_file
        for batch in (1, 32):
            runtimes = [OnnxRuntime(paths[r["variant"]], threads=1) for r in results]
            feeds = [{"image": split.x_val[:batch]}] * len(runtimes)
            for r, stats in zip(results, measure(runtimes, feeds, rounds=7, min_round_s=0.2), strict=True):
                r[f"latency_b{batch}"] = stats.to_json()
    base = results[0]
    rows = []
    for r in results:
        r["macs_reduction"] = base["macs"] / r["macs"]
        r["size_ratio"] = r["size_bytes"] / base["size_bytes"]
        r["speedup_b1"] = base["latency_b1"]["p50_ms"] / r["latency_b1"]["p50_ms"]
        r["speedup_b32"] = base["latency_b32"]["p50_ms"] / r["latency_b32"]["p50_ms"]
        r["accuracy_drop_points"] = base["accuracy_percent"] - r["accuracy_percent"]
        rows.append([r["variant"], r["params"], r["macs"], r["macs_reduction"], r["size_bytes"], r["gzip_bytes"],
                     r["latency_b1"]["p50_ms"], r["speedup_b1"], r["latency_b32"]["p50_ms"], r["speedup_b32"],
                     r["accuracy_percent"], f"{-r['accuracy_drop_points']:+.2f}", r["convert_cpu_seconds"]])
    print_table("Compression recipes: digits CNN (449 held-out images, ONNX Runtime, 1 thread)",
                ["variant", "params", "MACs", "MACs ÷", "bytes", "gzip bytes", "p50 b1 ms", "speedup b1",
                 "p50 b32 ms", "speedup b32", "top-1 %", "Δ pts", "convert CPU s"], rows)
    write_json("compress", {"epochs": EPOCHS, "results": results})
    plot(results, PLOT)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    markers = {"teacher": "*", "pruned + distilled": "o", "pruned + distilled + int8": "s",
               "unstructured 80% + distilled": "^"}
    floor = min(r["accuracy_percent"] for r in results if r["family"] in markers) - 1.0
    for family, marker in markers.items():
        points = sorted((r["size_bytes"] / 1024, r["accuracy_percent"], r) for r in results
                        if r["family"] == family)
        if not points:
            continue
        xs, ys, rs = zip(*points, strict=True)
        ax.plot(xs, ys, marker=marker, linestyle="-" if len(xs) > 1 else "none", label=family, markersize=8)
        for x, y, r in points:
            opts = r["options"]
            kind = (f"{opts['prune_channels']:.0%} ch. " if "prune_channels" in opts else
                    "80% sparse " if "prune_sparsity" in opts else "")
            text = kind + ("int8" if opts.get("quantize") else "fp32")
            below = family.startswith("unstructured")
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(-10, -14 if below else 8), fontsize=7)
    for r in results:  # pruning without distillation is far below the plotted range: say so
        if r["family"] == "pruned only":
            x = r["size_bytes"] / 1024
            ax.annotate(f"{r['variant']}, no distillation: {r['accuracy_percent']:.1f} % (off scale)",
                        (x, floor + 0.05), xytext=(x * 0.55, floor + 0.35), fontsize=7,
                        arrowprops={"arrowstyle": "->", "lw": 0.8})
    ax.set_ylim(floor, 100)
    ax.set_xscale("log")
    ax.set_xlabel("model file size (KiB, log scale)")
    ax.set_ylabel("top-1 accuracy on held-out digits (%)")
    ax.set_title("digits CNN: accuracy against size per compression recipe")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
