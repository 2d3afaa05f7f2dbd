"""The rollout controller: on every tick, decide each running rollout from the recorded device states,
persist the decision, then act on it (publish the ``desired`` messages it wrote to the outbox).

Persist-then-act: a decision reaches the database (with its events and desired rows) before any
message leaves, and the outbox marks a row sent only after the broker acknowledged it (QoS 1). A
controller killed at any point restarts from the database: decisions already made are not made
again, and desired messages not yet acknowledged are sent again (they are idempotent: retained,
same content).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from typing import Any

from edgeopt.fleet.rollout import Assignment, Decision, DeviceRecord, Phase, RolloutStatus, decide
from edgeopt.fleet.store import FleetStore
from edgeopt.protocol import ModelRef, ProtocolError, device_topic, encode_desired

log = logging.getLogger("edgeopt.fleet.controller")
LOOKBACK_S = 2.0  # replicas' clocks must agree within this (NTP does: docs/scaling.md)


class DesiredPublisher:
    """Sends the outbox's unsent ``desired`` rows, retained with QoS 1, and marks the acknowledged ones."""

    def __init__(self, store: FleetStore, publish, prefix: str = "edgeopt", ack_timeout: float = 10.0,
                 batch: int = 5000):
        """``publish(topic, payload, qos, retain)`` returns paho's ``MQTTMessageInfo`` (or alike)."""
        self.store, self.publish, self.prefix = store, publish, prefix
        self.ack_timeout, self.batch = ack_timeout, batch
        self.stats: Counter[str] = Counter()
        self._republish = threading.Event()

    def request_republish(self) -> None:
        """Called on every (re)connection: send every desired again at the next flush."""
        self._republish.set()

    def flush(self) -> int:
        if self._republish.is_set():
            self._republish.clear()
            self.store.republish_all_desired()
        sent_total = 0
        while rows := self.store.unpublished_desired(self.batch):
            infos, refused = [], []
            for r in rows:
                model = ModelRef(r["model_name"], r["model_version"]) if r["model_name"] else None
                try:
                    payload = encode_desired(model, r["rollout_id"])
                except ProtocolError as exc:  # a row from before names were matched whole: never sent
                    log.error("desired for %s not sent: %s", r["device_id"], exc)
                    refused.append((r["device_id"], r["revision"]))
                    continue
                infos.append((r, self.publish(device_topic(self.prefix, r["device_id"], "desired"), payload, 1,
                                              True)))
            self.store.mark_published(refused)
            self.stats["refused"] += len(refused)
            rows = [r for r, _ in infos]
            deadline = time.monotonic() + self.ack_timeout
            sent = []
            for r, info in infos:
                with contextlib.suppress(RuntimeError, ValueError):  # not connected: retried next flush
                    info.wait_for_publish(max(0.0, deadline - time.monotonic()))
                if info.is_published():
                    sent.append((r["device_id"], r["revision"]))
            self.store.mark_published(sent)
            self.stats["published"] += len(sent)
            sent_total += len(sent)
            if len(sent) < len(rows):
                self.stats["unacknowledged"] += len(rows) - len(sent)
                break
        return sent_total


class Leadership:
    """Which replica of ``fleet serve`` runs the controller: the one holding the ``controller`` lease
    in the shared database (FleetStore.acquire_lease), renewed every tick and given up after ``ttl``
    seconds without renewal — a killed leader's standby takes over within ``ttl`` + one tick. The
    lease's epoch fences the decisions: a leader that lost the lease (paused, cut off) cannot save one."""

    NAME = "controller"

    def __init__(self, store: FleetStore, holder: str, ttl: float):
        self.store, self.holder, self.ttl = store, holder, ttl
        self.epoch: int | None = None

    def renew(self) -> tuple[str, str, int] | None:
        """The fence while this replica leads, else None."""
        epoch = self.store.acquire_lease(self.NAME, self.holder, self.ttl)
        if epoch != self.epoch:
            log.info("controller: %s", f"leading (epoch {epoch})" if epoch is not None else
                     f"standing by ({self.store.lease_holder(self.NAME) or {}} leads)")
        self.epoch = epoch
        return None if epoch is None else (self.NAME, self.holder, epoch)

    @property
    def leading(self) -> bool:
        return self.epoch is not None

    def release(self) -> None:
        if self.epoch is not None:
            self.store.release_lease(self.NAME, self.holder)
            self.epoch = None


