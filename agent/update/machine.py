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

A version that ends ROLLED_BACK is remembered in the record (``refusals``, per NAME@VERSION: the
rollout that asked for it, the fault class, attempts, when to try again), written in the same
atomic save as the ROLLED_BACK state. ``wanted`` — a pure function of desired, the running model,
that memory and the time — decides which version to start now:

    refused for transport   (the bytes did not arrive intact or were not available: repository
                            unreachable, download errors, hash / length mismatch, a damaged
                            archive, not in the signed targets, metadata signature / expiry /
                            rollback): tried again after a capped exponential backoff while the
                            same desired stands, at once when a new rollout asks for it;
    refused for behaviour   (self-test, shadow, probation, or a manifest contradicting its signed
                            name and version; a shadow run that got too few live windows in time
                            proved nothing and counts as transport): not again within that rollout — a new rollout id
                            asking for it is the operator saying something was fixed.

The other decisions are pure functions beside the table too, and tested exhaustively: the probation
verdict (``probation_verdict``, from what a watch saw of the candidate and of the previous model) and
the shadow run's (``windows_agreeing`` per batch of live windows, ``shadow_verdict`` over the run).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.fsutil import atomic_write_bytes, strict_json


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


# -- refused versions: when to try them again ---------------------------------------------------------
class Fault(StrEnum):
    """Whose fault a refusal was, which decides when the version is tried again."""

    TRANSPORT = "transport"   # delivery, integrity or availability: the same bytes may arrive right later
    BEHAVIOUR = "behaviour"   # the artifact itself: it would fail the same way again


BEHAVIOUR_STATES = (State.SELF_TEST, State.SHADOW, State.PROBATION)
# The STAGED reason word for an archive whose manifest names another model or version than its
# signed target: the artifact was built wrong (the repository's bytes are what was signed).
MANIFEST_MISMATCH = "manifest_mismatch"
# The SHADOW reason word for a comparison that got too few live windows in time: it proved nothing
# about the candidate (a quiet sensor, a slow board), so it is tried again like a transport fault.
INCONCLUSIVE = "inconclusive"
REFUSALS_KEEP = 32
REASON_LIMIT = 200


def fault_of(failed_in: State | None, reason: str | None) -> Fault:
    """The fault class of a refusal, from the state whose step failed and its reason text."""
    if failed_in is State.SHADOW and (reason or "").startswith(f"shadow: {INCONCLUSIVE}"):
        return Fault.TRANSPORT
    if failed_in in BEHAVIOUR_STATES:
        return Fault.BEHAVIOUR
    if failed_in is State.STAGED and (reason or "").startswith(f"staged: {MANIFEST_MISMATCH}"):
        return Fault.BEHAVIOUR
    return Fault.TRANSPORT


@dataclass(frozen=True)
class Backoff:
    """Pauses before a version refused for a transport reason is tried again: first_s, doubling
    with each refusal within the same rollout, at most max_s."""

    first_s: float = 60.0
    max_s: float = 3600.0

    def delay(self, attempts: int) -> float:
        return min(self.max_s, self.first_s * 2.0 ** min(max(0, attempts - 1), 62))


@dataclass
class UpdateTarget:
    """The version an update installs, and what its steps learned about it (kept in update.json)."""

    name: str
    version: str
    rollout: str | None = None
    path: str | None = None                   # DOWNLOADING: the downloaded archive,
    sha256: str | None = None                 # its signed hash and length,
    length: int | None = None
    format: str | None = None                 # and the model format the repository lists
    slot: str | None = None                   # STAGED: the slot it was written to
    self_test: dict[str, Any] | None = None   # what SELF_TEST, SHADOW and PROBATION saw
    shadow: dict[str, Any] | None = None
    probation: dict[str, Any] | None = None

    @classmethod
    def of(cls, value: Mapping[str, Any] | UpdateTarget) -> UpdateTarget:
        """A target from a desired message's {name, version, rollout} (or an update.json entry)."""
        if isinstance(value, UpdateTarget):
            return value
        known = {f.name for f in fields(cls)} - {"name", "version"}
        return cls(str(value.get("name", "")), str(value.get("version", "")),
                   **{k: v for k, v in value.items() if k in known})

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k == "rollout"}


def model_key(target: Mapping[str, Any] | UpdateTarget) -> str:
    return UpdateTarget.of(target).key


