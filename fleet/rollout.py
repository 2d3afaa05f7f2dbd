"""Rollouts as data, and the decisions about them as pure functions of recorded device states.

A rollout sends one model version (``target``) to the devices a label selector matched when it was
created, in waves. Each wave is a cumulative share of those devices (``1%,10%,50%,100%``) or a
cumulative count. The controller calls ``decide`` on every tick with what the registry recorded;
the result (outcomes, wave and rollout states, ``desired`` writes, events) is persisted before any
of it is acted on, so a restarted controller continues from exactly what was decided.

Per device (``device_outcome``):
  SUCCESS  the device runs the target (model == target) and its update state is COMMITTED or IDLE,
           and no health gate is out of bounds;
  FAILURE  it rolled back from the target (ROLLING_BACK / ROLLED_BACK, IDLE naming the target with a
           reason — under this rollout's id, or none — or a recorded rollback of the target after it
           was told), a health gate (probation error rate, agreement, latency p95,
           NaN outputs — from its state or its telemetry) is out of bounds while it runs the target,
           or it made no progress towards the target within ``device_timeout_s``. A failure is final
           for the rollout; a success is re-checked every tick (health can degrade while baking);
  PENDING  anything else.

Per rollout (``decide``):
  - abort when the failures among all devices told so far cross the failure threshold (more than
    ``failure_pct`` of them, or more than ``failure_count``), or when a wave ends (no device
    pending) below its success threshold; abort points every told device's ``desired`` back to the
    version it ran before and records why;
  - a wave completes once its success share has held at or above ``success_threshold`` for
    ``bake_s`` (the clock restarts whenever the share drops below it); the next wave starts at once;
  - PAUSED: no wave starts or completes, but outcomes are still recorded and the failure threshold
    still aborts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from edgeopt.errors import UserInputError
from edgeopt.fleet.rollout_spec import Gates, RolloutSpec, plan_waves, selector_text
from edgeopt.protocol import Health, ModelRef, Telemetry, UpdateStatus


class Phase(StrEnum):
    """The state of a rollout, and of each of its waves."""

    CREATED = "CREATED"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    ABORTED = "ABORTED"
    COMPLETED = "COMPLETED"


ACTIVE = (Phase.CREATED, Phase.RUNNING, Phase.PAUSED)


class Outcome(StrEnum):
    PENDING = "PENDING"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"


@dataclass
class WaveStatus:
    index: int
    size: int
    state: Phase = Phase.CREATED
    started_at: float | None = None
    success_since: float | None = None  # when the success share last reached the threshold
    ended_at: float | None = None


@dataclass
class RolloutStatus:
    rollout_id: str
    spec: RolloutSpec
    state: Phase
    current_wave: int
    waves: list[WaveStatus]
    reason: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    revision: int = 0


@dataclass
class Assignment:
    """One device's place in a rollout. ``assigned_at`` is set when its wave starts (its desired is
    written then); ``previous`` is what it ran at that moment (the abort target)."""

    device_id: str
    wave: int
    assigned_at: float | None = None
    previous: ModelRef | None = None
    outcome: Outcome = Outcome.PENDING
    reason: str | None = None
    outcome_at: float | None = None


@dataclass(frozen=True)
class DeviceRecord:
    """What the registry recorded about a device. ``*_at`` times are the fleet's clock (when the
    message arrived), never the device's."""

    device_id: str
    online: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    profile: str | None = None
    agent_version: str | None = None
    model: ModelRef | None = None
    update: UpdateStatus | None = None
    update_changed_at: float | None = None  # last change of update state or target
    health: Health | None = None
    telemetry: Telemetry | None = None
    failed_target: ModelRef | None = None    # the last target the device rolled back from
    failed_reason: str | None = None
    failed_at: float | None = None
    last_seen: float | None = None
    rejected_messages: dict[str, dict[str, int]] | None = None  # what the device refused, as it last reported


@dataclass(frozen=True)
class DesiredWrite:
    device_id: str
    model: ModelRef | None  # None: clear desired (the device had no model before)
    rollout_id: str


@dataclass
class Decision:
    rollout: RolloutStatus
    assignments: dict[str, Assignment] = field(default_factory=dict)  # only the changed ones
    desired: list[DesiredWrite] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    changed: bool = False


# -- per device ------------------------------------------------------------------------------------
ROLLBACK_STATES = ("ROLLING_BACK", "ROLLED_BACK")
TRIAL_STATES = ("SHADOW", "PROBATION")
SETTLED_STATES = ("COMMITTED", "IDLE")


