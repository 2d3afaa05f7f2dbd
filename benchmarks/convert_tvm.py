"""Host latency of TVM (default schedules, and MetaSchedule-tuned with --tune 64) vs ONNX Runtime vs
LiteRT on the same models, single thread, batch 1, all variants of a model measured interleaved in
one run (edgeopt.bench.measure), so the ratios are comparable.

MetaSchedule's cost model is XGBoost when ``xgboost`` is importable, else random; the JSON records
which (``cost_model``) and is ``convert_tvm_xgb.json`` for an XGBoost run. LiteRT is included when
the ``tflite`` target is registered.

    python benchmarks/convert_tvm.py [--tune 64] [--models cnn,mobilenet,lstm]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeopt import registry
from edgeopt.bench import BenchSettings, measure
from edgeopt.converters.pipeline import ConvertOptions, convert
from edgeopt.converters.targets.tvm import tuning
from edgeopt.runtime import runtime_for_format
from edgeopt.runtime.onnxruntime import OnnxRuntime

from common import ROOT, add_out_option, print_table, write_json

SETTINGS = BenchSettings(rounds=7, min_round_time=0.2)  # latency: 7 interleaved rounds of >= 0.2 s

sys.path.insert(0, str(ROOT / "tests"))
import tvm_models  # noqa: E402


def _sources(tmp: Path) -> dict[str, tuple[Path, str, np.ndarray]]:
    import digits  # examples/ is on sys.path once `common` is imported

    made = digits.make("cnn", tmp / "cnn")
    out = {"cnn": (made["model"], "image", np.load(made["validation"])["image"][:1])}
    for kind in ("mobilenet", "lstm"):
        path, name, shape = tvm_models.export(kind, tmp / f"{kind}.onnx")
        out[kind] = (path, name, tvm_models.sample_inputs(shape, 1))
    return out


def _convert(path: Path, out: Path, target: str, **target_params) -> tuple[Path, float, dict[str, list[int]]]:
    """The model file, the conversion time, and the input transposes the target applied (tflite: NCHW → NHWC)."""
    t0 = time.perf_counter()
    res = convert(ConvertOptions(model=path, output=out, target=target, quantize="none", target_params=target_params))
    return out / res.manifest["model"]["file"], time.perf_counter() - t0, res.manifest["model"].get("io_transposes") or {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tune", type=int, default=64)
    parser.add_argument("--models", default="cnn,mobilenet,lstm")
    add_out_option(parser)
    args = parser.parse_args()
    has_litert = "tflite" in registry.names(registry.TARGETS)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = _sources(tmp)
        for kind in args.models.split(","):
            path, name, x = sources[kind]
            # label -> (runtime, its feed, conversion seconds)
            variants: dict[str, tuple[object, dict, float | None]] = {
                "onnxruntime": (OnnxRuntime(path, threads=1), {name: x}, None)}
            so, secs, _ = _convert(path, tmp / f"{kind}-tvm", "tvm")
            variants["tvm default"] = (runtime_for_format("tvm")(so, threads=1), {name: x}, secs)
            if args.tune:
                # tuned for the one thread it is measured with here
                so, secs, _ = _convert(path, tmp / f"{kind}-tvm-tuned", "tvm", tune=args.tune, tune_cores=1)
                variants[f"tvm --tune {args.tune}"] = (runtime_for_format("tvm")(so, threads=1), {name: x}, secs)
            if has_litert:
                model, secs, transposes = _convert(path, tmp / f"{kind}-tflite", "tflite")
                feed = {name: np.ascontiguousarray(np.transpose(x, transposes[name])) if name in transposes else x}
                variants["litert"] = (runtime_for_format("tflite")(model, threads=1), feed, secs)
            stats = measure([rt for rt, _, _ in variants.values()], [feed for _, feed, _ in variants.values()],
                            SETTINGS)
            base = stats[0].p50_ms
            for (label, (_, _, secs)), st in zip(variants.items(), stats, strict=True):
                rows.append([kind, label, st.p50_ms, st.p95_ms, base / st.p50_ms, secs])
                results.append({"model": kind, "variant": label, "latency_b1": st.to_json(),
                                "speedup_vs_onnxruntime": base / st.p50_ms, "convert_seconds": secs})
    title = "Host latency, batch 1, 1 thread (TVM default vs tuned vs ONNX Runtime" + (
        " vs LiteRT)" if has_litert else "; LiteRT: tflite target not registered on this branch)")
    print_table(title, ["model", "runtime", "p50 ms", "p95 ms", "speedup vs ORT", "convert s"], rows)
    cost_model = tuning.cost_model()
    print(f"MetaSchedule cost model: {cost_model}")
    write_json("convert_tvm" if cost_model == "random" else f"convert_tvm_{cost_model}",
               {"tune_trials": args.tune, "cost_model": cost_model, "litert": has_litert, "results": results})


if __name__ == "__main__":
    main()