def note_refusal(refusals: dict[str, dict[str, Any]], target: Mapping[str, Any] | UpdateTarget, fault: Fault,
                 now: float, backoff: Backoff) -> dict[str, dict[str, Any]]:
    """``refusals`` with the refusal of ``target`` (its name, version, rollout) recorded; the oldest
    entries beyond REFUSALS_KEEP are dropped."""
    key, rollout = model_key(target), UpdateTarget.of(target).rollout
    before = refusals.get(key)
    attempts = int(before.get("attempts", 0)) + 1 if before and before.get("rollout") == rollout else 1
    entry = {"rollout": rollout, "fault": str(fault), "attempts": attempts, "refused_at": now,
             "next_try_at": now + backoff.delay(attempts) if fault is Fault.TRANSPORT else None}
    kept = [(k, v) for k, v in refusals.items() if k != key][-(REFUSALS_KEEP - 1):]
    return {**dict(kept), key: entry}


def forget_refusal(refusals: dict[str, dict[str, Any]], target: UpdateTarget) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in refusals.items() if k != model_key(target)}


@dataclass(frozen=True)
class Wanted:
    """What to do about ``desired`` now: start ``target`` (None: nothing to start); ``retry_at``: a
    refused version waits for its backoff until then (time.time() seconds)."""

    target: UpdateTarget | None
    retry_at: float | None = None


def wanted(desired: dict[str, Any] | None, current: dict[str, Any] | None, refusals: dict[str, dict[str, Any]],
           now: float) -> Wanted:
    """Which version to start now. Nothing when nothing is desired or the desired version already
    runs; a version never refused, or refused under another rollout id, at once; one refused for
    its behaviour under this rollout id, never; one refused for transport under this rollout id,
    once its backoff has passed (or the clock went back past the refusal)."""
    if desired is None:
        return Wanted(None)
    if current and (current.get("name"), current.get("version")) == (desired["name"], desired["version"]):
        return Wanted(None)
    memo = refusals.get(model_key(desired))
    if memo is None or memo.get("rollout") != desired.get("rollout"):
        return Wanted(UpdateTarget.of(desired))
    if memo.get("fault") != Fault.TRANSPORT:
        return Wanted(None)
    retry_at, refused_at = float(memo.get("next_try_at") or 0.0), float(memo.get("refused_at") or 0.0)
    if now >= retry_at or now < refused_at:
        return Wanted(UpdateTarget.of(desired))
    return Wanted(None, retry_at)


@dataclass(frozen=True)
class Health:
    """What a watch saw of a model's live windows: the facts the probation verdict is decided on."""

    windows: int = 0
    nan_outputs: int = 0          # windows with NaN/Inf outputs
    error_rate: float = 0.0       # failed or NaN windows / windows
    p95_ms: float | None = None   # per inference call
    latencies: int = 0            # calls measured
    mean_confidence: float | None = None  # top-1, for a classifier
    confidences: int = 0          # windows it is the mean of


MIN_WINDOWS_FOR_ERROR_RATE, MIN_CALLS_FOR_LATENCY, MIN_WINDOWS_FOR_CONFIDENCE = 20, 10, 20


def probation_verdict(candidate: Health, baseline: Health, limits: Any) -> str | None:
    """Why the candidate fails its probation so far (None: it does not), in this order: NaN outputs,
    the error rate, latency p95 (the budget, then ``probation_latency_factor`` x the previous model's
    plus 1 ms), mean top-1 confidence (``probation_min_confidence_ratio`` x the previous model's).
    A rate is judged once it rests on enough windows or calls. ``limits``: the ``[update]`` section."""
    c, b = candidate, baseline
    if c.nan_outputs > limits.probation_max_nan:
        return f"{c.nan_outputs} window(s) with NaN/Inf outputs (allowed {limits.probation_max_nan})"
    if c.windows >= MIN_WINDOWS_FOR_ERROR_RATE and c.error_rate > limits.probation_max_error_rate:
        return f"error rate {c.error_rate:.1%} above {limits.probation_max_error_rate:.1%}"
    budget = limits.latency_budget_ms or None
    if c.p95_ms is not None and c.latencies >= MIN_CALLS_FOR_LATENCY:
        if budget is not None and c.p95_ms > budget:
            return f"latency p95 {c.p95_ms:.3f} ms above the budget {budget:g} ms"
        if b.p95_ms is not None and c.p95_ms > limits.probation_latency_factor * b.p95_ms + 1.0:
            return (f"latency p95 {c.p95_ms:.3f} ms above {limits.probation_latency_factor:g}x the previous "
                    f"model's {b.p95_ms:.3f} ms")
    if c.mean_confidence is not None and b.mean_confidence is not None and \
            c.confidences >= MIN_WINDOWS_FOR_CONFIDENCE and \
            c.mean_confidence < limits.probation_min_confidence_ratio * b.mean_confidence:
        return (f"mean top-1 confidence {c.mean_confidence:.3f} below {limits.probation_min_confidence_ratio:g}x "
                f"the previous model's {b.mean_confidence:.3f}")
    return None