def rolled_back_from(model: ModelRef | None, update: UpdateStatus | None) -> ModelRef | None:
    """The target a device reports rolling back from: ROLLING_BACK / ROLLED_BACK, or IDLE still
    naming the target with a reason while running something else (the update machine keeps the
    record's target and reason when it returns to IDLE after a rollback)."""
    if update is None or update.target is None:
        return None
    if update.state in ROLLBACK_STATES:
        return update.target
    if update.state == "IDLE" and update.reason and model != update.target:
        return update.target
    return None


def health_readings(health: Health | None, telemetry: Telemetry | None) -> dict[str, float | None]:
    """What the health gates compare: the worse of the state's health and the telemetry (about the
    target) where both report a value; agreement and NaN outputs come from the health alone."""
    def worst(a: float | None, b: float | None) -> float | None:
        return max(a, b) if a is not None and b is not None else (a if b is None else b)

    return {"error_rate": worst(health.error_rate if health else None, telemetry.error_rate if telemetry else None),
            "agreement": health.agreement if health else None,
            "latency_p95_ms": worst(health.latency_p95_ms if health else None,
                                    telemetry.latency_p95_ms if telemetry else None),
            "nan_outputs": health.nan_outputs if health else None}


def health_violation(health: Health | None, telemetry: Telemetry | None, gates: Gates) -> str | None:
    """The first bound the device's reported health breaks, as text; None when all hold."""
    r = health_readings(health, telemetry)
    error_rate, agreement, p95, nans = r["error_rate"], r["agreement"], r["latency_p95_ms"], r["nan_outputs"]
    if gates.max_error_rate is not None and error_rate is not None and error_rate > gates.max_error_rate:
        return f"error rate {error_rate:.3g} > {gates.max_error_rate:g}"
    if gates.min_agreement is not None and agreement is not None and agreement < gates.min_agreement:
        return f"agreement {agreement:.3g} < {gates.min_agreement:g}"
    if gates.max_latency_p95_ms is not None and p95 is not None and p95 > gates.max_latency_p95_ms:
        return f"latency p95 {p95:.3g} ms > {gates.max_latency_p95_ms:g} ms"
    if gates.max_nan_outputs is not None and nans is not None and nans > gates.max_nan_outputs:
        return f"{int(nans)} NaN outputs > {gates.max_nan_outputs}"
    return None


def _may_concern(update: UpdateStatus | None, rollout_id: str | None) -> bool:
    """Whether a device's update report may be about ``rollout_id``: it names that rollout or none."""
    return update is None or update.rollout is None or rollout_id is None or update.rollout == rollout_id


def device_outcome(a: Assignment, rec: DeviceRecord | None, spec: RolloutSpec, now: float,
                   rollout_id: str | None = None) -> tuple[Outcome, str | None]:
    """The outcome of one told device (see the module docstring). A rollback the device reports
    under another rollout id is an earlier rollout's (a re-roll of a refused version, before the
    device has reacted to its new desired), not this one's failure."""
    if a.outcome is Outcome.FAILURE:
        return a.outcome, a.reason
    assigned_at = a.assigned_at if a.assigned_at is not None else now
    target = spec.target
    if rec is not None:
        u = rec.update
        if rec.failed_target == target and rec.failed_at is not None and rec.failed_at >= assigned_at:
            return Outcome.FAILURE, f"rolled back: {rec.failed_reason or 'no reason given'}"
        if rolled_back_from(rec.model, u) == target and _may_concern(u, rollout_id):
            return Outcome.FAILURE, f"rolled back: {u.reason or 'no reason given'}"  # type: ignore[union-attr]
        on_target = rec.model == target
        if on_target or (u is not None and u.target == target and u.state in TRIAL_STATES):
            telemetry = rec.telemetry if rec.telemetry is not None and rec.telemetry.model == target else None
            if problem := health_violation(rec.health, telemetry, spec.gates):
                return Outcome.FAILURE, f"health gate: {problem}"
        if on_target and (u is None or u.state in SETTLED_STATES):
            return Outcome.SUCCESS, None
    last_progress = assigned_at
    if rec is not None and rec.update is not None and rec.update.target == target and rec.update_changed_at:
        last_progress = max(last_progress, rec.update_changed_at)
    if now - last_progress > spec.device_timeout_s:
        state = rec.update.state if rec is not None and rec.update is not None else "never reported"
        offline = "" if rec is not None and rec.online else ", offline"
        return Outcome.FAILURE, f"timeout: no progress for {now - last_progress:.0f} s (last state {state}{offline})"
    return Outcome.PENDING, None


