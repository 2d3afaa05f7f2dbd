"""Real models from PyPI wheels, float to TFLite: edgeopt vs onnx2tf side by side. For each model,
`edgeopt convert --target tflite` with the flags a user gives it, and `onnx2tf -b 1 -n` (its own
Python ≥ 3.12 virtualenv, `ONNX2TF_PYTHON`; given a copy of the model, since it rewrites its input
file) with the same input shapes (`-ois`). Both .tflite files are then run in this environment's
LiteRT and compared with ONNX Runtime running the original on the same inputs: a model is converted
**exactly** when every output is within 1e-3 of its scale. Stateful models are compared call by
call (edgeopt's report also compares them as a stream). Wall time and peak RSS of each converter
process (VmHWM, sampled) are recorded too, and edgeopt's time without its validation and latency
steps (which onnx2tf does not do), from its report. edgeopt runs with its defaults (the tests'
`--validation-samples` economy is dropped).

    ONNX2TF_PYTHON=.venv-onnx2tf/bin/python python benchmarks/real_models.py [--out DIR]

Without ONNX2TF_PYTHON only edgeopt runs. The models are fetched by tests/real_models.py into its
cache (pip download, pinned versions).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, add_out_option, print_table, write_json

sys.path.insert(0, str(ROOT / "tests"))  # the corpus and its fetcher live with the tests that use them

from real_models import CORPUS, RealModel, fetch  # noqa: E402

EXE = Path(sys.executable).parent / "edgeopt"
SAMPLES = 8


def _flag(flags: tuple[str, ...], name: str) -> list[str]:
    return [flags[i + 1] for i, f in enumerate(flags) if f == name]


def _hwm(pid: int) -> int:
    """The process's peak RSS so far (VmHWM), bytes; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], timeout: float = 1800) -> tuple[int, str, str, float, int]:
    """(exit code, stdout, stderr, seconds, peak RSS bytes) of one process. The peak is VmHWM read every
    20 ms until it exits: rusage's ru_maxrss would count this (large) benchmark process, which the child
    is forked from, as the child's peak."""
    t0 = time.perf_counter()
    peak = 0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            peak = max(peak, _hwm(proc.pid))
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        return (proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                time.perf_counter() - t0, peak)


