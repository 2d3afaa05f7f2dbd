"""The agent's inference worker (agent/worker.py, issue 18): the model's calls in a process forked once
the model loads. With the real ONNX Runtime model: the worker's records are the thread's; a worker
killed mid-run hands its takes back to the agent's thread and no window is lost or repeated; a
fixed-batch model's partial take is padded and trimmed; the agent's memory in telemetry counts the
worker's own pages; SIGTERM to the service's process group stops the agent and its worker, and a
worker whose agent is killed exits by itself; models that cannot run there run on the thread."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from edgeopt import registry
from edgeopt.agent.config import parse_config
from edgeopt.agent.model import load_model
from edgeopt.agent.pipeline import Pipeline
from edgeopt.agent.statedir import StateDir
from edgeopt.agent.telemetry import InferenceStats, percentiles
from edgeopt.agent.windowing import WindowBatch, WindowBlock, Windower
from edgeopt.agent.worker import InferenceWorker, unsuitable

from agent_harness import AgentProcess, base_config, results_from_jsonl
from conftest import run_cli

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the worker needs 2 CPUs")


def replay_config(tmp: Path, npy: Path, process: str, **agent) -> dict:
    return base_config(tmp, agent={"exit_when_sources_end": True, **agent}, model={"process": process},
                       batching={"overflow": "block", "max_batch": 16},
                       telemetry={"status_file": str(tmp / "status.json")},
                       source=[{"type": "npy", "name": "rec", "path": str(npy), "replay": "fast",
                                "channels": ["ax", "ay", "az"]}],
                       sink=[{"type": "jsonl", "path": str(tmp / "out.jsonl")}])


@pytest.fixture(scope="module")
def recording(imu_model, tmp_path_factory) -> Path:
    arr = np.loadtxt(imu_model["stream"], delimiter=",", skiprows=1, usecols=(0, 1, 2)).astype(np.float32)
    path = tmp_path_factory.mktemp("rec") / "rec.npy"
    np.save(path, np.concatenate([arr] * 8))  # a few thousand windows: many takes in flight
    return path


def run_replay(tmp: Path, artifact: Path, npy: Path, process: str) -> tuple[list[dict], dict]:
    tmp.mkdir()
    StateDir(tmp / "state").install(artifact)
    agent = AgentProcess(tmp, replay_config(tmp, npy, process))
    assert agent.communicate(60) == 0, agent.err
    return results_from_jsonl(tmp / "out.jsonl"), agent.status()["telemetry"]


def test_the_worker_writes_the_records_the_thread_writes_and_reports_its_memory(tmp_path, imu_model, recording):
    by_worker, t_worker = run_replay(tmp_path / "worker", imu_model["artifact"], recording, "auto")
    by_thread, t_thread = run_replay(tmp_path / "thread", imu_model["artifact"], recording, "thread")
    assert t_worker["inference"] == {"process": "worker", "worker_pid": None, "note": "",
                                     "worker_private_bytes": 0, "worker_peak_private_bytes": pytest.approx(
                                         t_worker["inference"]["worker_peak_private_bytes"])}
    assert t_thread["inference"]["process"] == "thread" and t_thread["inference"]["note"] == '[model] process = "thread"'
    assert len(by_worker) == len(by_thread) == t_worker["windows_out"] > 1000
    def labels(records):  # an .npy replay's clock starts when the agent starts
        t0 = records[0]["t_start"]
        return [(r["id"], round(r["t_start"] - t0, 6), round(r["t_end"] - t0, 6), r["top1"]) for r in records]

    assert labels(by_worker) == labels(by_thread)
    for name in by_thread[0]["outputs"]:
        np.testing.assert_allclose([r["outputs"][name] for r in by_worker], [r["outputs"][name] for r in by_thread],
                                   rtol=1e-5, atol=1e-6)
    assert t_worker["dropped"]["inference_errors"] == 0 and t_worker["windows_in"] == t_worker["windows_out"]
    # the agent's memory is its own and its worker's pages; the thread has none
    worker_peak = t_worker["inference"]["worker_peak_private_bytes"]
    assert worker_peak > 0 and t_thread["inference"]["worker_peak_private_bytes"] == 0
    assert t_worker["peak_rss_bytes"] > worker_peak
    assert sum(t_worker["batch_size_histogram"].values()) == t_worker["batches"]


def pipeline_with(model, max_batch: int = 16) -> tuple[Pipeline, list[bytes]]:
    written: list[bytes] = []

    class Sink:
        kind = "list"

        def write(self, results):
            written.append(results.lines().encode())

    config = parse_config({"source": [{"type": "synthetic"}], "batching": {"max_batch": max_batch}})
    return Pipeline(config, model, [Sink()], "dev", InferenceStats()), written


def fill(pipeline: Pipeline, windows: int) -> None:
    pre = pipeline.model.pre
    samples = np.random.default_rng(3).normal(size=(pre.window + (windows - 1) * pre.hop, 3)).astype(np.float32)
    pipeline.queue.put(Windower("s", pre).push(samples, np.arange(len(samples)) / 50.0))


def run_through(pipeline: Pipeline, kill_after_steps: int | None = None) -> None:
    steps = 0
    while len(pipeline.queue):
        pipeline.step(0.0)
        steps += 1
        if steps == kill_after_steps:
            assert pipeline._inflight, "the kill must find takes in flight"
            os.kill(pipeline.worker.pid, signal.SIGKILL)
    pipeline.flush()


def test_a_killed_worker_hands_its_takes_to_the_agents_thread_and_no_window_is_lost(imu_model, caplog):
    model = load_model(imu_model["artifact"], None)
    reference, expected = pipeline_with(model)
    fill(reference, 600)
    run_through(reference)

    pipeline, written = pipeline_with(model)
    fill(pipeline, 600)
    pipeline._start_worker()
    assert pipeline.worker is not None
    pid = pipeline.worker.pid
    with caplog.at_level(logging.ERROR, "edgeopt.agent"):
        run_through(pipeline, kill_after_steps=1)
    assert pipeline.worker is None and "killed by SIGKILL" in pipeline.worker_note
    assert [r.getMessage() for r in caplog.records] == [
        f"the inference worker (pid {pid}) exited (killed by SIGKILL); running the model on the agent's thread"]
    assert pipeline.windows_inferred == 600 and pipeline.inference_errors == 0
    records = [json.loads(line) for chunk in written for line in chunk.splitlines()]
    reference_records = [json.loads(line) for chunk in expected for line in chunk.splitlines()]
    assert [r["seq"] for r in records] == [r["seq"] for r in reference_records] == list(range(600))
    for name in model.output_names:
        np.testing.assert_allclose([r["outputs"][name] for r in records],
                                   [r["outputs"][name] for r in reference_records], rtol=1e-5, atol=1e-6)
    with pytest.raises(ProcessLookupError):  # reaped: no zombie left behind
        os.kill(pid, 0)


@pytest.fixture(scope="module")
def fixed_batch_artifact(imu_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fixed") / "artifact"
    res = run_cli("convert", imu_model["model"], "-o", out, "--target", "onnx", "-q", "--input-shape", "imu:8,3,64",
                  "--preprocessing", imu_model["preprocessing"], "--validation", imu_model["validation"])
    assert res.code == 0, res.err
    return out


def test_a_fixed_batch_models_partial_take_is_padded_in_the_worker_and_trimmed(fixed_batch_artifact):
    model = load_model(fixed_batch_artifact, None)
    assert model.fixed_batch == 8 and unsuitable(model) is None
    x = np.random.default_rng(0).normal(size=(21, *model.sample_shape)).astype(np.float32)
    seq = np.arange(21)
    batch = WindowBatch([WindowBlock("a", seq[:9], seq[:9] * 1.0, seq[:9] + 1.0, x[:9]),
                         WindowBlock("b", seq[9:], seq[9:] * 1.0, seq[9:] + 1.0, x[9:])])
    expected, expected_calls = model.run_calls(batch, 8)
    worker = InferenceWorker(model, 64, 8)
    try:
        worker.send(batch)
        outputs, calls = worker.receive(len(batch))
    finally:
        worker.close()
    assert [n for n, _ in calls] == [n for n, _ in expected_calls] == [8, 8, 5]
    assert all(s > 0 for _, s in calls)
    assert outputs.keys() == expected.keys()
    for name in outputs:
        np.testing.assert_allclose(outputs[name], expected[name], rtol=1e-5, atol=1e-6)


def live_agent(tmp_path: Path, imu_model) -> tuple[AgentProcess, dict]:
    """A running agent on a live synthetic source, once its worker runs and it has inferred; its status."""
    StateDir(tmp_path / "state").install(imu_model["artifact"])
    cfg = base_config(tmp_path, telemetry={"interval_s": 0.2, "status_file": str(tmp_path / "status.json")},
                      source=[{"type": "synthetic", "name": "imu", "rate_hz": 2000}],
                      sink=[{"type": "jsonl", "path": str(tmp_path / "out.jsonl")}])
    agent = AgentProcess(tmp_path, cfg)
    status = agent.wait_status(lambda s: s["telemetry"]["windows_out"] > 0 and s["telemetry"]["inference"]["worker_pid"],
                               what="the worker running")
    return agent, status["telemetry"]["inference"]


def test_sigterm_to_each_process_of_the_unit_stops_the_agent_and_its_worker(tmp_path, imu_model):
    agent, inference = live_agent(tmp_path, imu_model)
    assert inference["worker_private_bytes"] > 0
    pid = inference["worker_pid"]
    # as systemd stops a unit: SIGTERM to each of its processes; the worker ignores it, the agent flushes
    os.kill(pid, signal.SIGTERM)
    agent.signal(signal.SIGTERM)
    assert agent.communicate() == 0, agent.err
    assert "inference worker" not in agent.err  # it did not die before the agent let it go
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_worker_whose_agent_is_killed_exits_by_itself(tmp_path, imu_model):
    agent, inference = live_agent(tmp_path, imu_model)
    pid = inference["worker_pid"]
    agent.signal(signal.SIGKILL)
    agent.communicate()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":  # exited; waits for init to reap it
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the worker outlived its agent")


def test_models_a_worker_cannot_run_say_why(imu_model):
    model = load_model(imu_model["artifact"], None)
    assert unsuitable(model) is None
    assert "threads" in unsuitable(load_model(imu_model["artifact"], None, threads=2))
    model.state_pairs = [("h", "h_out")]
    assert "stateful" in unsuitable(model)
    # TVM's runtime keeps a thread pool, Core ML its own threads: never forked
    forkable = {name: getattr(__import__(path.split(":")[0], fromlist=["_"]), path.split(":")[1]).fork_safe
                for name, path in registry.BUILTIN[registry.RUNTIMES].items()}
    assert forkable == {"onnxruntime": True, "litert": True, "coreml": False, "tvm": False}


def test_telemetry_percentiles_are_numpys():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 100, 2048):
        values = rng.random(n) * 10
        np.testing.assert_allclose(percentiles(values, (50, 95, 99)), np.percentile(values, [50, 95, 99]),
                                   rtol=0, atol=1e-12)
