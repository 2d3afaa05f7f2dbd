"""The fleet database on both backends (SQLite and a throw-away PostgreSQL database): migrations,
the registry's merge rules, rollouts persisted and resumed, the desired outbox, bad URLs."""

from __future__ import annotations

import json

import pytest

from edgeopt.errors import EnvironmentFault, RemoteError, UserInputError
from edgeopt.fleet.db import MIGRATIONS, Database, open_database, redact
from edgeopt.fleet.registry import Registry
from edgeopt.fleet.rollout import Outcome, Phase, apply_command, decide, new_rollout
from edgeopt.fleet.rollout_spec import RolloutSpec, parse_waves
from edgeopt.fleet.store import FleetStore
from edgeopt.protocol import (
    Health,
    ModelRef,
    UpdateStatus,
    offline_will,
    state_message,
)

from fleet_helpers import db_url  # noqa: F401  (fixture)

V1, V2 = ModelRef("kws", "1"), ModelRef("kws", "2")


@pytest.fixture
def store(db_url):  # noqa: F811
    _, conn = open_database(db_url)
    yield FleetStore(conn)
    conn.close()


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def state(device, model=V1, upd="IDLE", target=None, reason=None, labels=None, health=None, online=True):
    return state_message(device, online=online, agent_version="0.1", profile="raspberry-pi-4",
                         labels=labels if labels is not None else {"site": "lab"}, model=model,
                         update=UpdateStatus(upd, target, None, reason, 1.0), health=health)