class Controller:
    """Keeps the device records and the running rollouts in memory, refreshed from the database on
    every tick: only the devices written since the last tick are read again, and a rollout is read
    again only when its revision changed (an operator command). A tick over 10,000 devices thus
    costs the decision itself, not a reload of the fleet."""

    def __init__(self, store: FleetStore, publisher: DesiredPublisher, clock=time.time, lookback: float = 0.0):
        """``lookback``: seconds of device rows read again each tick — LOOKBACK_S with replicas, whose
        registries stamp rows with their own clocks (one registry alone stamps in commit order)."""
        self.store, self.publisher, self.clock, self.lookback = store, publisher, clock, lookback
        self.stats: Counter[str] = Counter()
        self._devices: dict[str, DeviceRecord] = {}
        self._devices_seen = float("-inf")
        self._rollouts: dict[str, tuple[RolloutStatus, dict[str, Assignment]]] = {}

    def tick(self, fence: tuple[str, str, int] | None = None) -> list[Decision]:
        """Decide every running or paused rollout once, persist, then publish. ``fence``: the lease this
        replica leads by (FleetStore.save_decision refuses the decision once it is not)."""
        # with replicas, read again what changed in the last seconds too: their registries stamp device
        # rows with their own clocks, and one's transaction can commit after a later stamp of another's
        # was read (re-reading every row of the last 2 s costs a tick over 10,000 fresh rows 89 ms, not 14)
        changed, seen = self.store.devices_changed_since(self._devices_seen - self.lookback)
        self._devices_seen = max(self._devices_seen, seen)
        self._devices.update(changed)
        decisions = []
        live = self.store.rollout_revisions((Phase.RUNNING, Phase.PAUSED))
        for rollout_id in list(self._rollouts):
            if rollout_id not in live:
                del self._rollouts[rollout_id]
        for rollout_id, revision in live.items():
            cached = self._rollouts.get(rollout_id)
            if cached is None or cached[0].revision != revision:
                cached = self._rollouts[rollout_id] = self.store.load_rollout(rollout_id)
            status, assignments = cached
            decision = decide(status, assignments, self._devices, self.clock())
            if not decision.changed:
                continue
            if not self.store.save_decision(decision, status.revision, fence):
                self.stats["conflicts"] += 1  # changed underneath (an operator command): re-read next tick
                self._rollouts.pop(rollout_id, None)
                continue
            self._rollouts[rollout_id] = (decision.rollout, {**assignments, **decision.assignments})
            decisions.append(decision)
            self.stats["decisions"] += 1
            for kind, detail in decision.events:
                if kind != "device_failed":
                    log.info("rollout %s: %s %s", rollout_id, kind, detail)
        self.publisher.flush()
        return decisions

    def forget(self) -> None:
        """Drop what is cached: a replica that leads again reads the fleet afresh."""
        self._devices, self._devices_seen, self._rollouts = {}, float("-inf"), {}

    def run(self, stop: threading.Event, interval: float = 1.0, leadership: Leadership | None = None) -> None:
        """Tick every ``interval`` seconds — with ``leadership``, only while this replica leads."""
        while not stop.is_set():
            try:
                fence = None
                if leadership is not None:
                    fence = leadership.renew()
                    if fence is None:
                        self.forget()
                        stop.wait(interval)
                        continue
                self.tick(fence)
            except Exception:  # a database hiccup must not end the service; the next tick retries
                log.exception("controller tick failed")
                self.stats["tick_errors"] += 1
            stop.wait(interval)

    def snapshot_stats(self) -> dict[str, Any]:
        return dict(self.stats) | {f"desired_{k}": v for k, v in self.publisher.stats.items()}
