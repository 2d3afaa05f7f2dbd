"""Compression recipes on the digits CNN: teacher vs structurally pruned vs pruned + distilled vs
+ INT8 (and the same at 25 % and 75 % of channels, and unstructured 80 % sparsity): parameters,
MACs, file size, ONNX Runtime latency (1 thread, batch 1 and 32, every variant measured interleaved
in one run), held-out accuracy, and the CPU time of the conversion (distillation included).

The unstructured 80 % model also goes to .tflite (FP32 and INT8) with TFLite sparse weight storage
and without it (``sparse_min_zeros=1``): file size, LiteRT latency (batch 1, 1 thread, XNNPACK on,
interleaved), held-out accuracy, and what densifying costs once: interpreter creation +
``allocate_tensors`` and the first invoke, median of fresh loads, XNNPACK on and off — for the
digits CNN and for the 1.1 M-weight digits MLP pruned the same way (where it is big enough to see).

    python benchmarks/compress.py                 # both; writes compress.json and
                                                  # compress_accuracy_vs_size.png to --out (default
                                                  # build/benchmarks/; docs/ holds the recorded plot)
    python benchmarks/compress.py tflite-sparse   # only the .tflite rows: compress_tflite_sparse.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeopt.bench import BenchSettings, measure
from edgeopt.converters.pipeline import ConvertOptions, convert
from edgeopt.runtime import run_batched, to_model_dtype
from edgeopt.runtime.litert import LiteRtRuntime, interpreter_module, quiet_native_stderr
from edgeopt.runtime.onnxruntime import OnnxRuntime

from common import add_out_option, print_table, results_dir, write_json

SETTINGS = BenchSettings(rounds=7, min_round_time=0.2)  # latency: 7 interleaved rounds of >= 0.2 s

PLOT = "compress_accuracy_vs_size.png"  # in --out; docs/ holds the recorded copy
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", nargs="?", choices=["tflite-sparse"], help="only the .tflite rows")
    add_out_option(ap)
    if ap.parse_args().part is None:
        recipes()
    tflite_sparse()


def recipes() -> None:
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
            for r, stats in zip(results, measure(runtimes, feeds, SETTINGS), strict=True):
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
    out = results_dir()
    plot(results, out / PLOT)


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
    print(f"wrote {path}")


# -- TFLite sparse weight storage ------------------------------------------------------------------------------
SPARSE_LOADS = 30  # fresh interpreter loads per file for the one-time costs
# Resident memory a fresh process gains by loading a model and running it once (Linux /proc): what a
# sparse file saves on disk against the dense copy LiteRT makes of its weights.
_RSS_PROBE = """
import sys, numpy as np
from edgeopt.runtime.litert import interpreter_module, quiet_native_stderr
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024
module = interpreter_module()
before = rss()
kwargs = {} if sys.argv[2] == '1' else {
    'experimental_op_resolver_type': module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
with quiet_native_stderr():
    it = module.Interpreter(model_path=sys.argv[1], num_threads=1, **kwargs)
    it.allocate_tensors()
d = it.get_input_details()[0]
it.set_tensor(d['index'], np.zeros(d['shape'], d['dtype']))
it.invoke()
print(rss() - before)
"""


def tflite_sparse() -> None:
    """Dense vs sparse .tflite of the 80 %-sparse digits CNN (FP32, INT8) and MLP-1M (FP32)."""
    import digits

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        split = digits.load_split()
        train = tmp / "train.npz"
        np.savez(train, image=split.x_train)
        files: dict[tuple[str, str, str], tuple[Path, dict]] = {}
        for kind, modes, distill in (("cnn", ("none", "int8"), True), ("mlp-1m", ("none",), False)):
            made = digits.make(kind, tmp / kind)
            for quantize in modes:
                for storage, params in (("dense", {"sparse_min_zeros": 1.0}), ("sparse", {})):
                    out = tmp / f"{kind}-{quantize}-{storage}"
                    res = convert(ConvertOptions(
                        model=made["model"], output=out, target="tflite", quantize=quantize,
                        calibration=made["calibration"], validation=made["validation"], prune_sparsity=0.8,
                        distill=train if distill else None, epochs=EPOCHS if distill else None,
                        target_params=params))
                    files[(kind, quantize, storage)] = (out / "model.tflite", res.report)
        inputs = {}
        for key, (path, _) in files.items():
            perm = json.loads((path.parent / "manifest.json").read_text())["model"]["io_transposes"].get("image")
            inputs[key] = np.transpose(split.x_val, perm) if perm else split.x_val  # NHWC for the CNN
        # steady-state latency, every file with XNNPACK and with LiteRT's own kernels, all interleaved
        runtimes, feeds = [], []
        for xnnpack in (True, False):
            for key, (path, _) in files.items():
                rt = LiteRtRuntime(path, threads=1, xnnpack=xnnpack)
                runtimes.append(rt)
                feeds.append({rt.inputs[0].name: to_model_dtype(rt.inputs[0], inputs[key][:1])})
        stats = measure(runtimes, feeds, SETTINGS)
        rows = []
        n = len(files)
        logits_of = {}
        for i, ((kind, quantize, storage), (path, report)) in enumerate(files.items()):
            rt, st, st_builtin = runtimes[i], stats[i], stats[n + i]
            dense_path = files[(kind, quantize, "dense")][0]
            logits = run_batched(rt, {rt.inputs[0].name: inputs[(kind, quantize, storage)]})[rt.outputs[0].name]
            logits_of[(kind, quantize, storage)] = logits
            vs_dense = float(np.abs(logits - logits_of[(kind, quantize, "dense")]).max())  # dense runs first
            accuracy = float((logits.argmax(1) == split.y_val).mean() * 100)
            cold = {xnnpack: {**_cold_start(path, xnnpack), "rss_bytes": _rss_after_load(path, xnnpack)}
                    for xnnpack in (True, False)}
            storage_details = report["pass_details"]["tflite"]["sparse_storage"]
            r = {"model": f"digits-{kind}", "quantize": quantize, "storage": storage,
                 "size_bytes": path.stat().st_size, "size_vs_dense": path.stat().st_size / dense_path.stat().st_size,
                 "stored_sparse": [w["onnx_node"] for w in storage_details["weights"] if w["stored"] == "sparse"],
                 "kept_dense": {w["onnx_node"]: w["reason"] for w in storage_details["weights"]
                                if w["stored"] == "dense" and w["sparsity"] >= storage_details["sparse_min_zeros"]},
                 "latency_b1_xnnpack": st.to_json(), "latency_b1_builtin": st_builtin.to_json(),
                 "accuracy_percent": accuracy, "max_abs_diff_vs_dense": vs_dense,
                 "parity_vs_source": report["parity"]["max_abs_err"],
                 "load_ms": {("xnnpack" if k else "builtin"): v["load_ms"] for k, v in cold.items()},
                 "first_invoke_ms": {("xnnpack" if k else "builtin"): v["first_invoke_ms"] for k, v in cold.items()},
                 "rss_after_load_bytes": {("xnnpack" if k else "builtin"): v["rss_bytes"] for k, v in cold.items()}}
            results.append(r)
            rows.append([r["model"], quantize, storage, r["size_bytes"], r["size_vs_dense"], len(r["stored_sparse"]),
                         accuracy, vs_dense, st.p50_ms, cold[True]["load_ms"], cold[True]["first_invoke_ms"],
                         cold[True]["rss_bytes"], st_builtin.p50_ms, cold[False]["load_ms"],
                         cold[False]["first_invoke_ms"], cold[False]["rss_bytes"]])
    print_table("TFLite sparse weights: 80 % unstructured sparsity (LiteRT, batch 1, 1 thread)",
                ["model", "quantize", "weights", "bytes", "÷ dense", "sparse tensors", "top-1 %", "max |Δ| vs dense",
                 "XNNPACK p50 ms",
                 "XNNPACK load ms", "XNNPACK 1st invoke ms", "XNNPACK RSS +B", "builtin p50 ms", "builtin load ms",
                 "builtin 1st invoke ms", "builtin RSS +B"], rows)
    write_json("compress_tflite_sparse", {"epochs": EPOCHS, "loads": SPARSE_LOADS, "results": results})


def _cold_start(path: Path, xnnpack: bool) -> dict[str, float]:
    """Median over fresh interpreters of creation + allocate_tensors and of the first invoke (ms)."""
    module = interpreter_module()
    kwargs = {} if xnnpack else {"experimental_op_resolver_type": module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    load, first = [], []
    for _ in range(SPARSE_LOADS):
        t0 = time.perf_counter()
        with quiet_native_stderr():
            it = module.Interpreter(model_path=str(path), num_threads=1, **kwargs)
            it.allocate_tensors()
        t1 = time.perf_counter()
        detail = it.get_input_details()[0]
        it.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
        it.invoke()
        load.append(t1 - t0)
        first.append(time.perf_counter() - t1)
    return {"load_ms": statistics.median(load) * 1e3, "first_invoke_ms": statistics.median(first) * 1e3}


def _rss_after_load(path: Path, xnnpack: bool) -> int | None:
    """Median over 3 fresh processes of the resident memory loading and running ``path`` adds."""
    import subprocess

    if not Path("/proc/self/status").exists():
        return None
    found = []
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path), "1" if xnnpack else "0"],
                              capture_output=True, text=True, check=True)
        found.append(int(proc.stdout.strip().splitlines()[-1]))
    return int(statistics.median(found))


if __name__ == "__main__":
    main()
