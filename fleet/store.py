"""Reading and writing the fleet's records: devices, rollouts (with waves, assignments and events),
the ``desired`` outbox and the service's heartbeat. Rows ↔ the dataclasses of ``fleet.rollout``.

Decisions are saved in one transaction guarded by the rollout's revision (compare-and-set): if
someone else changed the rollout since it was read, nothing is written and the caller re-reads.
``desired`` writes go to an outbox table first; the publisher sends them and marks them sent, so a
crash between deciding and publishing only delays the message.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from edgeopt.errors import NotFound, UserInputError
from edgeopt.fleet.db import Connection
from edgeopt.fleet.rollout import (
    ACTIVE,
    Assignment,
    Decision,
    DeviceRecord,
    Outcome,
    Phase,
    RolloutStatus,
    WaveStatus,
)
from edgeopt.fleet.rollout_spec import RolloutSpec, matches
from edgeopt.protocol import Health, ModelRef, Telemetry, UpdateStatus

DEVICE_COLUMNS = ("device_id", "online", "agent_version", "profile", "labels", "model_name", "model_version",
                  "update_state", "update_target", "update_rollout", "update_reason", "update_since",
                  "update_changed_at", "health", "telemetry", "failed_target", "failed_reason",
                  "failed_at", "first_seen", "last_seen", "updated_at", "rejected_messages")
IN_CHUNK = 500  # ids per "IN (...)" query


# Rows repeat the same few values (models, labels, health) across thousands of devices: parse
# each distinct text once. The cached objects are never mutated.
@functools.lru_cache(maxsize=4096)
def _ref(text: str | None) -> ModelRef | None:
    return ModelRef.parse(text) if text else None


@functools.lru_cache(maxsize=4096)
def _model(name: str | None, version: str | None) -> ModelRef | None:
    return ModelRef(name, version) if name else None


@functools.lru_cache(maxsize=4096)
def parse_labels(text: str | None) -> dict[str, str]:
    return json.loads(text or "{}")


@functools.lru_cache(maxsize=4096)
def _health(text: str | None) -> Health | None:
    return Health(**json.loads(text)) if text else None


def _update(state: str | None, target: str | None, rollout: str | None, reason: str | None,
            since: float | None) -> UpdateStatus | None:
    return UpdateStatus(state, _ref(target), rollout, reason, since or 0.0) if state else None


def _ref_text(ref: ModelRef | None) -> str | None:
    return str(ref) if ref else None


def device_to_row(r: DeviceRecord, written_at: float) -> tuple:
    u = r.update
    return (r.device_id, int(r.online), r.agent_version, r.profile, json.dumps(r.labels, sort_keys=True),
            r.model.name if r.model else None, r.model.version if r.model else None,
            u.state if u else None, _ref_text(u.target) if u else None, u.rollout if u else None,
            u.reason if u else None, u.since if u else None, r.update_changed_at,
            json.dumps(asdict(r.health)) if r.health else None,
            json.dumps(asdict(r.telemetry)) if r.telemetry else None,
            _ref_text(r.failed_target), r.failed_reason, r.failed_at, r.last_seen, r.last_seen, written_at,
            None if r.rejected_messages is None else json.dumps(r.rejected_messages, sort_keys=True))


def row_to_device(row: dict[str, Any]) -> DeviceRecord:
    telemetry = None
    if row["telemetry"]:
        t = json.loads(row["telemetry"])
        telemetry = Telemetry(t["device_id"], ModelRef(**t["model"]) if t["model"] else None, t["latency_p95_ms"],
                              t["error_rate"], t.get("rejected_messages"), t.get("windows_per_s"),
                              t.get("latency_p50_ms"), t.get("inference_errors"), t.get("profile"),
                              t.get("last_download"))
    return DeviceRecord(
        row["device_id"], bool(row["online"]), parse_labels(row["labels"]), row["profile"], row["agent_version"],
        _model(row["model_name"], row["model_version"]),
        _update(row["update_state"], row["update_target"], row["update_rollout"], row["update_reason"],
                row["update_since"]),
        row["update_changed_at"], _health(row["health"]), telemetry, _ref(row["failed_target"]),
        row["failed_reason"], row["failed_at"], row["last_seen"],
        json.loads(row["rejected_messages"]) if row.get("rejected_messages") else None)


def _chunks(ids: list[str]) -> Iterable[list[str]]:
    for i in range(0, len(ids), IN_CHUNK):
        yield ids[i:i + IN_CHUNK]


class FleetStore:
    def __init__(self, conn: Connection, clock=time.time):
        self.conn, self.clock = conn, clock

    # -- devices ---------------------------------------------------------------------------------
    def load_devices(self, ids: Iterable[str] | None = None) -> dict[str, DeviceRecord]:
        if ids is None:
            return {r["device_id"]: row_to_device(r) for r in self.conn.query("SELECT * FROM devices")}
        out: dict[str, DeviceRecord] = {}
        for chunk in _chunks(sorted(set(ids))):
            marks = ",".join("?" * len(chunk))
            for r in self.conn.query(f"SELECT * FROM devices WHERE device_id IN ({marks})", chunk):
                out[r["device_id"]] = row_to_device(r)
        return out

    def save_devices(self, records: list[DeviceRecord]) -> float:
        """Insert or replace these device records (first_seen is kept from the existing row); returns
        the ``updated_at`` stamped on them, which never goes backwards (see ``devices_changed_since``)."""
        cols = ", ".join(DEVICE_COLUMNS)
        marks = ", ".join("?" * len(DEVICE_COLUMNS))
        updates = ", ".join(f"{c} = excluded.{c}" for c in DEVICE_COLUMNS if c not in ("device_id", "first_seen"))
        with self.conn.transaction():
            newest = self.conn.query("SELECT MAX(updated_at) AS t FROM devices")[0]["t"] or 0.0
            written_at = max(self.clock(), newest + 1e-6)
            self.conn.executemany(f"INSERT INTO devices ({cols}) VALUES ({marks}) "
                                  f"ON CONFLICT (device_id) DO UPDATE SET {updates}",
                                  [device_to_row(r, written_at) for r in records])
        return written_at

    def devices_changed_since(self, since: float) -> tuple[dict[str, DeviceRecord], float]:
        """Devices written after ``since`` and the newest ``updated_at`` among them (or ``since``).
        Writers stamp increasing times inside their transaction, so polling with the returned value
        misses nothing."""
        rows = self.conn.query("SELECT * FROM devices WHERE updated_at > ?", (since,))
        newest = max((r["updated_at"] for r in rows), default=since)
        return {r["device_id"]: row_to_device(r) for r in rows}, newest

    def list_devices(self, selector: dict[str, str] | None = None) -> list[DeviceRecord]:
        devices = sorted(self.load_devices().values(), key=lambda d: d.device_id)
        return [d for d in devices if matches(d.labels, selector or {})]

    def count_devices(self) -> int:
        return int(self.conn.query("SELECT COUNT(*) AS n FROM devices")[0]["n"])

    # -- rollouts --------------------------------------------------------------------------------
    def create_rollout(self, status: RolloutStatus, assignments: dict[str, Assignment]) -> None:
        with self.conn.transaction():
            if self.conn.query("SELECT 1 FROM rollouts WHERE rollout_id = ?", (status.rollout_id,)):
                raise UserInputError(f"rollout {status.rollout_id} already exists")
            busy = self.active_rollouts_of(list(assignments))
            if busy:
                device, rollout_id, state = busy[0]
                raise UserInputError(f"device {device} is already in rollout {rollout_id} ({state}) "
                                     f"{'and ' + str(len(busy) - 1) + ' more devices are ' if len(busy) > 1 else ''}"
                                     f"— let it finish or abort it first")
            self.conn.execute(
                "INSERT INTO rollouts (rollout_id, model_name, model_version, spec, state, current_wave, reason, "
                "revision, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (status.rollout_id, status.spec.target.name, status.spec.target.version,
                 json.dumps(status.spec.to_json()), str(status.state), status.current_wave, status.reason,
                 status.revision, status.created_at, status.updated_at))
            self._save_waves(status)
            self.conn.executemany(
                "INSERT INTO rollout_devices (rollout_id, device_id, wave, assigned_at, previous_name, "
                "previous_version, outcome, reason, outcome_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [self._assignment_row(status.rollout_id, a) for a in assignments.values()])
            self._events(status.rollout_id, [("created", {"devices": len(assignments),
                                                          "target": str(status.spec.target)})], status.created_at)

    def active_rollouts_of(self, device_ids: list[str]) -> list[tuple[str, str, str]]:
        """(device, rollout, state) for each of these devices that is in a rollout not yet finished."""
        states = ",".join(f"'{s}'" for s in ACTIVE)
        busy = []
        for chunk in _chunks(sorted(device_ids)):
            marks = ",".join("?" * len(chunk))
            busy += [(r["device_id"], r["rollout_id"], r["state"]) for r in self.conn.query(
                f"SELECT d.device_id, r.rollout_id, r.state FROM rollout_devices d JOIN rollouts r "
                f"ON r.rollout_id = d.rollout_id WHERE r.state IN ({states}) AND d.device_id IN ({marks})", chunk)]
        return sorted(busy)

    def _save_waves(self, status: RolloutStatus) -> None:
        self.conn.execute("DELETE FROM rollout_waves WHERE rollout_id = ?", (status.rollout_id,))
        self.conn.executemany(
            "INSERT INTO rollout_waves (rollout_id, wave, size, state, started_at, success_since, ended_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(status.rollout_id, w.index, w.size, str(w.state), w.started_at, w.success_since, w.ended_at)
             for w in status.waves])

    @staticmethod
    def _assignment_row(rollout_id: str, a: Assignment) -> tuple:
        return (rollout_id, a.device_id, a.wave, a.assigned_at, a.previous.name if a.previous else None,
                a.previous.version if a.previous else None, str(a.outcome), a.reason, a.outcome_at)

    def _events(self, rollout_id: str, events: list[tuple[str, dict[str, Any]]], at: float) -> None:
        self.conn.executemany("INSERT INTO rollout_events (rollout_id, at, kind, detail) VALUES (?, ?, ?, ?)",
                              [(rollout_id, at, kind, json.dumps(detail)) for kind, detail in events])

    def rollout_ids(self, states: tuple[Phase, ...] | None = None) -> list[str]:
        rows = self.conn.query("SELECT rollout_id, state FROM rollouts ORDER BY created_at, rollout_id")
        return [r["rollout_id"] for r in rows if states is None or r["state"] in states]

    def rollout_revisions(self, states: tuple[Phase, ...]) -> dict[str, int]:
        rows = self.conn.query("SELECT rollout_id, state, revision FROM rollouts")
        return {r["rollout_id"]: r["revision"] for r in rows if r["state"] in states}

    def load_rollout(self, rollout_id: str) -> tuple[RolloutStatus, dict[str, Assignment]]:
        rows = self.conn.query("SELECT * FROM rollouts WHERE rollout_id = ?", (rollout_id,))
        if not rows:
            known = self.rollout_ids()
            hint = f" (rollouts: {', '.join(known[-5:])})" if known else " (there are no rollouts yet)"
            raise NotFound(f"no rollout {rollout_id!r}{hint}")
        r = rows[0]
        waves = [WaveStatus(w["wave"], w["size"], Phase(w["state"]), w["started_at"], w["success_since"],
                            w["ended_at"])
                 for w in self.conn.query("SELECT * FROM rollout_waves WHERE rollout_id = ? ORDER BY wave",
                                          (rollout_id,))]
        status = RolloutStatus(r["rollout_id"], RolloutSpec.from_json(json.loads(r["spec"])), Phase(r["state"]),
                               r["current_wave"], waves, r["reason"], r["created_at"], r["updated_at"], r["revision"])
        assignments = {}
        for a in self.conn.query("SELECT * FROM rollout_devices WHERE rollout_id = ?", (rollout_id,)):
            previous = ModelRef(a["previous_name"], a["previous_version"]) if a["previous_name"] else None
            assignments[a["device_id"]] = Assignment(a["device_id"], a["wave"], a["assigned_at"], previous,
                                                     Outcome(a["outcome"]), a["reason"], a["outcome_at"])
        return status, assignments

    # -- leadership among replicas ---------------------------------------------------------------------
    def acquire_lease(self, name: str, holder: str, ttl: float) -> int | None:
        """Take or renew the lease ``name`` for ``holder`` until now + ``ttl``: its epoch (a new one each
        time the lease changes hands), or None while another holder's lease runs."""
        now = self.clock()
        with self.conn.transaction():
            changed = self.conn.execute(
                "UPDATE leases SET epoch = CASE WHEN holder = ? THEN epoch ELSE epoch + 1 END, holder = ?, "
                "expires_at = ? WHERE name = ? AND (holder = ? OR expires_at < ?)",
                (holder, holder, now + ttl, name, holder, now))
            if changed != 1:
                self.conn.execute("INSERT INTO leases (name, holder, epoch, expires_at) VALUES (?, ?, 1, ?) "
                                  "ON CONFLICT (name) DO NOTHING", (name, holder, now + ttl))
            rows = self.conn.query("SELECT holder, epoch FROM leases WHERE name = ?", (name,))
        return rows[0]["epoch"] if rows and rows[0]["holder"] == holder else None

    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up at once (a replica stopping cleanly): another takes it at its next try."""
        self.conn.execute("UPDATE leases SET expires_at = 0 WHERE name = ? AND holder = ?", (name, holder))

    def lease_holder(self, name: str) -> dict[str, Any] | None:
        rows = self.conn.query("SELECT holder, epoch, expires_at FROM leases WHERE name = ?", (name,))
        return rows[0] if rows else None

    def save_decision(self, decision: Decision, expected_revision: int,
                      fence: tuple[str, str, int] | None = None) -> bool:
        """Persist a decision if the rollout is still at ``expected_revision`` — and, with ``fence``
        (lease name, holder, epoch), if that lease is still this holder's at that epoch and has not
        run out; False otherwise (it moved on, or a stale leader's decision is refused)."""
        st = decision.rollout
        now = st.updated_at or self.clock()
        with self.conn.transaction():
            if fence is not None:
                name, holder, epoch = fence
                lock = " FOR UPDATE" if self.conn.dialect == "postgresql" else ""  # SQLite: BEGIN IMMEDIATE
                held = self.conn.query("SELECT 1 FROM leases WHERE name = ? AND holder = ? AND epoch = ? AND "
                                       f"expires_at >= ?{lock}", (name, holder, epoch, self.clock()))
                if not held:
                    return False
            changed = self.conn.execute(
                "UPDATE rollouts SET state = ?, current_wave = ?, reason = ?, revision = ?, updated_at = ? "
                "WHERE rollout_id = ? AND revision = ?",
                (str(st.state), st.current_wave, st.reason, expected_revision + 1, now, st.rollout_id,
                 expected_revision))
            if changed != 1:
                return False
            st.revision = expected_revision + 1
            self._save_waves(st)
            self.conn.executemany(
                "UPDATE rollout_devices SET assigned_at = ?, previous_name = ?, previous_version = ?, outcome = ?, "
                "reason = ?, outcome_at = ? WHERE rollout_id = ? AND device_id = ?",
                [(a.assigned_at, a.previous.name if a.previous else None, a.previous.version if a.previous else None,
                  str(a.outcome), a.reason, a.outcome_at, st.rollout_id, a.device_id)
                 for a in decision.assignments.values()])
            self._write_desired(decision.desired, now)
            self._events(st.rollout_id, decision.events, now)
        return True

    def events(self, rollout_id: str, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self.conn.query("SELECT at, kind, detail FROM rollout_events WHERE rollout_id = ? "
                               "ORDER BY event_id DESC LIMIT ?", (rollout_id, limit))
        return [{"at": r["at"], "kind": r["kind"], **json.loads(r["detail"])} for r in reversed(rows)]

    # -- desired outbox ------------------------------------------------------------------------------
    def _write_desired(self, writes, now: float) -> None:
        self.conn.executemany(
            "INSERT INTO desired (device_id, model_name, model_version, rollout_id, revision, published_revision, "
            "updated_at) VALUES (?, ?, ?, ?, 1, 0, ?) ON CONFLICT (device_id) DO UPDATE SET "
            "model_name = excluded.model_name, model_version = excluded.model_version, "
            "rollout_id = excluded.rollout_id, revision = desired.revision + 1, updated_at = excluded.updated_at",
            [(w.device_id, w.model.name if w.model else None, w.model.version if w.model else None, w.rollout_id, now)
             for w in writes])

    def unpublished_desired(self, limit: int = 5000) -> list[dict[str, Any]]:
        return self.conn.query("SELECT device_id, model_name, model_version, rollout_id, revision FROM desired "
                               "WHERE published_revision < revision ORDER BY updated_at, device_id LIMIT ?", (limit,))

    def mark_published(self, sent: list[tuple[str, int]]) -> None:
        with self.conn.transaction():
            self.conn.executemany("UPDATE desired SET published_revision = ? WHERE device_id = ? AND revision = ?",
                                  [(rev, device, rev) for device, rev in sent])

    def republish_all_desired(self) -> None:
        """After a (re)connection: a broker without persistence may have lost the retained messages."""
        self.conn.execute("UPDATE desired SET published_revision = 0")

    def desired_of(self, device_ids: Iterable[str] | None = None) -> dict[str, ModelRef | None]:
        rows = self.conn.query("SELECT device_id, model_name, model_version FROM desired")
        wanted = None if device_ids is None else set(device_ids)
        return {r["device_id"]: ModelRef(r["model_name"], r["model_version"]) if r["model_name"] else None
                for r in rows if wanted is None or r["device_id"] in wanted}

    # -- telemetry over time -------------------------------------------------------------------------
    def add_samples(self, samples: list[tuple[str, float, dict[str, Any]]]) -> None:
        """(device_id, at, sample) rows: what a device's charts plot."""
        if samples:
            self.conn.executemany("INSERT INTO device_samples (device_id, at, sample) VALUES (?, ?, ?)",
                                  [(d, at, json.dumps(sample)) for d, at, sample in samples])

    def samples(self, device_id: str, since: float, limit: int = 5000) -> list[tuple[float, dict[str, Any]]]:
        rows = self.conn.query("SELECT at, sample FROM device_samples WHERE device_id = ? AND at >= ? "
                               "ORDER BY at DESC LIMIT ?", (device_id, since, limit))
        return [(r["at"], json.loads(r["sample"])) for r in reversed(rows)]

    def prune_samples(self, before: float) -> int:
        return self.conn.execute("DELETE FROM device_samples WHERE at < ?", (before,))

    def add_history(self, entries: list[tuple[str, float, dict[str, Any]]]) -> None:
        """(device_id, at, entry) rows: a device's changes of state, model or connection."""
        if entries:
            self.conn.executemany("INSERT INTO device_history (device_id, at, entry) VALUES (?, ?, ?)",
                                  [(d, at, json.dumps(entry)) for d, at, entry in entries])

    def history(self, device_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The device's newest changes first."""
        rows = self.conn.query("SELECT at, entry FROM device_history WHERE device_id = ? ORDER BY at DESC LIMIT ?",
                               (device_id, limit))
        return [{"at": r["at"], **json.loads(r["entry"])} for r in rows]

    def prune_history(self, before: float) -> int:
        return self.conn.execute("DELETE FROM device_history WHERE at < ?", (before,))

    # -- service heartbeat ---------------------------------------------------------------------------
    def heartbeat(self, name: str, detail: dict[str, Any]) -> None:
        self.conn.execute("INSERT INTO service_status (name, detail, updated_at) VALUES (?, ?, ?) "
                          "ON CONFLICT (name) DO UPDATE SET detail = excluded.detail, updated_at = excluded.updated_at",
                          (name, json.dumps(detail), self.clock()))

    def service_status(self) -> list[dict[str, Any]]:
        return [{"name": r["name"], "updated_at": r["updated_at"], **json.loads(r["detail"])}
                for r in self.conn.query("SELECT * FROM service_status ORDER BY name")]
