"""Several `fleet serve` replicas on one database: one leads the controller at a time, by a lease in
the database whose epoch fences a stale leader's decisions (FleetStore.acquire_lease /
save_decision); repository requests reach one replica each through a shared subscription. The
leader SIGKILLed in the middle of a wave: the standby takes over within the lease's 5 s, the
rollout completes, no wave starts twice and no device outside the waves is told anything."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest

from edgeopt.fleet.controller import Leadership
from edgeopt.fleet.db import open_database
from edgeopt.fleet.rollout import Phase, apply_command, new_rollout
from edgeopt.fleet.rollout_spec import RolloutSpec, parse_waves
from edgeopt.fleet.store import FleetStore
from edgeopt.protocol import ModelRef

from fleet_helpers import FleetRig, throwaway_postgres, tuned_mosquitto

ENDED = (Phase.COMPLETED, Phase.ABORTED)
V2 = ModelRef("kws", "2")


@pytest.fixture
def broker(tmp_path):
    b = tuned_mosquitto(tmp_path / "broker")
    yield b
    b.stop()


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_one_replica_leads_until_its_lease_runs_out_and_a_stale_leader_cannot_decide(tmp_path):
    db, conn = open_database(f"sqlite:///{tmp_path / 'fleet.db'}")
    clock = Clock()
    a_store, b_store = FleetStore(conn, clock=clock), FleetStore(db.connect(), clock=clock)
    a, b = Leadership(a_store, "replica-a", ttl=5.0), Leadership(b_store, "replica-b", ttl=5.0)
    assert a.renew() == ("controller", "replica-a", 1) and b.renew() is None
    clock.t += 4.0
    assert a.renew() is not None and b.renew() is None  # renewed in time: a keeps it
    spec = RolloutSpec(ModelRef("kws", "2"), {}, waves=parse_waves("100%"))
    status, assignments = new_rollout("r-1", spec, ["dev-1"], clock())
    a_store.create_rollout(status, assignments)
    fence_a = ("controller", "replica-a", 1)
    clock.t += 6.0  # a stalls (paused, cut off): its lease runs out and b takes over
    assert b.renew() == ("controller", "replica-b", 2)
    status, assignments = a_store.load_rollout("r-1")
    started = apply_command(status, assignments, "start", clock())
    assert a_store.save_decision(started, status.revision, fence_a) is False  # the stale leader's write
    assert a.renew() is None and a_store.load_rollout("r-1")[0].state is Phase.CREATED
    assert b_store.save_decision(started, status.revision, ("controller", "replica-b", 2)) is True
    b.release()  # a clean stop: the other takes over at its next try
    assert a.renew() == ("controller", "replica-a", 3)


def _ready(log, proc, deadline: float) -> str:
    while not (m := re.search(r"controller (leading|standing by) \(replica ([^)]+)\)", log.read_text())):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return m.group(1)


def test_the_leader_killed_mid_wave_hands_over_and_the_rollout_completes(tmp_path, broker):
    url_gen = throwaway_postgres()
    url = next(url_gen)
    rig = FleetRig(tmp_path, broker, url, 100, service="subprocess", service_options={"replicas": True},
                   step_delay=0.05)
    second_log = tmp_path / "replica-2.log"
    with open(second_log, "wb") as err:
        second = subprocess.Popen(rig.serve_command(), stderr=err)
    try:
        deadline = time.monotonic() + 60
        assert _ready(tmp_path / "service.log", rig.process, deadline) == "leading"
        assert _ready(second_log, second, deadline) == "standing by"
        rig.create(waves=parse_waves("10%,50%,100%"), bake_s=0.5)
        status, at_kill = rig.wait("r-1", lambda s, a: s.waves[1].state is Phase.RUNNING, 60, "wave 2")
        rig.kill_service()  # the leader, SIGKILLed mid-wave
        killed_at = time.monotonic()
        while "controller: leading" not in second_log.read_text():
            assert second.poll() is None and time.monotonic() - killed_at < 15, second_log.read_text()
            time.sleep(0.05)
        handover = time.monotonic() - killed_at
        assert handover <= 10, handover
        status, after = rig.wait("r-1", lambda s, a: s.state in ENDED, 90, "the rollout to end")
        assert status.state is Phase.COMPLETED, status.reason
        kinds = [e["kind"] for e in rig.store.events("r-1")]
        assert kinds.count("wave_started") == 3 and kinds.count("started") == 1  # no decision made twice
        told = {dev for dev, _ in rig.desired.messages}
        assert told == set(after)  # every device of the rollout, and no other
        rig.wait_devices(lambda d: d.model == V2, 30, "every device on kws@2")
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, second_log.read_text()
        assert "Traceback" not in second_log.read_text()
    finally:
        if second.poll() is None:
            second.kill()
            second.wait(10)
        rig.close()
        next(url_gen, None)


def test_replicas_answer_each_repository_request_once(tmp_path, broker):
    """Two replicas with --replicas on one broker: a device's chunk requests are answered by one of
    them (a shared subscription), not both."""
    from edgeopt.mqtt import PahoTopics, connect, make_client
    from edgeopt.repo_client import DeviceTrust, MqttFetcher, MqttRepoLink

    url_gen = throwaway_postgres()
    url = next(url_gen)
    rig = FleetRig(tmp_path, broker, url, 2, service="subprocess", service_options={"replicas": True})
    second_log = tmp_path / "replica-2.log"
    with open(second_log, "wb") as err:
        second = subprocess.Popen(rig.serve_command(), stderr=err)
    try:
        deadline = time.monotonic() + 60
        _ready(tmp_path / "service.log", rig.process, deadline)
        _ready(second_log, second, deadline)
        client = make_client("probe-1", broker.url)
        connect(client)
        link = MqttRepoLink(PahoTopics(client), "probe-1")
        device_dir = tmp_path / "probe"
        (device_dir / "metadata").mkdir(parents=True)
        (device_dir / "metadata" / "root.json").write_bytes(rig.repo.metadata_dir.joinpath("1.root.json").read_bytes())
        trust = DeviceTrust(device_dir / "metadata", MqttFetcher(link, timeout=2.0), device_dir / "downloads")
        trust.refresh()
        trust.download(trust.lookup("kws", "2"))
        time.sleep(0.5)  # a second answer, had there been one, would have arrived by now
        assert link.dropped == 0  # no duplicate answers to drop
    finally:
        second.kill()
        second.wait(10)
        rig.close()
        next(url_gen, None)
