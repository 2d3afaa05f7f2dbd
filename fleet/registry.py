"""The device registry: devices appear from their retained ``state`` messages and are kept up to
date from ``state`` and ``telemetry``; the last will only marks a device offline.

Messages are validated by ``edgeopt.protocol``; a malformed one is counted and logged (at most once a
second per kind) and dropped. Valid ones are queued and written in batches (one transaction every
``flush_interval`` seconds), so thousands of devices changing state at once cost a few
transactions, not thousands. How a message changes a record is a pure function (``merge_*``);
times are the fleet's clock when the message arrived, never the device's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import replace
from typing import Any

from edgeopt.fleet.rollout import DeviceRecord, rolled_back_from
from edgeopt.fleet.store import FleetStore
from edgeopt.protocol import (
    DeviceState,
    OfflineMark,
    ProtocolError,
    Telemetry,
    parse_device_topic,
    parse_state,
    parse_telemetry,
)

log = logging.getLogger("edgeopt.fleet.registry")


def merge_state(prev: DeviceRecord | None, msg: DeviceState | OfflineMark, at: float) -> DeviceRecord:
    """The record after a state message (or a last will) arrived at ``at``."""
    if isinstance(msg, OfflineMark):
        if prev is None:
            return DeviceRecord(msg.device_id, online=False, last_seen=at)
        return replace(prev, online=False, last_seen=at)
    u = msg.update
    prev_u = prev.update if prev is not None else None
    moved = prev_u is None or (prev_u.state, prev_u.target) != (u.state, u.target)
    failed_target = prev.failed_target if prev else None
    failed_reason = prev.failed_reason if prev else None
    failed_at = prev.failed_at if prev else None
    rolled_back = rolled_back_from(msg.model, u)
    if rolled_back is not None:
        # a new rollback event unless we already saw this device rolling back from this target
        if prev is None or rolled_back_from(prev.model, prev_u) != rolled_back:
            failed_at = at
        failed_target, failed_reason = rolled_back, u.reason
    return DeviceRecord(
        msg.device_id, online=msg.online, labels=msg.labels, profile=msg.profile, agent_version=msg.agent_version,
        model=msg.model, update=u, update_changed_at=at if moved else prev.update_changed_at,  # type: ignore[union-attr]
        health=msg.health, telemetry=prev.telemetry if prev else None, failed_target=failed_target,
        failed_reason=failed_reason, failed_at=failed_at, last_seen=at,
        rejected_messages=_rejected(prev, msg.rejected_messages))


def _rejected(prev: DeviceRecord | None, reported: dict[str, dict[str, int]] | None):
    """The newest report of refused messages (state and telemetry both carry it; older agents neither)."""
    return reported if reported is not None else (prev.rejected_messages if prev else None)


def merge_telemetry(prev: DeviceRecord | None, msg: Telemetry, at: float) -> DeviceRecord:
    if prev is None:
        return DeviceRecord(msg.device_id, online=True, telemetry=msg, last_seen=at,
                            rejected_messages=msg.rejected_messages)
    return replace(prev, telemetry=msg, last_seen=at, rejected_messages=_rejected(prev, msg.rejected_messages))


def _history_key(rec: DeviceRecord | None) -> tuple | None:
    if rec is None:
        return None
    u = rec.update
    return rec.online, rec.model, u.state if u else None, u.target if u else None


def history_entry(prev: DeviceRecord | None, rec: DeviceRecord) -> dict[str, Any] | None:
    """What a device's state history records when its connection, model, update state or update target
    changed with this message (None when none did: a repeated report is no event)."""
    if _history_key(prev) == _history_key(rec):
        return None
    u = rec.update
    return {"online": rec.online, "model": str(rec.model) if rec.model else None, "state": u.state if u else None,
            "target": str(u.target) if u and u.target else None, "rollout": u.rollout if u else None,
            "reason": u.reason if u else None}


def telemetry_sample(rec: DeviceRecord) -> dict[str, float | int | None]:
    """What a device's charts plot, from its telemetry and the health its state last reported."""
    t, h = rec.telemetry, rec.health
    return {"windows_per_s": t.windows_per_s, "latency_p50_ms": t.latency_p50_ms, "latency_p95_ms": t.latency_p95_ms,
            "error_rate": t.error_rate if t.error_rate is not None else (h.error_rate if h else None),
            "inference_errors": t.inference_errors, "agreement": h.agreement if h else None}