def top1_confidence(outputs: dict[str, np.ndarray]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(top-1 index, top-1 probability) per window for a single classifier output, else (None, None).
    Scores that are not already probabilities go through a softmax."""
    if len(outputs) != 1:
        return None, None
    y = np.asarray(next(iter(outputs.values())), dtype=np.float64)
    if y.ndim != 2 or y.shape[1] < 2:
        return None, None
    if not ((y >= 0).all() and np.allclose(y.sum(1), 1.0, atol=1e-3)):
        z = np.exp(y - y.max(1, keepdims=True))
        y = z / z.sum(1, keepdims=True)
    return y.argmax(1), y.max(1)


def windows_agreeing(current: dict[str, np.ndarray], candidate: dict[str, np.ndarray] | None) -> int:
    """Of one batch of live windows, how many the candidate answers as the current model does: the same
    top-1 class for a classifier; otherwise the whole batch when every output is within 1e-3 of the
    current one's scale, else none. A candidate that failed the batch (None) agrees on none."""
    if candidate is None:
        return 0
    a, _ = top1_confidence(current)
    b, _ = top1_confidence(candidate)
    if a is not None and b is not None:
        return int((a == b).sum())
    n = len(next(iter(current.values())))
    ok = all(np.allclose(candidate[k], current[k], atol=1e-3 * max(1.0, float(np.abs(current[k]).max())))
             for k in current)
    return n if ok else 0


def shadow_verdict(compared: int, agreed: int, wanted: int, limits: Any, timed_out: bool = False) -> str | None:
    """Why the candidate fails its shadow run (None: it passes, or needs more windows — ``compared <
    wanted`` and not ``timed_out``). ``limits``: the ``[update]`` section (shadow_min_agreement,
    shadow_timeout_s)."""
    if compared < wanted:
        if timed_out:
            return f"{INCONCLUSIVE}: only {compared} of {wanted} live windows within {limits.shadow_timeout_s:g} s"
        return None
    agreement = agreed / compared if compared else 0.0
    if agreement < limits.shadow_min_agreement:
        return (f"top-1 agreement {agreement:.1%} with the current model is below "
                f"{limits.shadow_min_agreement:.0%} over {compared} live windows")
    return None


def refusal_note(memo: dict[str, Any]) -> str:
    """What the state's reason adds about a refusal: when the version will be tried again."""
    if memo["fault"] == Fault.TRANSPORT:
        wait = memo["next_try_at"] - memo["refused_at"]
        return f" [refusal {memo['attempts']}; tried again in {wait:.0f} s, or at once by a new rollout]"
    return " [refused for its behaviour; tried again only by a new rollout]"


def reason_text(text: str | None, limit: int = REASON_LIMIT, tail: str = "") -> str | None:
    """``text`` as one line of at most ``limit`` characters ending in ``tail`` (control characters
    become spaces; a long text is cut, never the tail)."""
    if text is None:
        return None
    line = "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in text)
    room = max(0, limit - len(tail))
    if len(line) > room:
        line = line[:max(0, room - 3)] + "..."
    return (line + tail)[:limit]


@dataclass
class UpdateRecord:
    """Everything the device must remember about the update in progress (persisted as JSON)."""

    state: State = State.IDLE
    target: UpdateTarget | None = None        # the version being installed
    previous: dict[str, Any] | None = None    # the model that was active when the update began
    reason: str | None = None                 # why the last failure happened (for the state topic)
    attempts: int = 0                         # RETRY count in the current state
    entered_at: float = 0.0
    outcome: str | None = None                # COMMITTED or ROLLED_BACK once the update ended
    history: list[dict[str, Any]] = field(default_factory=list)
    failed_in: str | None = None              # the state whose step failed (set on entering ROLLING_BACK)
    refusals: dict[str, dict[str, Any]] = field(default_factory=dict)  # NAME@VERSION → see note_refusal

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "target": self.target.to_json() if self.target else None}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> UpdateRecord:
        target = UpdateTarget.of(obj["target"]) if obj.get("target") else None
        record = cls(State(obj["state"]), target, obj.get("previous"), obj.get("reason"),
                     int(obj.get("attempts", 0)), float(obj.get("entered_at", 0.0)), obj.get("outcome"),
                     list(obj.get("history", [])), obj.get("failed_in"), dict(obj.get("refusals") or {}))
        if "refusals" not in obj:
            record.refusals = _refusals_of_older_record(record)
        return record


