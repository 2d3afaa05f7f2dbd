"""Latency measurement (edgeopt.bench): `edgeopt bench --min-round-time` is a minimum, and the
convert report's latency is produced by the same function, with the same settings, as `edgeopt
bench` -- so the two agree for one artifact (measured in benchmarks/latency_agreement.py; no clock
is asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeopt import bench
from edgeopt.cli.bench import bench_cmd

from conftest import run_cli

TICK_NS = 50_000  # the fake clock: every reading is 50 us after the previous one


class FakeClock:
    """Stands in for the ``time`` module inside edgeopt.bench: a call timed between two readings
    lasts exactly one tick, however long it really took."""

    def __init__(self) -> None:
        self.now_ns = 0

    def perf_counter_ns(self) -> int:
        self.now_ns += TICK_NS
        return self.now_ns

    def perf_counter(self) -> float:
        return self.perf_counter_ns() / 1e9


@pytest.fixture
def onnx_artifact(digits_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "art"
    assert run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "-q").code == 0
    return out


def test_min_round_time_is_a_minimum_not_a_cap(onnx_artifact, monkeypatch):
    """Each round runs for at least --min-round-time of calls: 0.05 s of 50 us calls is 1000 calls a
    round (the old loop stopped every round at 200 calls, 10 ms here)."""
    monkeypatch.setattr(bench, "time", FakeClock())
    res = run_cli("bench", onnx_artifact, "--batch", "1,4", "--rounds", "3", "--min-round-time", "0.05",
                  "--warmup", "0", "--json")
    assert res.code == 0, res.err
    for row in res.json()["results"]:
        timed_s = row["calls"] * row["mean_ms"] / 1e3
        assert timed_s >= 3 * 0.05 - 1e-9, row
        assert row["calls"] == 3 * 1000, row  # and not more: a round ends with the call that reaches its time
    assert res.json()["settings"] == {"warmup": 0, "rounds": 3, "min_round_time": 0.05}


def test_a_call_slower_than_the_round_makes_a_one_call_round(onnx_artifact, monkeypatch):
    monkeypatch.setattr(bench, "time", FakeClock())
    res = run_cli("bench", onnx_artifact, "--batch", "1", "--rounds", "4", "--min-round-time", "0.00001",
                  "--json")
    assert res.json()["results"][0]["calls"] == 4


@pytest.mark.parametrize("option, value", [("--rounds", "0"), ("--min-round-time", "0"), ("--warmup", "-1")])
def test_bench_settings_out_of_range_are_usage_errors(onnx_artifact, option, value):
    res = run_cli("bench", onnx_artifact, option, value)
    assert res.code == 2 and option in res.err


def test_bench_options_default_to_the_declared_settings():
    """`edgeopt bench`'s defaults are BenchSettings' (the ones convert measures with)."""
    defaults = {p.name: p.default for p in bench_cmd.params}
    assert bench.BenchSettings() == bench.BenchSettings(
        warmup=defaults["warmup"], rounds=defaults["rounds"], min_round_time=defaults["min_round_time"])


@pytest.mark.parametrize("threads", [1, 2])
def test_the_convert_report_latency_is_bench_measure_with_the_bench_defaults(digits_models, tmp_path, monkeypatch,
                                                                              threads):
    """One code path: the report's latency fields are exactly what edgeopt.bench.measure returned for
    the converted model -- at batch 1, --threads threads and `edgeopt bench`'s default settings."""
    monkeypatch.setattr(bench, "REPORT_SETTINGS", bench.BenchSettings())  # the real settings (conftest shortens them)
    calls = []
    real_measure = bench.measure

    def spy(runtimes, feeds, settings=None):
        stats = real_measure(runtimes, feeds, settings)
        calls.append((runtimes, feeds, settings, stats))
        return stats

    monkeypatch.setattr(bench, "measure", spy)
    out = tmp_path / "art"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "--quantize", "int8",
                  "--calibration", digits_models["calibration"], "--threads", str(threads), "-q")
    assert res.code == 0, res.err
    assert len(calls) == 1, "the report's latency is measured once, by edgeopt.bench.measure"
    runtimes, feeds, settings, (source, converted) = calls[0]
    assert settings == bench.BenchSettings()
    assert [rt.config["threads"] for rt in runtimes] == [threads, threads]
    assert runtimes[1].model_path.name == "model.onnx" and runtimes[0].model_path == digits_models["cnn"]
    assert [len(next(iter(f.values()))) for f in feeds] == [1, 1]
    report = json.loads((out / "report.json").read_text())["latency"]
    measured = converted.to_json()
    assert {k: report[k] for k in ("runtime", "batch", "threads", "p50_ms", "p95_ms", "p99_ms",
                                   "throughput_per_s")} == {k: measured[k] for k in ("runtime", "batch", "threads",
                                                                                    "p50_ms", "p95_ms", "p99_ms",
                                                                                    "throughput_per_s")}
    assert report["source_p50_ms"] == round(source.p50_ms, 4)


def test_bench_settings_are_checked():
    with pytest.raises(Exception, match="rounds"):
        bench.BenchSettings(rounds=0)


BENCHMARKS = sorted(p for p in (Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py")
                    if p.name != "common.py")


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_every_benchmark_script_takes_out_and_writes_no_tracked_file(script):
    """Issue 18: results go to --out; nothing in a benchmark names a tracked results file or docs/ as
    where it writes (the recorded copies are made by hand)."""
    res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--out" in res.stdout, res.stderr
    source = script.read_text()
    assert "RECORDED" not in source and 'ROOT / "docs"' not in source
