"""The controller's persist-then-act logic with a fake MQTT publish: the desired outbox marks only
acknowledged messages, re-sends after a reconnection, and an operator command that lands between
the controller's read and write is never overwritten."""

from __future__ import annotations

import pytest

from edgeopt.fleet.controller import Controller, DesiredPublisher
from edgeopt.fleet.db import open_database
from edgeopt.fleet.registry import Registry
from edgeopt.fleet.rollout import Phase, apply_command, new_rollout
from edgeopt.fleet.rollout_spec import RolloutSpec, parse_waves
from edgeopt.fleet.store import FleetStore
from edgeopt.protocol import ModelRef, UpdateStatus, parse_desired, state_message

from fleet_helpers import sqlite_url

V1, V2 = ModelRef("kws", "1"), ModelRef("kws", "2")


class FakeInfo:
    def __init__(self, acked: bool):
        self.acked = acked

    def wait_for_publish(self, timeout=None):
        if not self.acked:
            raise RuntimeError("not connected")

    def is_published(self) -> bool:
        return self.acked


class FakeBroker:
    def __init__(self):
        self.acks = True
        self.sent: list[tuple[str, bytes, int, bool]] = []

    def publish(self, topic, payload, qos, retain):
        self.sent.append((topic, payload, qos, retain))
        return FakeInfo(self.acks)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def setup(tmp_path):
    _, conn = open_database(sqlite_url(tmp_path))
    clock = Clock()
    store = FleetStore(conn, clock)
    registry = Registry(FleetStore(conn, clock), clock=clock)
    for i in range(4):
        registry.on_message(f"edgeopt/devices/d{i}/state", state_message(f"d{i}", model=V1))
    registry.flush()
    spec = RolloutSpec(V2, {}, parse_waves("50%,100%"), bake_s=0.0, success_threshold=1.0, failure_pct=0.5,
                       device_timeout_s=100.0)
    status, assignments = new_rollout("r-1", spec, [f"d{i}" for i in range(4)], clock.t)
    store.create_rollout(status, assignments)
    broker = FakeBroker()
    controller = Controller(store, DesiredPublisher(store, broker.publish), clock)
    yield store, registry, controller, broker, clock
    conn.close()


def start(store, clock):
    status, assignments = store.load_rollout("r-1")
    assert store.save_decision(apply_command(status, assignments, "start", clock.t), status.revision)


def test_desired_is_marked_sent_only_once_acknowledged(setup):
    store, registry, controller, broker, clock = setup
    start(store, clock)
    broker.acks = False
    controller.tick()
    first = [t for t, *_ in broker.sent]
    assert len(first) == 2 and all(qos == 1 and retain for _, _, qos, retain in broker.sent)
    assert {r["device_id"] for r in store.unpublished_desired()} == {t.split("/")[2] for t in first}
    broker.acks = True
    clock.t += 1
    controller.tick()  # nothing new decided, the outbox is sent again
    assert [t for t, *_ in broker.sent[2:]] == first and store.unpublished_desired() == []
    assert all(parse_desired(p).model == V2 and parse_desired(p).rollout == "r-1" for _, p, _, _ in broker.sent)
    n = len(broker.sent)
    controller.tick()
    assert len(broker.sent) == n  # acknowledged: not sent again
    controller.publisher.request_republish()  # a reconnection
    controller.tick()
    assert len(broker.sent) == n + 2


def test_controller_follows_registry_changes_without_reloading_everything(setup):
    store, registry, controller, broker, clock = setup
    start(store, clock)
    controller.tick()
    told = sorted(t.split("/")[2] for t, *_ in broker.sent)
    clock.t += 1
    for d in told:
        registry.on_message(f"edgeopt/devices/{d}/state", state_message(d, model=V2, update=UpdateStatus("IDLE")))
    registry.flush()
    clock.t += 1
    controller.tick()
    status, _ = store.load_rollout("r-1")
    assert status.current_wave == 1 and status.waves[0].state is Phase.COMPLETED
    changed, _ = store.devices_changed_since(controller._devices_seen)
    assert changed == {}  # the controller has seen every write


def test_an_operator_abort_between_read_and_write_wins(setup):
    store, registry, controller, broker, clock = setup
    start(store, clock)
    controller.tick()  # wave 1 started, cached at revision 2
    status, assignments = store.load_rollout("r-1")
    real_save = store.save_decision

    def abort_first(decision, revision, fence=None):  # the operator's abort lands just before the controller writes
        s, a = store.load_rollout("r-1")
        assert real_save(apply_command(s, a, "abort", clock.t), s.revision)
        return real_save(decision, revision, fence)

    told = sorted(t.split("/")[2] for t, *_ in broker.sent)
    for d in told:
        registry.on_message(f"edgeopt/devices/{d}/state", state_message(d, model=V2, update=UpdateStatus("IDLE")))
    registry.flush()
    store.save_decision = abort_first
    controller.tick()
    store.save_decision = real_save
    assert controller.stats["conflicts"] == 1
    status, assignments = store.load_rollout("r-1")
    assert status.state is Phase.ABORTED and status.waves[1].state is Phase.CREATED  # wave 2 never started
    controller.tick()
    assert store.load_rollout("r-1")[0].state is Phase.ABORTED
    rollback = [parse_desired(p).model for t, p, _, _ in broker.sent[len(told):]]
    assert rollback == [V1] * len(told)


def test_a_desired_row_the_protocol_refuses_is_skipped_not_blocking_the_others(tmp_path):
    """A row written before names were matched whole ('12\\n' passed the old rules) is never sent,
    and the rows after it still are."""
    from edgeopt.fleet.rollout import DesiredWrite

    _, conn = open_database(sqlite_url(tmp_path))
    store = FleetStore(conn)
    store._write_desired([DesiredWrite("d0", ModelRef("kws", "12\n"), "r-1"),
                          DesiredWrite("d1", V2, "r-1")], 1000.0)
    broker = FakeBroker()
    publisher = DesiredPublisher(store, broker.publish)
    assert publisher.flush() == 1
    assert [t for t, *_ in broker.sent] == ["edgeopt/devices/d1/desired"]
    assert publisher.stats["refused"] == 1 and store.unpublished_desired() == []
    conn.close()
