"""`edgeopt optimize` (issue 17 point 3) on the trained digits CNN for raspberry-pi-4: every candidate a
real conversion, the front really non-dominated among the evaluated candidates, and best/ really
meeting the budget -- accuracy and size recomputed from the written files with the real runtimes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeopt.runtime import open_runtime, run_batched

from conftest import run_cli

BUDGET = 1.0


@pytest.fixture(scope="module")
def optimized(digits_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("optimize") / "opt"
    args = ("optimize", digits_models["cnn"], "--profile", "raspberry-pi-4", "--calibration",
            digits_models["calibration"], "--validation", digits_models["validation"], "--max-accuracy-drop",
            str(BUDGET), "--targets", "onnx,tflite", "--quantize", "none,fp16,int8", "--prune", "0,0.5", "--jobs", "2",
            "-o", out)
    res = run_cli(*args, "--json")
    assert res.code == 0, res.err
    return json.loads(res.out), out, args


def _accuracy(artifact: Path, validation: Path) -> float:
    """Top-1 on the validation digits, fed in the artifact's layout (its manifest's io_transposes)."""
    data = np.load(validation)
    runtime = open_runtime(artifact, threads=1)
    (name,) = [s.name for s in runtime.inputs]
    images = data["image"].astype(np.float32)
    manifest = artifact / "manifest.json"
    if manifest.is_file() and (perm := json.loads(manifest.read_text())["model"]["io_transposes"].get(name)):
        images = np.transpose(images, perm)
    out = run_batched(runtime, {name: images})
    return float((next(iter(out.values())).argmax(1) == data["labels"]).mean() * 100)


def test_every_candidate_is_a_conversion(optimized):
    result, out, _ = optimized
    names = {c["name"] for c in result["candidates"]}
    assert names == {f"{t}-{q}{p}" for t in ("onnx", "tflite") for q in ("none", "fp16", "int8") for p in ("", "-prune50")}
    for c in result["candidates"]:
        assert "error" not in c, c
        report = json.loads((out / "candidates" / c["name"] / "report.json").read_text())
        assert report["artifact"]["size_bytes"] == c["size_bytes"] and c["latency_ms"] > 0
    assert result["complete"] and (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_point_of_the_front_is_dominated(optimized):
    result, _, _ = optimized
    points = [(c["name"], c["latency_ms"], c["accuracy_drop"]) for c in result["candidates"]]
    front = [p for p, c in zip(points, result["candidates"], strict=True) if c["pareto"]]
    assert front
    for name, lat, drop in front:
        assert not [q for q in points if q[1] <= lat and q[2] <= drop and (q[1] < lat or q[2] < drop)], name
    # and every point off the front is dominated by one on it
    for (name, lat, drop), c in zip(points, result["candidates"], strict=True):
        if not c["pareto"]:
            assert any(f[1] <= lat and f[2] <= drop for f in front), name


def test_best_meets_the_budget_and_is_the_fastest_feasible(optimized, digits_models):
    result, out, _ = optimized
    best = next(c for c in result["candidates"] if c["name"] == result["best"])
    feasible = [c for c in result["candidates"] if c["feasible"] and c["fits"]]
    assert best["latency_ms"] == min(c["latency_ms"] for c in feasible)
    original = _accuracy(digits_models["cnn"], digits_models["validation"])
    assert original - _accuracy(out / "best", digits_models["validation"]) <= BUDGET
    model = next(p for p in (out / "best").iterdir() if p.name.startswith("model."))
    assert model.stat().st_size == best["size_bytes"]
    manifest = json.loads((out / "best" / "manifest.json").read_text())
    assert manifest == json.loads((out / "candidates" / best["name"] / "manifest.json").read_text())


def test_a_rerun_reuses_every_finished_candidate(optimized):
    _, out, args = optimized
    res = run_cli(*args, "--json")
    assert res.code == 0, res.err
    again = json.loads(res.out)
    assert all(c["cached"] for c in again["candidates"])


def test_a_directory_that_is_not_an_optimize_output_is_refused(digits_models, tmp_path):
    (tmp_path / "mine.txt").write_text("the user's")
    res = run_cli("optimize", digits_models["cnn"], "--profile", "raspberry-pi-4", "--validation",
                  digits_models["validation"], "--targets", "onnx", "--quantize", "none", "--prune", "0", "-o", tmp_path)
    assert res.code == 2 and "is not an `edgeopt optimize` output directory" in res.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_a_board_s_tvm_library_takes_the_latency_of_its_host_build(digits_models, tmp_path):
    """raspberry-pi-4's TVM candidate is an aarch64 library that cannot run here: its latency is the one
    its conversion measured on a host build of the same module, said so, and it takes part in the front."""
    import shutil

    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("needs aarch64-linux-gnu-gcc (Debian: gcc-aarch64-linux-gnu)")
    pytest.importorskip("tvm")
    out = tmp_path / "opt"
    res = run_cli("optimize", digits_models["cnn"], "--profile", "raspberry-pi-4", "--validation",
                  digits_models["validation"], "--targets", "tvm,onnx", "--quantize", "none", "--prune", "0",
                  "--json", "-q", "-o", out)
    assert res.code == 0, res.err
    rows = {c["name"]: c for c in json.loads(res.out)["candidates"]}
    tvm = rows["tvm-none"]
    report = json.loads((out / "candidates" / "tvm-none" / "report.json").read_text())
    assert tvm["latency_ms"] == report["latency"]["p50_ms"] > 0
    assert "not side by side" in tvm["latency_note"]
    assert rows["onnx-none"]["latency_ms"] > 0 and "latency_note" not in rows["onnx-none"]
    assert any(c["pareto"] for c in rows.values())
