"""The protocol end to end with real parts: a real Mosquitto, a real agent subprocess with signed
updates on, and the fleet registry fed by the same broker.

A retained ``desired`` whose version ends in a newline once made the agent start an update for
"12\\n"; from then on every state message of that device carried the newline in its reason and the
registry dropped them all, across restarts. Now the agent refuses the message, counts it under
``rejected_messages`` (telemetry and the retained state), and the registry keeps taking its state.
"""

from __future__ import annotations

import json
import threading

import pytest

from edgeopt.fleet.db import open_database
from edgeopt.fleet.registry import Registry
from edgeopt.fleet.store import FleetStore
from edgeopt.mqtt import connect, make_client, subscribe
from edgeopt.protocol import DeviceState, encode_state, parse_state, parse_telemetry

from conftest import run_cli
from update_harness import Rig, wait

REFUSED = {"desired": {"bad_version": 1}}


class FleetSide:
    """The registry (SQLite) and a raw watcher on every dev1 message, both on the rig's broker."""

    def __init__(self, rig: Rig, tmp):
        self.db_url = f"sqlite:///{tmp / 'fleet.db'}"
        _, self.conn = open_database(self.db_url)
        self.store = FleetStore(self.conn)
        self.registry = Registry(self.store, flush_interval=0.1)
        self.client = make_client("fleet-test", rig.broker.url)
        connect(self.client)
        self.registry.subscribe(lambda topic, qos, handler: subscribe(
            self.client, topic, qos, lambda c, u, m: handler(m.topic, m.payload)))
        self.registry.start()
        self.lock = threading.Lock()
        self.raw: list[tuple[str, bytes]] = []
        subscribe(self.client, "edgeopt/devices/dev1/+", 1, self._keep)

    def _keep(self, client, userdata, msg) -> None:
        with self.lock:
            self.raw.append((msg.topic.rsplit("/", 1)[-1], bytes(msg.payload)))

    def messages(self, kind: str) -> list[bytes]:
        with self.lock:
            return [p for k, p in self.raw if k == kind and p]

    def device(self):
        return self.store.load_devices().get("dev1")

    def close(self) -> None:
        self.registry.stop()
        self.client.disconnect()
        self.client.loop_stop()
        self.conn.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def _rejected(status) -> bool:
    return status["state"].get("rejected_messages") == REFUSED and \
        status["telemetry"].get("rejected_messages") == REFUSED


def test_a_newline_version_is_refused_counted_and_the_fleet_keeps_seeing_the_device(rig, tmp_path):
    fleet = FleetSide(rig, tmp_path)
    try:
        config = rig.agent_config(tmp_path / "state", tmp_path / "results.jsonl")
        agent = rig.start_agent(config)
        wait(lambda: fleet.device() is not None, 20, "the registry to see dev1")
        rig.server_client.publish("edgeopt/devices/dev1/desired", b'{"name": "imu-cnn", "version": "12\\n"}',
                                  qos=1, retain=True).wait_for_publish(5)
        status = agent.wait_status(_rejected, what="the refusal counted in state and telemetry")
        assert status["state"]["update"]["state"] == "IDLE" and status["state"]["update"]["target"] is None
        # the retained state and the telemetry on the broker carry the count too, and the registry stores it
        wait(lambda: (fleet.device().rejected_messages or {}) == REFUSED, 20, "the registry to record the count")
        wait(lambda: any(parse_telemetry("dev1", p).rejected_messages == REFUSED for p in fleet.messages("telemetry")),
             20, "telemetry with the count")
        listed = run_cli("fleet", "devices", "--db", fleet.db_url, "--json")
        assert listed.code == 0, listed.err
        assert json.loads(listed.out)[0]["rejected_messages"] == REFUSED

        assert agent.stop() == 0  # the last state (online: false) is taken too: nothing of dev1's is dropped
        wait(lambda: not fleet.device().online, 20, "the registry to see dev1 stop")
        again = rig.start_agent(config, name="agent2.toml")  # the retained desired arrives again on restart
        again.wait_status(_rejected, what="the refusal counted after the restart")
        wait(lambda: fleet.device().online, 20, "the registry to see dev1 back")
        assert again.stop() == 0

        states = fleet.messages("state")
        assert states and fleet.registry.snapshot_stats().get("malformed_state", 0) == 0
        for payload in states:  # every state the real agent sent parses, re-encodes to itself, and never
            st = parse_state("dev1", payload)  # shows an update started for the refused version
            if isinstance(st, DeviceState):
                assert encode_state(st) == payload
                assert st.update.state == "IDLE" and st.update.target is None, st.update
    finally:
        fleet.close()
