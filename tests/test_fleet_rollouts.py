"""Staged rollouts end to end over a real Mosquitto: the fleet service (repository server, registry,
controller) and simulated devices that download and verify the artifact through the repository
server. SQLite, and PostgreSQL where a server answers."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edgeopt.fleet.rollout import Phase
from edgeopt.fleet.rollout_spec import parse_waves
from edgeopt.fleet.simulator import FailurePlan
from edgeopt.protocol import ModelRef

from fleet_helpers import FleetRig, db_url, sqlite_url, tuned_mosquitto  # noqa: F401  (db_url: fixture)

V1, V2 = ModelRef("kws", "1"), ModelRef("kws", "2")
ENDED = (Phase.COMPLETED, Phase.ABORTED)


@pytest.fixture
def broker(tmp_path):
    b = tuned_mosquitto(tmp_path / "broker")
    yield b
    b.stop()


def _members(assignments, *waves):
    return {d for d, a in assignments.items() if a.wave in waves}


def test_rollout_over_200_devices_completes_through_all_waves(tmp_path, broker, db_url):  # noqa: F811
    rig = FleetRig(tmp_path, broker, db_url, 200)
    try:
        rig.create()
        status, assignments = rig.wait("r-1", lambda s, a: s.state in ENDED, 120, "the rollout to end")
        assert status.state is Phase.COMPLETED, status.reason
        assert [w.size for w in status.waves] == [2, 18, 80, 100]
        assert all(w.state is Phase.COMPLETED for w in status.waves)
        for before, after in zip(status.waves, status.waves[1:], strict=False):
            assert before.ended_at <= after.started_at  # a wave starts only once the one before completed
        # every device runs v2, downloaded through the repository server and verified
        rig.wait_devices(lambda d: d.model == V2 and d.update.state == "IDLE", 30, "every device on kws@2")
        assert rig.desired.told("2") == {d.device_id for d in rig.sim.devices}
        assert sum(d.stats["downloaded_bytes"] for d in rig.sim.devices) >= 200 * 20_000
        for d in rig.store.load_devices().values():
            assert d.model == V2 and d.online and d.labels == {"fleet": "sim"}
        kinds = [e["kind"] for e in rig.store.events("r-1")]
        assert kinds.count("wave_started") == 4 and kinds.count("wave_completed") == 4 and kinds[-1] == "completed"
    finally:
        rig.close()


def test_failures_in_wave_2_abort_it_and_roll_every_told_device_back(tmp_path, broker, db_url):  # noqa: F811
    rig = FleetRig(tmp_path, broker, db_url, 200)
    try:
        status, assignments = rig.create(start=False)
        wave1, wave2 = _members(assignments, 0), _members(assignments, 1)
        failing = set(sorted(wave2)[: round(0.2 * len(wave2))])  # 20% of wave 2
        rig.sim.config.failures = FailurePlan(devices=frozenset(failing), versions=frozenset({"2"}))
        rig.command("r-1", "start")
        status, assignments = rig.wait("r-1", lambda s, a: s.state in ENDED, 120, "the rollout to end")
        assert status.state is Phase.ABORTED
        assert status.current_wave == 1 and status.waves[0].state is Phase.COMPLETED
        assert status.waves[1].state is Phase.ABORTED
        assert [w.state for w in status.waves[2:]] == [Phase.CREATED, Phase.CREATED]
        assert status.reason.startswith("wave 2: ") and "past the failure threshold of 5%" in status.reason
        assert "rolled back: self-test failed (simulated)" in status.reason
        # no device outside waves 1-2 was ever told anything
        # the abort is saved before its desired messages leave (persist, then act): wait for them
        deadline = time.monotonic() + 30
        while rig.desired.told("1") != wave1 | wave2 and time.monotonic() < deadline:
            time.sleep(0.05)
        told = {dev for dev, _ in rig.desired.messages}
        assert told == wave1 | wave2
        assert rig.desired.told("2") == wave1 | wave2 and rig.desired.told("1") == wave1 | wave2
        # every device this rollout touched ends on the version it ran before; the others never moved
        rig.wait_devices(lambda d: d.model == V1 and not d.busy and d.update.state == "IDLE", 60,
                         "every device back on kws@1")
        assert all(d.stats["committed"] == 0 for d in rig.sim.devices if d.device_id not in wave1 | wave2)
        assert {d for d, a in assignments.items() if a.assigned_at is not None} == wave1 | wave2
        assert all(assignments[d].previous == V1 for d in wave1 | wave2)
        failed = {d for d, a in assignments.items() if a.outcome == "FAILURE"}
        assert failed and failed <= failing
    finally:
        rig.close()


@pytest.mark.parametrize("mode,gates,needle", [
    ("probation", {}, "rolled back: probation: error rate 0.5"),
    ("health", {"max_error_rate": 0.1}, "health gate: error rate 0.5 > 0.1"),
    ("silent", {}, "timeout: no progress"),
])
def test_each_kind_of_device_failure_aborts(tmp_path, broker, mode, gates, needle):
    from edgeopt.fleet.rollout_spec import Gates

    rig = FleetRig(tmp_path, broker, sqlite_url(tmp_path), 20)
    try:
        status, assignments = rig.create(start=False, waves=parse_waves("50%,100%"), bake_s=1.0,
                                         device_timeout_s=2.0, gates=Gates(**gates), failure_pct=0.15)
        failing = set(sorted(_members(assignments, 0))[:2])
        rig.sim.config.failures = FailurePlan(mode=mode, devices=frozenset(failing), versions=frozenset({"2"}))
        rig.command("r-1", "start")
        status, assignments = rig.wait("r-1", lambda s, a: s.state in ENDED, 60, "the rollout to end")
        assert status.state is Phase.ABORTED and needle in status.reason, status.reason
        assert status.current_wave == 0 and rig.desired.told("2") == _members(assignments, 0)
    finally:
        rig.close()


def test_pause_holds_the_next_wave_and_resume_continues(tmp_path, broker, db_url):  # noqa: F811
    rig = FleetRig(tmp_path, broker, db_url, 40)
    try:
        rig.create(waves=parse_waves("25%,100%"), bake_s=1.0)
        status, assignments = rig.wait("r-1", lambda s, a: s.waves[0].state is Phase.RUNNING, 30, "wave 1")
        rig.command("r-1", "pause")
        wave1, wave2 = _members(assignments, 0), _members(assignments, 1)
        rig.wait_devices(lambda d: d.device_id not in wave1 or d.model == V2, 30, "wave 1 on kws@2")
        time.sleep(2.0)  # well past the bake time and several ticks
        status, _ = rig.store.load_rollout("r-1")
        assert status.state is Phase.PAUSED and status.current_wave == 0
        assert status.waves[0].state is Phase.PAUSED and status.waves[1].state is Phase.CREATED
        assert not rig.desired.told("2") & wave2
        rig.command("r-1", "resume")
        status, _ = rig.wait("r-1", lambda s, a: s.state in ENDED, 60, "the rollout to end")
        assert status.state is Phase.COMPLETED
        rig.wait_devices(lambda d: d.model == V2, 30, "every device on kws@2")
        kinds = [e["kind"] for e in rig.store.events("r-1")]
        assert kinds.index("paused") < kinds.index("resumed") < len(kinds) - 1
    finally:
        rig.close()


def test_controller_killed_mid_wave_continues_after_restart(tmp_path, broker, db_url):  # noqa: F811
    """`edgeopt fleet serve` in a subprocess is SIGKILLed in the middle of wave 2 and started again:
    the rollout continues from its persisted decisions — no wave starts twice, no device is
    re-planned — and completes."""
    rig = FleetRig(tmp_path, broker, db_url, 100, service="subprocess", step_delay=0.05)
    try:
        rig.create(waves=parse_waves("10%,50%,100%"), bake_s=0.5)
        status, before = rig.wait("r-1", lambda s, a: s.waves[1].state is Phase.RUNNING, 60, "wave 2")
        rig.kill_service()
        killed_at = time.time()
        status, at_kill = rig.store.load_rollout("r-1")
        assert status.state is Phase.RUNNING and status.current_wave == 1
        in_flight = [d for d in _members(at_kill, 1) if at_kill[d].outcome == "PENDING"]
        assert in_flight, "the service was killed after wave 2 had already succeeded"
        time.sleep(1.0)
        rig.start_service()
        status, after = rig.wait("r-1", lambda s, a: s.state in ENDED, 90, "the rollout to end")
        assert status.state is Phase.COMPLETED, status.reason
        for d in _members(at_kill, 0, 1):  # told before the crash: never re-planned or re-told
            assert after[d].assigned_at == at_kill[d].assigned_at < killed_at
        assert all(after[d].assigned_at > killed_at for d in _members(at_kill, 2))
        kinds = [e["kind"] for e in rig.store.events("r-1")]
        assert kinds.count("wave_started") == 3 and kinds.count("started") == 1
        rig.wait_devices(lambda d: d.model == V2, 30, "every device on kws@2")
    finally:
        rig.close()


def test_the_simulators_golden_self_test_is_the_agents_and_catches_a_broken_model(tmp_path):
    """``self_test="golden"``: the simulated device unpacks the signed archive and runs the agent's own
    self-test on it, so a model that publishes fine but computes garbage fails on the device."""
    import shutil

    from fleet_demo import perturb_weights

    from edgeopt.artifact import pack_artifact
    from edgeopt.fleet.simulator import golden_self_test

    from conftest import run_cli
    from onnx_models import chain, save

    x = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    np.savez(tmp_path / "val.npz", x=x)
    res = run_cli("convert", save(chain([32, 64, 4]), tmp_path / "m.onnx"), "-o", tmp_path / "good", "--target", "onnx",
                  "-q", "--validation", tmp_path / "val.npz")
    assert res.code == 0, res.err
    verdicts = {}
    shutil.copytree(tmp_path / "good", tmp_path / "broken")
    for name, artifact in ("good", tmp_path / "good"), ("broken", perturb_weights(tmp_path / "broken")):
        pack_artifact(artifact, tmp_path / f"{name}.tar")
        verdicts[name] = golden_self_test((tmp_path / f"{name}.tar").read_bytes(), tmp_path)
    assert verdicts["good"] is None
    assert verdicts["broken"] and "golden vectors: output 'y'" in verdicts["broken"], verdicts["broken"]


def test_a_rollout_whose_devices_fetch_over_http_sends_no_artifact_byte_over_mqtt(tmp_path, broker):
    """Devices with the repository over HTTP (simulate --repo-url, nginx where installed): the rollout
    completes and the MQTT repository server answers no request."""
    from web_servers import static_server

    rig = None
    web = None
    try:
        from edgeopt.fleet.repository import Repository

        repo = Repository.init(tmp_path / "repo")  # FleetRig publishes into it: serve it before the devices start
        web = static_server(repo.root, tmp_path)
        rig = FleetRig(tmp_path, broker, sqlite_url(tmp_path), 40, repo_url=web.url, existing_repo=True)
        rig.create(waves=parse_waves("10%,100%"), bake_s=0.3)
        status, _ = rig.wait("r-1", lambda s, a: s.state in ENDED, 90, "the rollout to end")
        assert status.state is Phase.COMPLETED, status.reason
        rig.wait_devices(lambda d: d.model == V2, 30, "every device on kws@2")
        assert rig.service.repo_server.snapshot_stats().get("requests", 0) == 0
        assert sum(d.stats["downloaded_bytes"] for d in rig.sim.devices) >= 40 * 20_000
    finally:
        if rig is not None:
            rig.close()
        if web is not None:
            web.stop()