# -- per rollout -----------------------------------------------------------------------------------
def new_rollout(rollout_id: str, spec: RolloutSpec, device_ids: list[str], now: float
                ) -> tuple[RolloutStatus, dict[str, Assignment]]:
    """A CREATED rollout over ``device_ids`` (the devices the selector matched), planned into waves."""
    if not device_ids:
        raise UserInputError(f"selector {selector_text(spec.selector)} matches no device")
    waves = plan_waves(rollout_id, spec.waves, device_ids)
    status = RolloutStatus(rollout_id, spec, Phase.CREATED, 0,
                           [WaveStatus(i, len(w)) for i, w in enumerate(waves)], None, now, now, 0)
    assignments = {d: Assignment(d, i) for i, w in enumerate(waves) for d in w}
    return status, assignments


def _failure_crossed(spec: RolloutSpec, told: int, failures: int) -> bool:
    if spec.failure_count is not None and failures > spec.failure_count:
        return True
    return spec.failure_pct is not None and told > 0 and failures / told > spec.failure_pct + 1e-12


def _failure_summary(spec: RolloutSpec, told: int, failed: list[Assignment]) -> str:
    limits = []
    if spec.failure_pct is not None:
        limits.append(f"{spec.failure_pct:.0%}")
    if spec.failure_count is not None:
        limits.append(f"{spec.failure_count} devices")
    shown = "; ".join(f"{a.device_id}: {a.reason}" for a in sorted(failed, key=lambda a: a.device_id)[:3])
    more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
    return (f"{len(failed)} of {told} told devices failed ({len(failed) / told:.0%}), past the failure threshold "
            f"of {' or '.join(limits)}: {shown}{more}")


class _Draft:
    """A decision under construction (copies on write, so inputs stay untouched)."""

    def __init__(self, status: RolloutStatus, assignments: dict[str, Assignment], now: float):
        self.status = copy.deepcopy(status)
        self.assignments = dict(assignments)
        self.now = now
        self.decision = Decision(self.status)

    def update(self, a: Assignment, **changes: Any) -> Assignment:
        new = replace(a, **changes)
        self.assignments[a.device_id] = new
        self.decision.assignments[a.device_id] = new
        self.decision.changed = True
        return new

    def event(self, kind: str, **detail: Any) -> None:
        self.decision.events.append((kind, detail))
        self.decision.changed = True

    def finish(self) -> Decision:
        if self.decision.changed:
            self.status.updated_at = self.now
        return self.decision


def _abort(d: _Draft, reason: str) -> None:
    st = d.status
    st.state, st.reason = Phase.ABORTED, reason
    for w in st.waves:
        if w.state in (Phase.RUNNING, Phase.PAUSED):
            w.state, w.ended_at = Phase.ABORTED, d.now
    for a in sorted(d.assignments.values(), key=lambda a: a.device_id):
        if a.assigned_at is not None:
            d.decision.desired.append(DesiredWrite(a.device_id, a.previous, st.rollout_id))
    d.event("aborted", reason=reason, wave=st.current_wave + 1, rollback=len(d.decision.desired))


def _start_wave(d: _Draft, index: int, devices: dict[str, DeviceRecord]) -> None:
    st = d.status
    wave = st.waves[index]
    st.current_wave = index
    wave.state, wave.started_at, wave.success_since = Phase.RUNNING, d.now, None
    told = 0
    for a in sorted((a for a in d.assignments.values() if a.wave == index), key=lambda a: a.device_id):
        rec = devices.get(a.device_id)
        d.update(a, assigned_at=d.now, previous=rec.model if rec is not None else None)
        d.decision.desired.append(DesiredWrite(a.device_id, st.spec.target, st.rollout_id))
        told += 1
    d.event("wave_started", wave=index + 1, devices=told)


def _advance(d: _Draft, devices: dict[str, DeviceRecord]) -> None:
    """Start the current wave if it has not started; complete it (and start the next) when its
    success share has held for the bake time; abort a wave that ended below its threshold."""
    st, spec, now = d.status, d.status.spec, d.now
    while True:
        wave = st.waves[st.current_wave]
        if wave.state is Phase.CREATED:
            _start_wave(d, st.current_wave, devices)
        if wave.state is not Phase.RUNNING:
            return
        members = [a for a in d.assignments.values() if a.wave == wave.index]
        successes = sum(a.outcome is Outcome.SUCCESS for a in members)
        share = successes / wave.size if wave.size else 1.0
        if share + 1e-12 < spec.success_threshold:
            if wave.success_since is not None:
                wave.success_since = None
                d.decision.changed = True
            if not any(a.outcome is Outcome.PENDING for a in members):
                _abort(d, f"wave {wave.index + 1} ended with {successes} of {wave.size} devices updated "
                          f"({share:.0%}), below the success threshold of {spec.success_threshold:.0%}")
            return
        if wave.success_since is None:
            wave.success_since = now
            d.decision.changed = True
        if wave.size and now - wave.success_since < spec.bake_s:
            return
        wave.state, wave.ended_at = Phase.COMPLETED, now
        d.event("wave_completed", wave=wave.index + 1, successes=successes, size=wave.size)
        if wave.index + 1 == len(st.waves):
            st.state = Phase.COMPLETED
            d.event("completed", target=str(spec.target))
            return
        st.current_wave = wave.index + 1


