"""The updater's steps in-process (issue 16 point 5): a fake agent host (tests/fake_host.py) and an
in-process bus (tests/memory_bus.py) instead of an agent subprocess and Mosquitto, a real signed
repository, real downloads, a real self-test child and real models. Each test drives the update
machine step by step and checks the states it went through and what the host was asked to do.
The same paths over the real agent and broker: tests/test_update_agent.py."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from edgeopt.agent.config import parse_config
from edgeopt.agent.update.machine import State
from edgeopt.agent.update.updater import Updater
from edgeopt.fleet.repo_server import RepoServer
from edgeopt.fleet.repository import Repository

from fake_host import FakeHost
from memory_bus import MemoryBus

NAME = "imu-cnn"


def version_of(artifact, version, tmp_path):
    """The imu artifact as another version (the manifest names it; its files are unchanged)."""
    out = tmp_path / f"artifact-{version}"
    shutil.copytree(artifact, out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "version": version}))
    return out


@pytest.fixture
def rig(tmp_path, imu_model):
    repo = Repository.init(tmp_path / "repo")
    repo.publish(imu_model["artifact"], NAME, "3")
    repo.publish(version_of(imu_model["artifact"], "4", tmp_path), NAME, "4")
    bus = MemoryBus()
    RepoServer(repo, bus.client()).start()
    host = FakeHost(tmp_path / "state")
    host.state.install(imu_model["artifact"])  # version 3 runs
    host = FakeHost(tmp_path / "state")

    def updater(**update):
        config = parse_config({
            "agent": {"device_id": "dev1", "state_dir": str(tmp_path / "state")},
            "mqtt": {"host": "localhost"}, "source": [{"type": "synthetic"}],
            "update": {"root": str(repo.metadata_dir / "1.root.json"), "request_timeout_s": 1.0,
                       "retry_interval_s": 0.0, "baseline_s": 0.0, "probation_windows": 0, "probation_s": 0.0,
                       **update}})
        return Updater(host, config, bus.client(payload_only=True), "dev1")

    yield host, updater, repo
    bus.close()


def run(updater, version) -> tuple[list[str], object]:
    """Begin the update to ``version`` and step until the machine is idle: (the states entered, the record)."""
    record = updater.machine.begin({"name": NAME, "version": version, "rollout": None}, updater.host.current_model())
    for _ in range(50):
        if record.state is State.IDLE:
            break
        record = updater.machine.step()
    return [h["to"] for h in record.history], record


def windows(imu_model, n=32):
    x = np.load(imu_model["validation"])
    return next(iter(x[k] for k in x.files if k != "labels"))[:n]


def test_every_step_of_a_good_update_and_the_switch(rig):
    host, updater, _ = rig
    states, record = run(updater(), "4")
    assert states == ["DOWNLOADING", "VERIFYING", "STAGED", "SELF_TEST", "SHADOW", "PROBATION", "COMMITTED", "IDLE"]
    assert record.outcome == "COMMITTED" and record.target.self_test["ok"] is True
    assert host.swaps == ["b"] and host.model.version == "4" and host.state.is_good("b")
    assert not list((host.state.root / "downloads").glob("*.tar"))  # cleaned after the commit


def test_a_version_the_repository_never_signed_is_refused_before_any_switch(rig):
    host, updater, _ = rig
    states, record = run(updater(), "5")
    assert states == ["DOWNLOADING", "ROLLING_BACK", "ROLLED_BACK", "IDLE"]
    assert record.outcome == "ROLLED_BACK" and "is not in the signed targets" in record.reason
    assert host.swaps == [] and host.model.version == "3"


def test_a_download_changed_on_disk_fails_verification(rig, monkeypatch):
    host, updater, _ = rig
    up = updater()
    downloading = up.machine.steps[State.DOWNLOADING]

    def then_tamper(record):
        event = downloading(record)
        with open(record.target.path, "r+b") as f:
            f.seek(100)
            f.write(b"\0" * 16)
        return event

    monkeypatch.setitem(up.machine.steps, State.DOWNLOADING, then_tamper)
    states, record = run(up, "4")
    assert states == ["DOWNLOADING", "VERIFYING", "ROLLING_BACK", "ROLLED_BACK", "IDLE"]
    assert "hash_mismatch" in record.reason and host.swaps == []


def test_nan_outputs_on_probation_switch_back_to_the_previous_model(rig, imu_model):
    host, updater, _ = rig
    up = updater(probation_windows=64, probation_s=0.0)
    x = windows(imu_model)
    stop = threading.Event()

    def live():  # the pipeline's batches while the candidate is on probation, its outputs NaN
        while not stop.is_set():
            if host.model is not None and host.model.version == "4":
                host.infer(x, corrupt=lambda v: np.full_like(v, np.nan))
            stop.wait(0.01)

    feeder = threading.Thread(target=live, daemon=True)
    feeder.start()
    try:
        states, record = run(up, "4")
    finally:
        stop.set()
        feeder.join(5)
    assert states[-4:] == ["PROBATION", "ROLLING_BACK", "ROLLED_BACK", "IDLE"]
    assert "NaN/Inf outputs" in record.reason
    assert host.swaps == ["b", "a"] and host.model.version == "3" and host.state.active_slot() == "a"
