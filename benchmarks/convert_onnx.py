"""FP32 vs INT8 vs INT8-dynamic vs INT4 vs FP16 with the ONNX target, on models trained on the
digits data: file size, ONNX Runtime latency (1 thread; batch 1 and 32, all variants of a model
measured interleaved in one run), held-out accuracy and conversion time.

    python benchmarks/convert_onnx.py           # prints a table, writes benchmarks/results/convert_onnx.json
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from edgeopt.bench import BenchSettings, measure
from edgeopt.converters.pipeline import ConvertOptions, convert
from edgeopt.runtime.onnxruntime import OnnxRuntime

from common import cli, print_table, write_json

SETTINGS = BenchSettings(rounds=7, min_round_time=0.2)  # latency: 7 interleaved rounds of >= 0.2 s

MODES = ["none", "int8", "int8-dynamic", "int4", "fp16"]
MODELS = ["cnn", "mlp", "mlp-1m"]


def main() -> None:
    cli(__doc__)
    import digits  # examples/, put on the path by common

    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind in MODELS:
            made = digits.make(kind, tmp / kind)
            val = np.load(made["validation"])
            variants = {}
            for mode in MODES:
                out = tmp / kind / f"out-{mode}"
                t0 = time.perf_counter()
                try:
                    res = convert(ConvertOptions(model=made["model"], output=out, target="onnx", quantize=mode,
                                                 calibration=made["calibration"], validation=made["validation"]))
                except Exception as exc:  # e.g. int4 on a model without MatMul: recorded, not fatal
                    results.append({"model": kind, "mode": mode, "error": str(exc)})
                    rows.append([kind, mode, None, None, None, None, None, None, f"failed: {exc}"])
                    continue
                variants[mode] = (out / "model.onnx", res.report, time.perf_counter() - t0)
            lat = {}
            for batch in (1, 32):
                runtimes = [OnnxRuntime(path, threads=1) for path, _, _ in variants.values()]
                feeds = [{"image": val["image"][:batch]}] * len(runtimes)
                for mode, stats in zip(variants, measure(runtimes, feeds, SETTINGS), strict=True):
                    lat[(mode, batch)] = stats
            base_size = variants["none"][1]["artifact"]["size_bytes"]
            for mode, (_path, report, seconds) in variants.items():
                size = report["artifact"]["size_bytes"]
                l1, l32 = lat[(mode, 1)], lat[(mode, 32)]
                acc = report["accuracy"]
                rows.append([kind, mode, size, size / base_size, l1.p50_ms, lat[("none", 1)].p50_ms / l1.p50_ms,
                             l32.p50_ms, acc["converted"], f"{acc['converted'] - acc['original']:+.2f}", seconds])
                results.append({"model": kind, "mode": mode, "size_bytes": size, "size_ratio": size / base_size,
                                "latency_b1": l1.to_json(), "latency_b32": l32.to_json(),
                                "speedup_b1_vs_fp32": lat[("none", 1)].p50_ms / l1.p50_ms,
                                "speedup_b32_vs_fp32": lat[("none", 32)].p50_ms / l32.p50_ms,
                                "accuracy_percent": acc["converted"], "accuracy_drop_points": acc["drop"],
                                "cosine": report["parity"]["cosine"], "convert_seconds": seconds})
    print_table("ONNX target: digits models (held-out split, ONNX Runtime, 1 thread)",
                ["model", "quantize", "bytes", "size x", "p50 b1 ms", "speedup b1", "p50 b32 ms", "top-1 %",
                 "Δ pts", "convert s"], rows)
    write_json("convert_onnx", {"results": results})


if __name__ == "__main__":
    main()
