"""The tflite target on the digits models (trained here) and on MobileNet-style, ResNet-style, 1-D CNN
and LSTM models (exported from torch): conversion time, file size, LiteRT latency (batch 1, 1 thread,
XNNPACK on; every variant of a model measured interleaved in one run) and parity / held-out accuracy
for FP32, INT8 (full integer), INT16x8, FP16, INT8 dynamic range and INT4 — and, when an onnx2tf
install is configured, the same models through onnx2tf side by side.

    python benchmarks/convert_tflite.py        # table + benchmarks/results/convert_tflite.json
    ONNX2TF_PYTHON=.venv-onnx2tf/bin/python python benchmarks/convert_tflite.py   # + onnx2tf (see docs/tflite.md)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, cli, print_table, write_json

sys.path.insert(0, str(ROOT / "tests"))

from edgeopt.bench import BenchSettings, measure  # noqa: E402
from edgeopt.converters.pipeline import ConvertOptions, convert  # noqa: E402
from edgeopt.converters.targets.tflite.flatbuffer import builtin_op_names  # noqa: E402
from edgeopt.runtime.litert import LiteRtRuntime  # noqa: E402
from edgeopt.runtime.onnxruntime import OnnxRuntime  # noqa: E402

import digits  # noqa: E402
from tflite_models import cnn1d, export, lstm_classifier, mobilenet_style, resnet_style  # noqa: E402

SETTINGS = BenchSettings(rounds=7, min_round_time=0.2)  # latency: 7 interleaved rounds of >= 0.2 s

MODES = ["none", "int8", "int16x8", "fp16", "int8-dynamic", "int4"]
ARCHITECTURES = {"mobilenet": (mobilenet_style, (3, 32, 32)), "resnet": (resnet_style, (3, 32, 32)),
                 "cnn1d": (cnn1d, (6, 64)), "lstm": (lstm_classifier, (20, 6))}


def _models(tmp: Path) -> dict[str, dict]:
    """name → {model, calibration, validation, input name} for every benchmarked model."""
    out = {}
    for kind in ("cnn", "mlp", "mlp-1m"):
        made = digits.make(kind, tmp / kind)
        out[f"digits-{kind}"] = {"model": made["model"], "calibration": made["calibration"],
                                 "validation": made["validation"], "input": "image"}
    rng = np.random.default_rng(0)
    for name, (build, sample) in ARCHITECTURES.items():
        d = tmp / name
        d.mkdir()
        path = export(build(), d / f"{name}.onnx", (1, *sample))
        np.savez(d / "cal.npz", x=rng.standard_normal((128, *sample)).astype(np.float32))
        np.savez(d / "val.npz", x=rng.standard_normal((64, *sample)).astype(np.float32))
        out[name] = {"model": path, "calibration": d / "cal.npz", "validation": d / "val.npz", "input": "x"}
    return out


def _onnx2tf(python: str, model: Path, workdir: Path, validation: Path, input_name: str) -> dict:
    """Convert with onnx2tf (separate interpreter), then check the float .tflite it wrote against ONNX
    Runtime in this environment: success, seconds, parity, custom ops."""
    out_dir = workdir / "onnx2tf"
    t0 = time.perf_counter()
    proc = subprocess.run([python, "-m", "onnx2tf", "-i", str(model), "-o", str(out_dir), "-b", "1", "-n"],
                          capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    found = sorted(out_dir.glob("*float32.tflite")) if out_dir.is_dir() else []
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no .tflite written"]
        return {"ok": False, "seconds": seconds, "error": tail[0][:200]}
    path = found[0]
    result = {"ok": True, "seconds": seconds, "path": str(path), "size_bytes": path.stat().st_size,
              "custom_ops": sorted({o for o in builtin_op_names(path) if o.startswith("CUSTOM")})}
    try:
        rt = LiteRtRuntime(path, threads=1)
    except Exception as exc:  # e.g. custom (Flex) ops stock LiteRT cannot run
        return {**result, "runs": False, "error": str(exc)[:200]}
    x = np.load(validation)[input_name][:32]
    ref = OnnxRuntime(model, threads=1)
    spec = rt.inputs[0]
    perm = None
    if tuple(spec.shape[1:]) != x.shape[1:] and x.ndim >= 3:
        perm = (0, *range(2, x.ndim), 1)  # onnx2tf makes channels-first inputs channels-last
    got, want = [], []
    for i in range(len(x)):
        sample = x[i:i + 1]
        out = next(iter(rt.run_float({spec.name: np.transpose(sample, perm) if perm else sample}).values()))
        got.append(out.reshape(-1))
        want.append(next(iter(ref.run({input_name: sample}).values())).reshape(-1))
    got, want = np.concatenate(got), np.concatenate(want)
    cosine = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
    return {**result, "runs": True, "runtime": rt, "perm": perm, "max_abs_err": float(np.abs(got - want).max()),
            "cosine": cosine}


def main() -> None:
    cli(__doc__)
    onnx2tf_python = os.environ.get("ONNX2TF_PYTHON")
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, m in _models(tmp).items():
            variants = {}
            (tmp / name).mkdir(exist_ok=True)
            for mode in MODES:
                out = tmp / name / f"tflite-{mode}"
                t0 = time.perf_counter()
                try:
                    res = convert(ConvertOptions(model=m["model"], output=out, target="tflite", quantize=mode,
                                                 calibration=m["calibration"], validation=m["validation"]))
                except Exception as exc:
                    results.append({"model": name, "variant": mode, "error": str(exc)})
                    rows.append([name, mode, None, None, None, None, None, None, f"failed: {exc}"[:80]])
                    continue
                manifest = json.loads((out / "manifest.json").read_text())
                variants[mode] = (out / "model.tflite", res.report, time.perf_counter() - t0,
                                  manifest["model"]["io_transposes"])
            other = _onnx2tf(onnx2tf_python, m["model"], tmp / name, m["validation"], m["input"]) \
                if onnx2tf_python else None

            # latency: the source on ONNX Runtime, every tflite variant (and onnx2tf's) interleaved
            x = np.load(m["validation"])[m["input"]][:1]
            runtimes = [OnnxRuntime(m["model"], threads=1)]
            feeds = [{m["input"]: x}]
            for path, _, _, perms in variants.values():
                rt = LiteRtRuntime(path, threads=1)
                runtimes.append(rt)
                xi = np.transpose(x, perms[m["input"]]) if m["input"] in perms else x
                feeds.append({rt.inputs[0].name: _model_dtype(rt, xi)})
            if other and other.get("runs"):
                rt = other["runtime"]
                runtimes.append(rt)
                feeds.append({rt.inputs[0].name: _model_dtype(rt, np.transpose(x, other["perm"]) if other["perm"]
                                                              else x)})
            stats = measure(runtimes, feeds, SETTINGS)
            ort_p50 = stats[0].p50_ms
            base = variants.get("none")
            base_size = base[1]["artifact"]["size_bytes"] if base else None
            base_p50 = stats[1].p50_ms if base else None
            rows.append([name, "source (onnxruntime fp32)", None, _size(m["model"]), None, ort_p50, None, None, None])
            for (mode, (_path, report, seconds, _perms)), st in zip(variants.items(), stats[1:], strict=False):
                size = report["artifact"]["size_bytes"]
                acc, par = report["accuracy"], report["parity"]
                quality = (f"{acc['converted']:.2f} % ({-acc['drop']:+.2f})" if acc["metric"] == "top1_percent"
                           else f"cos {par['cosine']:.6f}")
                rows.append([name, f"tflite {mode}", round(seconds, 2), size, size / base_size if base_size else None,
                             st.p50_ms, base_p50 / st.p50_ms if base_p50 else None, f"{par['max_abs_err']:.2g}",
                             quality])
                results.append({"model": name, "variant": mode, "convert_seconds": seconds, "size_bytes": size,
                                "size_vs_fp32_tflite": size / base_size if base_size else None,
                                "latency_b1": st.to_json(), "speedup_vs_fp32_tflite": base_p50 / st.p50_ms
                                if base_p50 else None, "speedup_vs_onnxruntime": ort_p50 / st.p50_ms,
                                "parity": {k: par[k] for k in ("max_abs_err", "mean_abs_err", "cosine",
                                                               "top1_agreement")},
                                "accuracy": acc})
            if other is not None:
                entry = {k: v for k, v in other.items() if k not in ("runtime", "path", "perm")}
                if other.get("runs"):
                    st = stats[-1]
                    entry["latency_b1"] = st.to_json()
                    rows.append([name, "onnx2tf fp32", round(other["seconds"], 2), other["size_bytes"],
                                 other["size_bytes"] / base_size if base_size else None, st.p50_ms,
                                 base_p50 / st.p50_ms if base_p50 else None, f"{other['max_abs_err']:.2g}",
                                 f"cos {other['cosine']:.6f}" + (" CUSTOM" if other["custom_ops"] else "")])
                else:
                    rows.append([name, "onnx2tf fp32", round(other["seconds"], 2), other.get("size_bytes"), None,
                                 None, None, None, f"failed: {other.get('error', '')}"[:80]])
                results.append({"model": name, "variant": "onnx2tf", **entry})
    print_table("tflite target: size, LiteRT latency (b1, 1 thread, XNNPACK), parity / held-out top-1",
                ["model", "variant", "convert s", "bytes", "size x fp32", "p50 ms", "speed x fp32", "max err",
                 "accuracy / parity"], rows)
    write_json("convert_tflite", {"onnx2tf_python": onnx2tf_python, "onnx2tf_version": _onnx2tf_version(
        onnx2tf_python), "results": results})


def _model_dtype(rt: LiteRtRuntime, x: np.ndarray) -> np.ndarray:
    from edgeopt.runtime import to_model_dtype

    return to_model_dtype(rt.inputs[0], x.astype(np.float32))


def _size(path: Path) -> int:
    return Path(path).stat().st_size


def _onnx2tf_version(python: str | None) -> str | None:
    if not python or not shutil.which(python) and not Path(python).exists():
        return None
    proc = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('onnx2tf'))"],
                          capture_output=True, text=True)
    return proc.stdout.strip() or None


if __name__ == "__main__":
    main()
