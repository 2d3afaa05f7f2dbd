"""The device's update state machine: a table of (state, event) → next state, persisted before
every step.

    IDLE → DOWNLOADING → VERIFYING → STAGED → SELF_TEST → SHADOW → PROBATION → COMMITTED → IDLE
    any failure → ROLLING_BACK → ROLLED_BACK → IDLE

Every step is a function of the update record that does its work and returns one ``Event``; the
table decides what comes next, and an unmapped (state, event) is a bug that raises. The record is
written (temp file + fsync + rename + directory fsync) *before* the next step starts, so a crash at
any line leaves the last completed step on disk, and ``recover`` decides how to continue:
re-run the interrupted step (every step is idempotent), except PROBATION, where an unexpected
restart counts as the candidate's failure and the device rolls back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from edgeopt.fsutil import atomic_write_bytes


class State(StrEnum):
    IDLE = "IDLE"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    STAGED = "STAGED"
    SELF_TEST = "SELF_TEST"
    SHADOW = "SHADOW"
    PROBATION = "PROBATION"
    COMMITTED = "COMMITTED"
    ROLLING_BACK = "ROLLING_BACK"
    ROLLED_BACK = "ROLLED_BACK"


class Event(StrEnum):
    UPDATE = "update"      # a new desired version was accepted (only from IDLE)
    OK = "ok"              # the step succeeded
    RETRY = "retry"        # a transient failure (broker gone, repository busy): run the step again
    FAILED = "failed"      # the candidate or the repository failed a check: roll back


_FORWARD = [State.DOWNLOADING, State.VERIFYING, State.STAGED, State.SELF_TEST, State.SHADOW, State.PROBATION,
            State.COMMITTED]
TRANSITIONS: dict[tuple[State, Event], State] = {(State.IDLE, Event.UPDATE): State.DOWNLOADING}
for here, nxt in zip(_FORWARD, _FORWARD[1:], strict=False):
    TRANSITIONS[(here, Event.OK)] = nxt
for here in _FORWARD[:-1]:
    TRANSITIONS[(here, Event.FAILED)] = State.ROLLING_BACK
# Only the network-bound steps retry; a check that fails is final for this version.
TRANSITIONS[(State.DOWNLOADING, Event.RETRY)] = State.DOWNLOADING
TRANSITIONS[(State.VERIFYING, Event.RETRY)] = State.VERIFYING
TRANSITIONS[(State.COMMITTED, Event.OK)] = State.IDLE
# Rolling back cannot fail by design: it only re-activates a slot that passed its checks before,
# so there is no (ROLLING_BACK, FAILED) edge; a crash in it re-runs it (it is idempotent).
TRANSITIONS[(State.ROLLING_BACK, Event.OK)] = State.ROLLED_BACK
TRANSITIONS[(State.ROLLED_BACK, Event.OK)] = State.IDLE
# (COMMITTED, FAILED) is left out on purpose: once committed the old slot may be reused, and a
# misbehaving committed model is the next rollout's business (the fleet sets desired back).


class InvalidTransition(RuntimeError):
    """An unmapped (state, event): a bug in a step function, never a user or network error."""


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(f"no transition from {state} on {event}") from None


@dataclass
class UpdateRecord:
    """Everything the device must remember about the update in progress (persisted as JSON)."""

    state: State = State.IDLE
    target: dict[str, Any] | None = None      # {name, version, path, length, sha256, rollout}
    previous: dict[str, Any] | None = None    # the model that was active when the update began
    reason: str | None = None                 # why the last failure happened (for the state topic)
    attempts: int = 0                         # RETRY count in the current state
    entered_at: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> UpdateRecord:
        return cls(State(obj["state"]), obj.get("target"), obj.get("previous"), obj.get("reason"),
                   int(obj.get("attempts", 0)), float(obj.get("entered_at", 0.0)), list(obj.get("history", [])))


class RecordStore:
    """The update record on disk, written atomically and durably."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> UpdateRecord:
        if not self.path.is_file():
            return UpdateRecord()
        try:
            return UpdateRecord.from_json(json.loads(self.path.read_text()))
        except (ValueError, KeyError, TypeError):
            # A record that cannot be read is treated like a crash in the middle of an update whose
            # state is unknown: roll back to the slot that last passed its checks.
            return UpdateRecord(State.ROLLING_BACK, reason="update record unreadable")

    def save(self, record: UpdateRecord) -> None:
        atomic_write_bytes(self.path, json.dumps(record.to_json(), indent=1).encode())


Step = Callable[[UpdateRecord], Event]
HISTORY_KEEP = 50


class UpdateMachine:
    """Drives an update from the persisted record until IDLE, one persisted step at a time."""

    def __init__(self, store: RecordStore, steps: dict[State, Step],
                 on_transition: Callable[[UpdateRecord], None] = lambda r: None, max_retries: int = 20,
                 clock: Callable[[], float] = time.time):
        missing = [s for s in State if s is not State.IDLE and s not in steps]
        if missing:
            raise ValueError(f"no step for state(s) {', '.join(missing)}")
        self.store, self.steps, self.on_transition = store, steps, on_transition
        self.max_retries, self.clock = max_retries, clock

    def recover(self) -> UpdateRecord:
        """Called once at start-up: decide how an interrupted update continues."""
        record = self.store.load()
        if record.state is State.PROBATION:
            self._move(record, State.ROLLING_BACK, reason="agent restarted during probation")
        return record

    def begin(self, target: dict[str, Any], previous: dict[str, Any] | None) -> UpdateRecord:
        record = self.store.load()
        if record.state is not State.IDLE:
            raise InvalidTransition(f"an update is already in progress ({record.state})")
        record.target, record.previous, record.reason = target, previous, None
        self._move(record, next_state(record.state, Event.UPDATE))
        return record

    def step(self) -> UpdateRecord:
        """Run the current state's step once and persist where it leads."""
        record = self.store.load()
        if record.state is State.IDLE:
            return record
        event = self.steps[record.state](record)
        if event is Event.RETRY:
            record.attempts += 1
            if record.attempts > self.max_retries:
                event = Event.FAILED
                record.reason = record.reason or f"gave up after {self.max_retries} retries in {record.state}"
        self._move(record, next_state(record.state, event), reason=record.reason)
        return record

    def run(self, stop: Callable[[], bool] = lambda: False) -> UpdateRecord:
        record = self.store.load()
        while record.state is not State.IDLE and not stop():
            record = self.step()
        return record

    def _move(self, record: UpdateRecord, new: State, reason: str | None = None) -> None:
        if new is not record.state:
            record.attempts = 0
        entry = {"from": str(record.state), "to": str(new), "at": self.clock()}
        if reason and new in (State.ROLLING_BACK,):
            entry["reason"] = reason
        record.history = (record.history + [entry])[-HISTORY_KEEP:]
        record.state, record.entered_at = new, self.clock()
        if reason is not None:
            record.reason = reason
        if new is State.IDLE:
            record.attempts = 0
        self.store.save(record)  # persisted before the next step acts
        self.on_transition(record)
