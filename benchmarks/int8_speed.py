"""Does INT8 pay? Float vs INT8 on real CNNs from PyPI wheels (tests/real_models.py fetches them into
its cache), on ONNX Runtime and on LiteRT, as `edgeopt convert` builds them with its defaults: four
artifacts per model, all measured interleaved in one run (`edgeopt.bench.measure`, 1 thread, batch
1), with INT8's cosine to float on the calibration inputs. ONNX Runtime INT8 is also built with
int8 (s8) activations, the setting before x86 boards got uint8, to show why that default changed.

    python benchmarks/int8_speed.py                    # table, and build/benchmarks/int8_speed.json
    python benchmarks/int8_speed.py --out DIR --rounds 7

Calibration data is uniform noise in the models' input range (no image set is downloaded), so the
cosine says how well INT8 tracks float on that, not on photos.
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

from real_models import (
    RealModel,  # noqa: E402
    fetch,  # noqa: E402
)

EXE = Path(sys.executable).parent / "edgeopt"

MODELS = [
    (RealModel("ddddocr_det", "ddddocr==1.6.1", "ddddocr/common_det.onnx", (), ("onnx", "tflite"),
               "YOLOX-style detector, 416x416, opset 11"), {"images": ((3, 416, 416), 0.0, 1.0)}),
    (RealModel("rapidocr_det", "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
               ("--input-shape", "x:1,3,320,320"), ("onnx", "tflite"), "PP-OCRv4 text detector (DB), 320x320"),
     {"x": ((3, 320, 320), -1.0, 1.0)}),
    (RealModel("rapidocr_cls", "rapidocr-onnxruntime==1.4.4",
               "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", ("--input-shape", "x:1,3,48,192"),
               ("onnx", "tflite"), "text-direction classifier, 0.6 MB (tiny)"), {"x": ((3, 48, 192), -1.0, 1.0)}),
]
VARIANTS = [  # label, convert options
    ("onnx fp32", ["--target", "onnx"]),
    ("onnx int8", ["--target", "onnx", "--quantize", "int8"]),
    ("tflite fp32", ["--target", "tflite"]),
    ("tflite int8", ["--target", "tflite", "--quantize", "int8"]),
]


def convert(model: Path, out: Path, flags: tuple[str, ...], options: list[str], calibration: Path) -> dict:
    proc = subprocess.run([str(EXE), "convert", str(model), "-o", str(out), *flags, *options, "--calibration",
                           str(calibration), "--threads", "1", "-q", "--json"], capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # 1: a quality gate; the report still says what it measured
        raise SystemExit(f"edgeopt convert {model.name} {' '.join(options)} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def s8_activations(src: Path, out: Path, calibration: Path, flags: tuple[str, ...]) -> Path:
    """The ONNX INT8 artifact with int8 activations (the quantize-int8 pass's activation_type)."""
    from edgeopt.converters.pipeline import ConvertOptions
    from edgeopt.converters.pipeline import convert as run_convert

    shapes = {}
    if "--input-shape" in flags:
        name, dims = flags[flags.index("--input-shape") + 1].split(":")
        shapes[name] = tuple(int(d) for d in dims.split(","))
    run_convert(ConvertOptions(model=src, output=out, target="onnx", quantize="int8", calibration=calibration,
                               input_shapes=shapes, pass_params={"quantize-int8": {"activation_type": "int8"}}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_option(ap)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved measuring rounds per artifact")
    args = ap.parse_args()
    from edgeopt import bench
    from edgeopt.runtime import open_runtime

    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for model, ranges in MODELS:
            src = fetch(model)
            rng = np.random.default_rng(0)
            cal = tmp / f"{model.key}-cal.npz"
            np.savez(cal, **{n: rng.uniform(lo, hi, (32, *shape)).astype(np.float32)
                             for n, (shape, lo, hi) in ranges.items()})
            built = {}
            for label, options in VARIANTS:
                out = tmp / f"{model.key}-{label.replace(' ', '-')}"
                built[label] = (out, convert(src, out, model.flags, options, cal))
            s8 = s8_activations(src, tmp / f"{model.key}-onnx-int8-s8", cal, model.flags)
            built["onnx int8 (s8 act.)"] = (s8, json.loads((s8 / "report.json").read_text()))
            labels = list(built)
            runtimes = [open_runtime(built[k][0], threads=1) for k in labels]
            feeds = [bench.batch_feeds(rt, rt.fixed_batch or 1) for rt in runtimes]
            settings = bench.BenchSettings(warmup=5, rounds=args.rounds, min_round_time=0.2)
            stats = dict(zip(labels, bench.measure(runtimes, feeds, settings), strict=True))
            p50 = {k: stats[k].p50_ms for k in labels}
            entry = {"model": model.key, "wheel": model.wheel, "kind": model.kind, "p50_ms": p50,
                     "onnx_int8_speedup": p50["onnx fp32"] / p50["onnx int8"],
                     "onnx_int8_s8_speedup": p50["onnx fp32"] / p50["onnx int8 (s8 act.)"],
                     "tflite_int8_speedup": p50["tflite fp32"] / p50["tflite int8"],
                     "cosine": {k: built[k][1]["parity"]["cosine"] for k in labels}}
            results.append(entry)
            rows.append([model.key, p50["onnx fp32"], p50["onnx int8"], entry["onnx_int8_speedup"],
                         entry["onnx_int8_s8_speedup"], entry["cosine"]["onnx int8"], p50["tflite fp32"],
                         p50["tflite int8"], entry["tflite_int8_speedup"], entry["cosine"]["tflite int8"]])
    print_table("float vs INT8, p50 ms, 1 thread, batch 1 (interleaved)",
                ["model", "ORT fp32", "ORT int8", "× (u8 act.)", "× (s8 act.)", "cos", "LiteRT fp32",
                 "LiteRT int8", "×", "cos"], rows)
    write_json("int8_speed", {"settings": {"threads": 1, "batch": 1, "rounds": args.rounds}, "results": results})


if __name__ == "__main__":
    main()