def _refusals_of_older_record(record: UpdateRecord) -> dict[str, dict[str, Any]]:
    """A record written before refusals were kept remembers only its last target: a rollback of it
    becomes one refusal (due at once when it was a transport fault, as the old agent never retried)."""
    if record.outcome != str(State.ROLLED_BACK) or not (record.target and record.target.name):
        return {}
    failed = [h.get("from") for h in record.history if h.get("to") == str(State.ROLLING_BACK)]
    failed_in = State(failed[-1]) if failed and failed[-1] in State.__members__ else None
    fault = fault_of(failed_in, record.reason)
    return note_refusal({}, record.target, fault, record.entered_at, Backoff(0.0, 0.0))


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
        atomic_write_bytes(self.path, strict_json(record.to_json(), indent=1).encode())


Step = Callable[[UpdateRecord], Event]
HISTORY_KEEP = 50


class UpdateMachine:
    """Drives an update from the persisted record until IDLE, one persisted step at a time."""

    def __init__(self, store: RecordStore, steps: dict[State, Step],
                 on_transition: Callable[[UpdateRecord], None] = lambda r: None, max_retries: int = 20,
                 clock: Callable[[], float] = time.time, backoff: Backoff = Backoff()):
        missing = [s for s in State if s is not State.IDLE and s not in steps]
        if missing:
            raise ValueError(f"no step for state(s) {', '.join(missing)}")
        self.store, self.steps, self.on_transition = store, steps, on_transition
        self.max_retries, self.clock, self.backoff = max_retries, clock, backoff

    def recover(self) -> UpdateRecord:
        """Called once at start-up: decide how an interrupted update continues."""
        record = self.store.load()
        if record.state is State.PROBATION:
            self._move(record, State.ROLLING_BACK, reason="agent restarted during probation")
        return record

    def begin(self, target: Mapping[str, Any] | UpdateTarget, previous: dict[str, Any] | None) -> UpdateRecord:
        record = self.store.load()
        if record.state is not State.IDLE:
            raise InvalidTransition(f"an update is already in progress ({record.state})")
        record.target, record.previous, record.reason, record.outcome = UpdateTarget.of(target), previous, None, None
        record.failed_in = None
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
        now = self.clock()
        if new is not record.state:
            record.attempts = 0
        entry = {"from": str(record.state), "to": str(new), "at": now}
        if reason and new in (State.ROLLING_BACK,):
            entry["reason"] = reason
        if new is State.ROLLING_BACK and record.state is not State.ROLLING_BACK:
            record.failed_in = str(record.state)
        record.history = (record.history + [entry])[-HISTORY_KEEP:]
        record.state, record.entered_at = new, now
        if new in (State.COMMITTED, State.ROLLED_BACK):
            record.outcome = str(new)
        if reason is not None:
            record.reason = reason
        if new is State.ROLLED_BACK:
            self._remember_refusal(record, now)
        elif new is State.COMMITTED and record.target:
            record.refusals = forget_refusal(record.refusals, record.target)
        if new is State.IDLE:
            record.attempts = 0
        self.store.save(record)  # persisted before the next step acts
        self.on_transition(record)

    def _remember_refusal(self, record: UpdateRecord, now: float) -> None:
        """Entering ROLLED_BACK: remember the refused version (same save as the state) and say in the
        reason when it will be tried again."""
        if not (record.target and record.target.name):
            return
        failed_in = State(record.failed_in) if record.failed_in in State.__members__ else None
        fault = fault_of(failed_in, record.reason)
        record.refusals = note_refusal(record.refusals, record.target, fault, now, self.backoff)
        note = refusal_note(record.refusals[model_key(record.target)])
        record.reason = reason_text(record.reason or "refused", tail=note)