class Registry:
    """Subscribes to every device's state and telemetry and keeps the device table current."""

    def __init__(self, store: FleetStore, prefix: str = "edgeopt", flush_interval: float = 0.25,
                 clock=time.time, sample_s: float = 60.0):
        """``sample_s``: at most one telemetry sample per device this often goes to ``device_samples``."""
        self.store, self.prefix, self.flush_interval, self.clock = store, prefix, flush_interval, clock
        self.sample_s = sample_s
        self._sampled: dict[str, float] = {}  # device → when its last sample was kept
        self.stats: Counter[str] = Counter()
        self._pending: list[tuple[float, DeviceState | OfflineMark | Telemetry]] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._last_log: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- network side (called on the MQTT client's thread) --------------------------------------------
    def subscribe(self, subscribe) -> None:
        """``subscribe(topic, qos, handler(topic, payload))``."""
        subscribe(f"{self.prefix}/devices/+/state", 1, self.on_message)
        subscribe(f"{self.prefix}/devices/+/telemetry", 0, self.on_message)

    def on_message(self, topic: str, payload: bytes) -> None:
        try:
            device_id, kind = parse_device_topic(self.prefix, topic)
            msg = parse_state(device_id, payload) if kind == "state" else parse_telemetry(device_id, payload)
        except ProtocolError as exc:
            self._malformed(topic, exc)
            return
        except Exception as exc:  # a parser bug must not take the service down either
            self._malformed(topic, exc)
            log.exception("unexpected error parsing %s", topic)
            return
        with self._lock:
            self._pending.append((self.clock(), msg))
            self.stats["telemetry" if isinstance(msg, Telemetry) else "states"] += 1

    def _malformed(self, topic: str, exc: Exception) -> None:
        kind = topic.rsplit("/", 1)[-1] if "/" in topic else "?"
        with self._lock:
            self.stats[f"malformed_{kind if kind in ('state', 'telemetry') else 'other'}"] += 1
        now = time.monotonic()
        if now - self._last_log.get(kind, 0.0) >= 1.0:
            self._last_log[kind] = now
            log.warning("dropped malformed message on %s: %s", topic[:120], exc)

    # -- database side ------------------------------------------------------------------------------
    def flush(self) -> int:
        """Write the queued messages (in arrival order) to the database; returns how many."""
        with self._flush_lock:
            with self._lock:
                batch, self._pending = self._pending, []
            if not batch:
                return 0
            try:
                records = self.store.load_devices({m.device_id for _, m in batch})
                samples, history = [], []
                for at, msg in batch:
                    prev = records.get(msg.device_id)
                    if isinstance(msg, Telemetry):
                        rec = records[msg.device_id] = merge_telemetry(prev, msg, at)
                        if at - self._sampled.get(msg.device_id, float("-inf")) >= self.sample_s:
                            samples.append((msg.device_id, at, telemetry_sample(rec)))
                    else:
                        rec = records[msg.device_id] = merge_state(prev, msg, at)
                        if (entry := history_entry(prev, rec)) is not None:
                            history.append((msg.device_id, at, entry))
                touched = {m.device_id for _, m in batch}
                self.store.save_devices([records[d] for d in sorted(touched)])
                self.store.add_samples(samples)
                self.store.add_history(history)
                for device_id, at, _ in samples:
                    self._sampled[device_id] = at
            except BaseException:
                with self._lock:  # keep them, in order, for the next attempt
                    self._pending = batch + self._pending
                raise
            with self._lock:
                self.stats["flushes"] += 1
            return len(batch)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgeopt-registry", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval):
            try:
                self.flush()
            except Exception:
                log.exception("registry flush failed; retrying")
                with self._lock:
                    self.stats["flush_errors"] += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.flush()

    def snapshot_stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self.stats) | {"queued": len(self._pending)}
