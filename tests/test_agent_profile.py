"""The per-stage profile (issue 18): the real agent replaying a recording reports, per thread, the
time per window of each stage in its status file (and telemetry), and ``edgeopt agent status`` prints
it as a table. Not timed: the fields are there, non-negative, and each thread's stages add up to
that thread's time, which lies between the inference span and the agent's uptime."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeopt.agent.profile import Lap, Profile
from edgeopt.agent.statedir import StateDir

from agent_harness import AgentProcess, base_config
from conftest import run_cli

STAGES = {"source:rec": {"read", "preprocess", "window", "queue_wait"},
          "inference": {"queue_wait", "inference", "handoff", "agent"},
          "writer": {"wait", "encode", "sink:jsonl"}}


@pytest.fixture
def finished_agent(tmp_path, imu_model):
    StateDir(tmp_path / "state").install(imu_model["artifact"])
    arr = np.loadtxt(imu_model["stream"], delimiter=",", skiprows=1, usecols=(0, 1, 2))
    np.save(tmp_path / "rec.npy", arr.astype(np.float32))
    cfg = base_config(tmp_path, agent={"exit_when_sources_end": True},
                      batching={"overflow": "block", "max_batch": 16},
                      source=[{"type": "npy", "name": "rec", "path": str(tmp_path / "rec.npy"), "replay": "fast",
                               "channels": ["ax", "ay", "az"]}],
                      sink=[{"type": "jsonl", "path": str(tmp_path / "out.jsonl")}])
    agent = AgentProcess(tmp_path, cfg)
    assert agent.communicate() == 0, agent.err
    return agent


def test_the_status_file_holds_every_threads_stages(finished_agent):
    t = finished_agent.status()["telemetry"]
    profile = t["profile"]
    assert set(profile) == set(STAGES)
    for thread, stages in STAGES.items():
        p = profile[thread]
        assert p["windows"] == t["windows_out"] > 0, thread
        assert set(p["us_per_window"]) == stages, thread
        assert all(v >= 0 for v in p["us_per_window"].values()), (thread, p)
        # every moment of the thread is charged to a stage: the stages add up to its time
        assert sum(p["us_per_window"].values()) * p["windows"] / 1e6 == pytest.approx(p["seconds"], rel=1e-3)
        assert p["seconds"] <= t["uptime_s"]
    span = t["last_inference"] - t["first_inference"]
    assert span <= profile["inference"]["seconds"]
    assert profile["inference"]["us_per_window"]["inference"] > 0


def test_agent_status_prints_the_profile_as_a_table(finished_agent):
    res = run_cli("agent", "status", "--config", finished_agent.config_path)
    assert res.code == 0, res.err
    assert "where the time goes" in res.out
    for thread, stages in STAGES.items():
        assert thread in res.out
        assert all(stage in res.out for stage in stages)
    res = run_cli("agent", "status", "--status-file", finished_agent.status_path, "--json")
    assert json.loads(res.out) == finished_agent.status()


def test_agent_status_errors_are_one_line(tmp_path):
    res = run_cli("agent", "status", "--status-file", tmp_path / "none.json")
    assert res.code == 2 and "no status file" in res.err and len(res.err.strip().splitlines()) == 1
    (tmp_path / "junk.json").write_text('{"state": 1}')
    res = run_cli("agent", "status", "--status-file", tmp_path / "junk.json")
    assert res.code == 2 and "not an edgeopt-agent status file" in res.err
    res = run_cli("agent", "status")
    assert res.code == 2 and "give exactly one of --config or --status-file" in res.err


def test_a_lap_charges_every_moment_to_a_stage(monkeypatch):
    clock = iter([0, 10_000, 25_000, 25_000, 70_000, 99_000])  # ns
    monkeypatch.setattr("edgeopt.agent.profile.perf_counter_ns", lambda: next(clock))
    lap = Lap()            # t = 0
    lap("a")               # 10 µs
    lap("b")               # 25 µs
    lap("a")               # 25 µs
    lap("c")               # 70 µs
    assert lap.ns == {"a": 10_000, "b": 15_000, "c": 45_000}
    profile = Profile()
    profile.add("t", lap, lambda: 5)
    profile.add("idle", Lap(), lambda: 0)
    snap = profile.snapshot()
    assert snap["t"] == {"windows": 5, "seconds": 70e-6, "us_per_window": {"a": 2.0, "b": 3.0, "c": 9.0}}
    assert snap["idle"] == {"windows": 0, "seconds": 0.0, "us_per_window": {}}


def test_a_take_of_several_calls_gives_one_calls_outputs(imu_model):
    """The inference loop takes up to 32 waiting windows at once and runs them in calls of max_batch:
    the outputs are those of one call over them all, and each call is counted."""
    from edgeopt.agent.model import load_model
    from edgeopt.agent.windowing import WindowBatch, WindowBlock

    model = load_model(imu_model["artifact"], None)
    x = np.random.default_rng(0).normal(size=(13, *model.sample_shape)).astype(np.float32)
    seq = np.arange(13)
    batch = WindowBatch([WindowBlock("a", seq[:5], seq[:5] * 1.0, seq[:5] + 1.0, x[:5]),
                         WindowBlock("b", seq[5:], seq[5:] * 1.0, seq[5:] + 1.0, x[5:])])
    whole, calls = model.run_calls(batch)
    assert [n for n, _ in calls] == [13]
    for max_call, sizes in ((1, [1] * 13), (4, [4, 4, 4, 1])):
        split, calls = model.run_calls(batch, max_call)
        assert [n for n, _ in calls] == sizes and all(s > 0 for _, s in calls)
        for name in whole:
            np.testing.assert_allclose(split[name], whole[name], rtol=1e-5, atol=1e-6)