def test_migrations_are_idempotent_and_only_new_ones_run(db_url):  # noqa: F811
    db, conn = open_database(db_url)
    latest = MIGRATIONS[-1][0]
    assert db.migrate(conn) == latest and db.migrate(conn) == latest
    extra = MIGRATIONS + [(latest + 1, "a test column", ["ALTER TABLE devices ADD COLUMN test_note TEXT"])]
    assert db.migrate(conn, extra) == latest + 1
    assert db.migrate(conn, extra) == latest + 1  # not applied twice (ALTER would fail)
    versions = [r["version"] for r in conn.query("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == list(range(1, latest + 2))
    with pytest.raises(EnvironmentFault, match=f"schema version {latest + 1} is newer than this edgeopt knows"):
        db.migrate(conn)
    conn.close()


def test_registry_records_devices_and_keeps_fields_when_they_go_offline(store):
    clock = Clock()
    reg = Registry(store, clock=clock)
    reg.on_message("edgeopt/devices/dev-1/state", state("dev-1", labels={"site": "lab", "ring": "canary"},
                                                        health=Health(0.01, 2.0, 0.99, 0)))
    reg.on_message("edgeopt/devices/dev-2/state", state("dev-2", model=None))
    assert reg.flush() == 2
    devices = store.load_devices()
    d1 = devices["dev-1"]
    assert d1.online and d1.model == V1 and d1.labels == {"site": "lab", "ring": "canary"}
    assert d1.profile == "raspberry-pi-4" and d1.agent_version == "0.1" and d1.health.agreement == 0.99
    assert d1.update.state == "IDLE" and d1.last_seen == 1000.0 and d1.update_changed_at == 1000.0
    clock.t = 1010.0
    reg.on_message("edgeopt/devices/dev-1/state", offline_will("dev-1"))
    reg.on_message("edgeopt/devices/dev-9/state", offline_will("dev-9"))  # never seen before
    reg.flush()
    devices = store.load_devices()
    assert not devices["dev-1"].online and devices["dev-1"].model == V1 and devices["dev-1"].labels["ring"] == "canary"
    assert devices["dev-1"].last_seen == 1010.0 and not devices["dev-9"].online
    assert [d.device_id for d in store.list_devices({"ring": "canary"})] == ["dev-1"]
    assert [d.device_id for d in store.list_devices({"site": "lab"})] == ["dev-1", "dev-2"]
    assert store.list_devices({"site": "mars"}) == []


def test_registry_remembers_a_rollback_even_when_idle_follows_in_the_same_batch(store):
    clock = Clock()
    reg = Registry(store, clock=clock)
    reg.on_message("edgeopt/devices/dev-1/state", state("dev-1", upd="SELF_TEST", target=V2))
    clock.t = 1001.0
    reg.on_message("edgeopt/devices/dev-1/state", state("dev-1", upd="ROLLED_BACK", target=V2, reason="golden"))
    clock.t = 1002.0
    reg.on_message("edgeopt/devices/dev-1/state", state("dev-1", upd="IDLE"))
    reg.flush()
    d = store.load_devices()["dev-1"]
    assert d.update.state == "IDLE" and d.failed_target == V2 and d.failed_reason == "golden"
    assert d.failed_at == 1001.0 and d.update_changed_at == 1002.0
    clock.t = 1002.5  # a restarted service that only sees the retained IDLE-after-rollback state
    reg2 = Registry(store, clock=clock)
    reg2.on_message("edgeopt/devices/dev-2/state", state("dev-2", upd="IDLE", target=V2, reason="golden"))
    reg2.flush()
    d2 = store.load_devices()["dev-2"]
    assert d2.failed_target == V2 and d2.failed_at == 1002.5 and d2.failed_reason == "golden"
    clock.t = 1003.0
    reg.on_message("edgeopt/devices/dev-1/state", state("dev-1", upd="IDLE"))  # no change: same changed_at
    reg.on_message("edgeopt/devices/dev-1/telemetry", json.dumps(
        {"model": {"name": "kws", "version": "1"}, "latency_ms": {"p95_ms": 4.5}}).encode())
    reg.flush()
    d = store.load_devices()["dev-1"]
    assert d.update_changed_at == 1002.0 and d.telemetry.latency_p95_ms == 4.5 and d.last_seen == 1003.0


def test_registry_keeps_what_each_device_refused_from_state_and_telemetry(store):
    reg = Registry(store, clock=Clock())
    refused = {"desired": {"bad_version": 1}}
    reg.on_message("edgeopt/devices/dev-1/state", state_message(
        "dev-1", model=V1, update=UpdateStatus("IDLE"), rejected_messages=refused))
    reg.on_message("edgeopt/devices/dev-2/state", state("dev-2"))  # an agent that does not report it
    reg.flush()
    devices = store.load_devices()
    assert devices["dev-1"].rejected_messages == refused and devices["dev-2"].rejected_messages is None
    later = {"desired": {"bad_version": 1}, "repo": {"bad_frame": 3}}
    reg.on_message("edgeopt/devices/dev-1/telemetry", json.dumps({"rejected_messages": later}).encode())
    reg.flush()
    assert store.load_devices()["dev-1"].rejected_messages == later
    reg.on_message("edgeopt/devices/dev-1/state", state("dev-1"))  # no field: the last report stays
    reg.flush()
    assert store.load_devices()["dev-1"].rejected_messages == later
    assert reg.snapshot_stats().get("malformed_state", 0) == 0


def test_malformed_messages_are_counted_and_never_stored(store):
    reg = Registry(store)
    for topic, payload in [("edgeopt/devices/dev-1/state", b"{garbage"),
                           ("edgeopt/devices/dev-1/state", state("dev-2")),           # spoofed id
                           ("edgeopt/devices/dev-1/telemetry", b"[]"),
                           ("edgeopt/devices/../state", state("dev-1")),
                           ("edgeopt/devices/dev-1/state", b"x" * 100_000),
                           ("edgeopt/devices/dev-1/bogus", state("dev-1"))]:
        reg.on_message(topic, payload)
    assert reg.flush() == 0 and store.count_devices() == 0
    stats = reg.snapshot_stats()
    assert stats["malformed_state"] == 4 and stats["malformed_telemetry"] == 1 and stats["malformed_other"] == 1


def _spec(**over):
    base = dict(target=V2, selector={"site": "lab"}, waves=parse_waves("50%,100%"), bake_s=0.0,
                success_threshold=1.0, failure_pct=0.3, device_timeout_s=60.0)
    base.update(over)
    return RolloutSpec(**base)


def _fleet(store, n=4):
    reg = Registry(store, clock=Clock())
    for i in range(n):
        reg.on_message(f"edgeopt/devices/d{i}/state", state(f"d{i}"))
    reg.flush()
    return reg


def test_rollout_persists_and_continues_from_the_database(store):
    _fleet(store)
    ids = [d.device_id for d in store.list_devices({"site": "lab"})]
    status, assignments = new_rollout("r-1", _spec(), ids, 1000.0)
    store.create_rollout(status, assignments)
    loaded, loaded_assignments = store.load_rollout("r-1")
    assert loaded == status and loaded_assignments == assignments
    with pytest.raises(UserInputError, match="already exists"):
        store.create_rollout(status, assignments)
    assert store.save_decision(apply_command(loaded, loaded_assignments, "start", 1001.0), loaded.revision)
    st, asg = store.load_rollout("r-1")
    decision = decide(st, asg, store.load_devices(), 1002.0)
    assert store.save_decision(decision, st.revision)
    st2, asg2 = store.load_rollout("r-1")
    assert st2.state is Phase.RUNNING and st2.waves[0].state is Phase.RUNNING and st2.revision == 2
    told = sorted(d for d, a in asg2.items() if a.assigned_at == 1002.0)
    assert len(told) == 2 and all(asg2[d].previous == V1 for d in told)
    # the reloaded rollout decides exactly what the in-memory one would
    later = decide(decision.rollout, {**asg, **decision.assignments}, store.load_devices(), 1003.0)
    assert decide(st2, asg2, store.load_devices(), 1003.0).rollout.waves == later.rollout.waves
    # a stale revision writes nothing
    assert not store.save_decision(decision, st.revision)
    assert store.load_rollout("r-1")[0].revision == 2
    kinds = [e["kind"] for e in store.events("r-1")]
    assert kinds == ["created", "started", "wave_started"]


def test_desired_outbox(store):
    _fleet(store, 2)
    status, assignments = new_rollout("r-1", _spec(waves=parse_waves("100%")), ["d0", "d1"], 1000.0)
    store.create_rollout(status, assignments)
    st, asg = store.load_rollout("r-1")
    store.save_decision(apply_command(st, asg, "start", 1001.0), st.revision)
    st, asg = store.load_rollout("r-1")
    store.save_decision(decide(st, asg, store.load_devices(), 1002.0), st.revision)
    pending = store.unpublished_desired()
    assert [(r["device_id"], r["model_version"], r["revision"]) for r in pending] == [("d0", "2", 1), ("d1", "2", 1)]
    store.mark_published([("d0", 1)])
    assert [r["device_id"] for r in store.unpublished_desired()] == ["d1"]
    st, asg = store.load_rollout("r-1")
    store.save_decision(apply_command(st, asg, "abort", 1003.0), st.revision)  # rollback: revision 2
    pending = {r["device_id"]: r for r in store.unpublished_desired()}
    assert pending["d0"]["revision"] == 2 and pending["d0"]["model_version"] == "1"
    store.mark_published([("d0", 1)])  # a late ack of the old revision does not hide the new one
    assert "d0" in {r["device_id"] for r in store.unpublished_desired()}
    store.mark_published([("d0", 2), ("d1", 2)])
    assert store.unpublished_desired() == []
    store.republish_all_desired()
    assert len(store.unpublished_desired()) == 2
    assert store.desired_of() == {"d0": V1, "d1": V1}


def test_a_device_is_in_one_active_rollout_at_a_time(store):
    _fleet(store, 3)
    status, assignments = new_rollout("r-1", _spec(), ["d0", "d1"], 1000.0)
    store.create_rollout(status, assignments)
    other, other_assignments = new_rollout("r-2", _spec(), ["d1", "d2"], 1000.0)
    with pytest.raises(UserInputError, match="device d1 is already in rollout r-1 \\(CREATED\\)"):
        store.create_rollout(other, other_assignments)
    st, asg = store.load_rollout("r-1")
    store.save_decision(apply_command(st, asg, "abort", 1001.0), st.revision)
    store.create_rollout(other, other_assignments)  # r-1 is finished now
    assert store.rollout_ids() == ["r-1", "r-2"] and store.rollout_ids((Phase.CREATED,)) == ["r-2"]
    assert all(a.outcome is Outcome.PENDING for a in store.load_rollout("r-2")[1].values())
    with pytest.raises(UserInputError, match="no rollout 'r-9' \\(rollouts: r-1, r-2\\)"):
        store.load_rollout("r-9")


def test_database_url_errors_are_one_line(tmp_path):
    with pytest.raises(UserInputError, match="directory .*nowhere does not exist"):
        Database(f"sqlite:///{tmp_path / 'nowhere' / 'fleet.db'}").connect()
    with pytest.raises(UserInputError, match="expected sqlite:///PATH"):
        Database("mysql://db/fleet")
    with pytest.raises(RemoteError) as exc:
        Database("postgresql://fleet:s3cret@127.0.0.1:1/fleet").connect()
    assert "cannot be reached" in str(exc.value) and "s3cret" not in str(exc.value)
    assert "\n" not in str(exc.value)
    assert redact("postgresql://u:pw@h:5/db") == "postgresql://u:***@h:5/db"
    assert Database(tmp_path / "plain.db").path == tmp_path / "plain.db"