def decide(status: RolloutStatus, assignments: dict[str, Assignment], devices: dict[str, DeviceRecord],
           now: float) -> Decision:
    """What to do now: a pure function of the rollout, its assignments and the recorded devices."""
    d = _Draft(status, assignments, now)
    if status.state not in (Phase.RUNNING, Phase.PAUSED):
        return d.finish()
    spec = status.spec
    for a in sorted(assignments.values(), key=lambda a: a.device_id):
        if a.assigned_at is None:
            continue
        outcome, reason = device_outcome(a, devices.get(a.device_id), spec, now, status.rollout_id)
        if (outcome, reason) != (a.outcome, a.reason):
            d.update(a, outcome=outcome, reason=reason, outcome_at=now if outcome is not a.outcome else a.outcome_at)
            if outcome is Outcome.FAILURE:
                d.event("device_failed", device=a.device_id, wave=a.wave + 1, reason=reason)
    told = [a for a in d.assignments.values() if a.assigned_at is not None]
    failed = [a for a in told if a.outcome is Outcome.FAILURE]
    if failed and _failure_crossed(spec, len(told), len(failed)):
        _abort(d, f"wave {d.status.current_wave + 1}: {_failure_summary(spec, len(told), failed)}")
        return d.finish()
    if d.status.state is Phase.RUNNING:
        _advance(d, devices)
    return d.finish()


COMMANDS = ("start", "pause", "resume", "abort")
_ALLOWED = {"start": (Phase.CREATED,), "pause": (Phase.RUNNING,), "resume": (Phase.PAUSED,),
            "abort": (Phase.CREATED, Phase.RUNNING, Phase.PAUSED)}
_PAST = {"start": "started", "pause": "paused", "resume": "resumed", "abort": "aborted"}


def apply_command(status: RolloutStatus, assignments: dict[str, Assignment], command: str, now: float,
                  reason: str | None = None) -> Decision:
    """An operator's start / pause / resume / abort (UserInputError when the state does not allow it)."""
    if command not in _ALLOWED:
        raise UserInputError(f"unknown rollout command {command!r}: use {', '.join(COMMANDS)}")
    if status.state not in _ALLOWED[command]:
        allowed = " or ".join(_ALLOWED[command])
        raise UserInputError(f"rollout {status.rollout_id} is {status.state}; only a {allowed} rollout can be "
                             f"{_PAST[command]}")
    d = _Draft(status, assignments, now)
    st = d.status
    if command == "start":
        st.state = Phase.RUNNING
        d.event("started")
    elif command == "pause":
        st.state = Phase.PAUSED
        for w in st.waves:
            if w.state is Phase.RUNNING:
                w.state = Phase.PAUSED
        d.event("paused", wave=st.current_wave + 1)
    elif command == "resume":
        st.state = Phase.RUNNING
        for w in st.waves:
            if w.state is Phase.PAUSED:
                w.state = Phase.RUNNING
        d.event("resumed", wave=st.current_wave + 1)
    else:
        _abort(d, f"aborted by the operator{': ' + reason if reason else ''}")
    d.decision.changed = True
    return d.finish()


def progress(status: RolloutStatus, assignments: dict[str, Assignment]) -> list[dict[str, Any]]:
    """Per wave: size, told, successes, failures, pending (for status displays)."""
    rows = []
    for w in status.waves:
        members = [a for a in assignments.values() if a.wave == w.index]
        told = [a for a in members if a.assigned_at is not None]
        rows.append({"wave": w.index + 1, "state": str(w.state), "size": w.size, "told": len(told),
                     "success": sum(a.outcome is Outcome.SUCCESS for a in told),
                     "failure": sum(a.outcome is Outcome.FAILURE for a in told),
                     "pending": sum(a.outcome is Outcome.PENDING for a in told),
                     "started_at": w.started_at, "success_since": w.success_since, "ended_at": w.ended_at})
    return rows
