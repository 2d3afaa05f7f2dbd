"""Parity of converted models with their originals, to set the converter's default parity gate.

For the digits CNN and MLP and the IMU 1-D CNN (trained here, no download), every quantization mode
of the onnx and tflite targets is converted three ways: validated on the held-out labelled split
(`val`), on the calibration data (`cal`: what the gate sees when only --calibration is given) and on
generated random inputs (`gen`: no data at all; modes needing calibration are skipped). A fourth
group is deliberately broken: int8 calibrated on data that does not resemble the real inputs
(all zeros; noise 100x the real range), the case the gate exists for. Each row has the whole-output
cosine, the top-1 agreement, the worst per-sample cosine and, on `val`, the accuracy drop.

    python benchmarks/parity_gates.py              # prints a table, writes benchmarks/results/parity_gates.json
    python benchmarks/parity_gates.py --work DIR   # keep (and reuse) the trained models in DIR
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from edgeopt.converters.pipeline import ConvertCheckFailed, ConvertOptions, convert

from common import add_out_option, print_table, write_json

MODES = {"onnx": ["none", "fp16", "int8", "int8-dynamic", "int4"],
         "tflite": ["none", "fp16", "int8", "int8-dynamic", "int16x8", "int4"]}
NEEDS_CALIBRATION = {"int8", "int16x8"}


def _models(work: Path) -> dict[str, dict[str, Path]]:
    import digits
    import imu

    made = {}
    for kind in ("cnn", "mlp"):
        out = work / f"digits-{kind}"
        model = out / f"digits_{kind}.onnx"
        made[f"digits-{kind}"] = ({"model": model, "calibration": out / "calibration.npz",
                                   "validation": out / "validation.npz"}
                                  if model.is_file() else digits.make(kind, out))
    out = work / "imu"
    made["imu"] = ({"model": out / "imu_cnn.onnx", "calibration": out / "calibration.npz",
                    "validation": out / "validation.npz"} if (out / "imu_cnn.onnx").is_file() else imu.make(out))
    return made


def _bad_calibration(data: dict[str, Path], work: Path) -> dict[str, Path]:
    """Calibration sets that do not look like the model's inputs: zeros, and noise far beyond their range."""
    with np.load(data["calibration"]) as npz:
        name = npz.files[0]
        x = npz[name]
    rng = np.random.default_rng(0)
    sets = {}
    for kind, arr in (("zeros", np.zeros_like(x)),
                      ("noise x100", (rng.standard_normal(x.shape) * 100 * np.abs(x).max()).astype(x.dtype))):
        path = work / f"{data['model'].stem}-cal-{kind.replace(' ', '')}.npz"
        np.savez(path, **{name: arr})
        sets[kind] = path
    return sets


def _run(model: Path, out: Path, target: str, mode: str, calibration: Path | None,
         validation: Path | None) -> dict:
    opts = ConvertOptions(model=model, output=out, target=target, quantize=mode, calibration=calibration,
                          validation=validation, force=True)
    try:
        report = convert(opts).report
    except ConvertCheckFailed as exc:  # e.g. a broken calibration: the numbers are what we want
        report = exc.result.report
    par, acc = report["parity"], report["accuracy"]
    return {"cosine": par["cosine"], "top1_agreement": par["top1_agreement"],
            "worst_sample_cosine": par.get("worst_sample_cosine"), "accuracy_drop": acc["drop"],
            "samples": report["validation"]["samples"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, help="directory for the trained models (reused when present)")
    add_out_option(ap)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results, rows = [], []
        for name, data in _models(work).items():
            runs = []
            for target, modes in MODES.items():
                for mode in modes:
                    cal = data["calibration"] if mode in NEEDS_CALIBRATION else None
                    runs.append((target, mode, "val", cal, data["validation"]))
                    runs.append((target, mode, "cal", data["calibration"], None))
                    if mode not in NEEDS_CALIBRATION:
                        runs.append((target, mode, "gen", None, None))
            for kind, path in _bad_calibration(data, work).items():
                runs.append(("onnx", f"int8, cal {kind}", "val", path, data["validation"]))
            for target, mode, inputs, cal, val in runs:
                quantize = mode.split(",")[0]
                r = _run(data["model"], work / "out", target, quantize, cal, val)
                results.append({"model": name, "target": target, "quantize": mode, "inputs": inputs, **r})
                rows.append([name, target, mode, inputs, r["samples"], r["cosine"], r["top1_agreement"],
                             r["worst_sample_cosine"], r["accuracy_drop"]])
                print(*rows[-1], flush=True)
    print_table("parity of converted vs original (cosine over the whole output; top-1 agreement)",
                ["model", "target", "quantize", "inputs", "samples", "cosine", "top-1 agree", "worst sample cos",
                 "acc drop pts"], rows)
    write_json("parity_gates", {"results": results})


if __name__ == "__main__":
    main()