def _session(model: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # no "Removing initializer" warnings in the table
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def reference_feeds(model: Path, flags: tuple[str, ...], n: int) -> list[dict[str, np.ndarray]]:
    """``n`` random feeds for the original model with the flags' shapes and values."""

    shapes = {s.split(":")[0]: [int(d) for d in s.split(":")[1].split(",")] for s in _flag(flags, "--input-shape")}
    values = {v.split("=")[0]: float(v.split("=")[1]) for v in _flag(flags, "--input-value")}
    sess = _session(model)
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(n):
        feed = {}
        for i in sess.get_inputs():
            dtype = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(float16)": np.float16}[i.type]
            if i.name in values:
                feed[i.name] = np.array(values[i.name], dtype=dtype).reshape([1] * len(i.shape))
                continue
            shape = shapes.get(i.name) or [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
            feed[i.name] = (rng.standard_normal(shape) * 0.5).astype(dtype)
        feeds.append(feed)
    return feeds


def compare_tflite(tflite: Path, model: Path, feeds: list[dict[str, np.ndarray]]) -> dict:
    """Run ``tflite`` in LiteRT on ``feeds`` (mapped by name, else order; channels-last where its input
    is) and compare every output with ONNX Runtime: the worst error relative to each output's scale."""
    from ai_edge_litert.interpreter import Interpreter

    sess = _session(model)
    interp = Interpreter(model_path=str(tflite))
    runner = interp.get_signature_runner()
    details = runner.get_input_details()
    names = [o.name for o in sess.get_outputs()]
    worst = 0.0
    for feed in feeds:
        want = dict(zip(names, sess.run(names, feed), strict=True))
        args = {}
        remaining = list(feed)
        for key, d in details.items():
            src = feed.get(key)
            if src is None:  # onnx2tf may rename: take the first unused input of the same size
                src = next(feed[k] for k in remaining if feed[k].size == int(np.prod(d["shape"])))
            remaining = [k for k in remaining if feed[k] is not src]
            args[key] = _fit(src, d).astype(d["dtype"])
        got = list(runner(**args).values())
        for w in want.values():
            match = [g for g in got if g.size == w.size]
            if not match:
                return {"runs": True, "max_rel_err": None, "error": f"no output of {w.size} elements"}
            errs = []
            for g in match:
                for cand in (g.reshape(w.shape), np.moveaxis(g, -1, 1).reshape(w.shape) if g.ndim >= 3 else None):
                    if cand is not None:
                        errs.append(float(np.abs(cand.astype(np.float64) - w).max()) / max(float(np.abs(w).max()), 1e-12))
            worst = max(worst, min(errs))
    return {"runs": True, "max_rel_err": worst}


def _fit(arr: np.ndarray, detail: dict) -> np.ndarray:
    """``arr`` (ONNX layout) as the .tflite input wants it: as it is, channels-last (onnx2tf moves axis 1
    last), or reshaped to the same number of elements; a dynamic input (-1 in its signature) takes the
    array as it is and LiteRT resizes the tensor."""
    want = tuple(int(x) for x in detail["shape"])
    dynamic = any(int(x) < 0 for x in detail.get("shape_signature", want))
    if arr.shape == want:
        return arr
    if arr.ndim >= 3 and np.moveaxis(arr, 1, -1).shape == want:
        return np.moveaxis(arr, 1, -1)
    if arr.ndim >= 3 and dynamic and len(want) == arr.ndim:  # channels-last with a resized dim
        moved = np.moveaxis(arr, 1, -1)
        if all(w in (1, m) for w, m in zip(want, moved.shape, strict=True)) and moved.shape[-1] == want[-1]:
            return moved
    if not dynamic and arr.size == int(np.prod(want)):
        return arr.reshape(want)
    return arr


def edgeopt_tflite(model: RealModel, path: Path, out: Path) -> dict:
    code, stdout, stderr, seconds, rss = run_measured([str(EXE), "convert", str(path), "-o", str(out), "--target",
                                                      "tflite", *model.full_flags, "--threads", "1",
                                                      "-q", "--json"])
    if code != 0 and not stdout.strip():
        return {"ok": False, "seconds": seconds, "peak_rss": rss, "error": stderr.strip().splitlines()[-1][:200]}
    report = json.loads(stdout)
    rel = max((o["max_abs_err"] / max(o["output_scale"], 1e-12) for o in report["parity"]["outputs"].values()),
              default=None)
    timing = {r["step"]: r.get("seconds") for r in report.get("steps", [])}
    # the conversion alone: what onnx2tf does (it neither validates nor measures latency)
    convert_s = seconds - sum(timing.get(k) or 0.0 for k in ("validate", "latency"))
    return {"ok": code == 0, "seconds": seconds, "convert_seconds": convert_s, "peak_rss": rss,
            "status": report["status"], "max_rel_err": rel, "steps_s": timing, "tflite": str(out / "model.tflite")}


def onnx2tf_tflite(python: str, model: RealModel, path: Path, work: Path) -> dict:
    copy = work / path.name
    shutil.copy(path, copy)  # onnx2tf rewrites its input file
    ois = []
    for s in _flag(model.flags, "--input-shape"):
        ois += ["-ois", s]
    code, stdout, stderr, seconds, rss = run_measured([python, "-m", "onnx2tf", "-i", str(copy), "-o",
                                                      str(work / "o2t"), "-b", "1", "-n", *ois])
    found = sorted((work / "o2t").glob("*float32.tflite")) if (work / "o2t").is_dir() else []
    if code != 0 or not found:
        tail = (stderr or stdout).strip().splitlines()[-1:] or ["no .tflite written"]
        return {"ok": False, "seconds": seconds, "peak_rss": rss, "error": tail[0][:200]}
    return {"ok": True, "seconds": seconds, "peak_rss": rss, "tflite": str(found[0])}


def _why_not(result: dict) -> str:
    if not result["ok"]:
        return "failed: " + str(result.get("error"))[:50]
    if result.get("runs") is False:  # converted, but this harness could not feed it in LiteRT
        return "not checked: " + str(result.get("error"))[:45]
    return f"inexact: {result.get('max_rel_err'):.2g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_option(ap)
    ap.add_argument("--only", help="comma-separated model keys")
    args = ap.parse_args()
    onnx2tf_python = os.environ.get("ONNX2TF_PYTHON")
    models = [m for m in CORPUS if "tflite" in m.targets]
    if args.only:
        models = [m for m in models if m.key in args.only.split(",")]
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            path = fetch(model)
            work = Path(tmp) / model.key
            work.mkdir()
            feeds = reference_feeds(path, model.flags, SAMPLES)
            ours = edgeopt_tflite(model, path, work / "edgeopt")
            if ours.get("tflite") and Path(ours["tflite"]).is_file():  # call by call, as onnx2tf's is checked
                ours["call_rel_err"] = compare_tflite(Path(ours["tflite"]), path, feeds)["max_rel_err"]
            theirs = None
            if onnx2tf_python:
                theirs = onnx2tf_tflite(onnx2tf_python, model, path, work)
                if theirs["ok"]:
                    try:
                        theirs.update(compare_tflite(Path(theirs["tflite"]), path, feeds))
                    except Exception as exc:  # custom ops, a signature LiteRT cannot run
                        theirs.update(runs=False, max_rel_err=None, error=str(exc).splitlines()[0][:200])
            exact_ours = bool(ours["ok"] and ours.get("max_rel_err") is not None and ours["max_rel_err"] <= 1e-3)
            exact_theirs = bool(theirs and theirs["ok"] and theirs.get("max_rel_err") is not None
                                and theirs["max_rel_err"] <= 1e-3)
            results.append({"model": model.key, "wheel": model.wheel, "kind": model.kind, "flags": list(model.flags),
                            "edgeopt": {**ours, "exact": exact_ours},
                            "onnx2tf": theirs and {**theirs, "exact": exact_theirs}})
            rows.append([model.key, "yes" if exact_ours else ("no: " + str(ours.get("error") or ours.get("status"))[:40]),
                         ours.get("max_rel_err"), ours["seconds"], ours.get("convert_seconds"), ours["peak_rss"] / 2**20,
                         "-" if theirs is None else "yes" if exact_theirs else _why_not(theirs),
                         theirs and theirs.get("max_rel_err"), theirs and theirs["seconds"],
                         theirs and theirs["peak_rss"] / 2**20])
            print(json.dumps(results[-1], default=str)[:400], flush=True)
    print_table("float → TFLite: edgeopt vs onnx2tf (exact: every output within 1e-3 of its scale vs ONNX Runtime)",
                ["model", "edgeopt exact", "rel err", "s", "s w/o valid.", "peak MiB", "onnx2tf exact", "rel err", "s",
                 "peak MiB"], rows)
    n_ours = sum(r["edgeopt"]["exact"] for r in results)
    n_theirs = sum(bool(r["onnx2tf"] and r["onnx2tf"]["exact"]) for r in results)
    unchecked = sum(bool(r["onnx2tf"] and r["onnx2tf"]["ok"] and r["onnx2tf"].get("runs") is False) for r in results)
    print(f"exact: edgeopt {n_ours}/{len(results)}, onnx2tf {n_theirs}/{len(results)} "
          f"({unchecked} onnx2tf models converted but not checked: see 'not checked')")
    write_json("real_models", {"onnx2tf": bool(onnx2tf_python), "results": results})


if __name__ == "__main__":
    main()
