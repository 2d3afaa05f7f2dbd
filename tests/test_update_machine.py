"""The update state machine as a table: every state has its success and failure edges, unmapped
pairs raise, the record is persisted before each step, and recovery after a crash is decided per state."""

from __future__ import annotations

import json

import pytest

from edgeopt.agent.update.machine import (
    TRANSITIONS,
    Event,
    InvalidTransition,
    RecordStore,
    State,
    UpdateMachine,
    next_state,
)

FORWARD = [State.DOWNLOADING, State.VERIFYING, State.STAGED, State.SELF_TEST, State.SHADOW, State.PROBATION]


def test_every_state_before_commit_has_a_failure_edge_to_rolling_back():
    for s in FORWARD:
        assert next_state(s, Event.FAILED) is State.ROLLING_BACK


def test_happy_path_order():
    s, seen = State.IDLE, []
    s = next_state(s, Event.UPDATE)
    while s is not State.IDLE:
        seen.append(s)
        s = next_state(s, Event.OK)
    assert seen == FORWARD + [State.COMMITTED]


def test_unmapped_pairs_raise():
    mapped = set(TRANSITIONS)
    unmapped = [(s, e) for s in State for e in Event if (s, e) not in mapped]
    assert (State.COMMITTED, Event.FAILED) in unmapped and (State.ROLLING_BACK, Event.FAILED) in unmapped
    for s, e in unmapped:
        with pytest.raises(InvalidTransition):
            next_state(s, e)
    assert all(next_state(s, Event.RETRY) is s for s, e in mapped if e is Event.RETRY)


class Recorder:
    """Steps that return scripted events and record what was on disk when each one ran."""

    def __init__(self, store, script):
        self.store, self.script, self.calls = store, dict(script), []

    def __call__(self, state):
        def step(record):
            on_disk = json.loads(self.store.path.read_text())["state"]
            self.calls.append((state, on_disk))
            return self.script.get(state, [Event.OK]).pop(0) if self.script.get(state) else Event.OK
        return step


def _machine(tmp_path, script=None, **kw):
    store = RecordStore(tmp_path / "update.json")
    rec = Recorder(store, script or {})
    transitions = []
    m = UpdateMachine(store, {s: rec(s) for s in State if s is not State.IDLE},
                      on_transition=lambda r: transitions.append(r.state), **kw)
    return m, rec, transitions, store


def test_state_is_persisted_before_each_step(tmp_path):
    m, rec, transitions, store = _machine(tmp_path)
    m.begin({"name": "kws", "version": "2"}, {"name": "kws", "version": "1"})
    final = m.run()
    assert final.state is State.IDLE
    assert [c[0] for c in rec.calls] == FORWARD + [State.COMMITTED]
    assert all(state == on_disk for state, on_disk in rec.calls)  # the step saw its own state on disk
    assert transitions == FORWARD + [State.COMMITTED, State.IDLE]
    history = json.loads(store.path.read_text())["history"]
    assert [h["to"] for h in history][-1] == "IDLE"


@pytest.mark.parametrize("failing", FORWARD)
def test_failure_in_any_state_rolls_back(tmp_path, failing):
    m, rec, transitions, _ = _machine(tmp_path, {failing: [Event.FAILED]})
    m.begin({"name": "kws", "version": "2"}, None)
    m.run()
    assert transitions[-3:] == [State.ROLLING_BACK, State.ROLLED_BACK, State.IDLE]
    assert State.COMMITTED not in transitions


def test_retries_are_bounded(tmp_path):
    m, rec, transitions, store = _machine(tmp_path, {State.DOWNLOADING: [Event.RETRY] * 10}, max_retries=3)
    m.begin({"name": "kws", "version": "2"}, None)
    m.run()
    assert [c[0] for c in rec.calls].count(State.DOWNLOADING) == 4
    assert State.ROLLING_BACK in transitions
    assert "gave up after 3 retries" in json.loads(store.path.read_text())["reason"]


def test_begin_refuses_while_busy(tmp_path):
    m, *_ = _machine(tmp_path)
    m.begin({"name": "kws", "version": "2"}, None)
    with pytest.raises(InvalidTransition, match="already in progress"):
        m.begin({"name": "kws", "version": "3"}, None)


@pytest.mark.parametrize("crashed_in", FORWARD + [State.COMMITTED, State.ROLLING_BACK, State.ROLLED_BACK])
def test_recovery_after_a_crash(tmp_path, crashed_in):
    m, rec, transitions, store = _machine(tmp_path)
    m.begin({"name": "kws", "version": "2"}, None)
    record = store.load()
    record.state = crashed_in
    store.save(record)
    m2, rec2, transitions2, _ = _machine(tmp_path)
    m2.recover()
    m2.run()
    if crashed_in is State.PROBATION:
        assert rec2.calls[0][0] is State.ROLLING_BACK  # a restart during probation counts as failure
        assert "restarted during probation" in store.load().reason
    else:
        assert rec2.calls[0][0] is crashed_in  # the interrupted step runs again
    assert store.load().state is State.IDLE


def test_unreadable_record_rolls_back(tmp_path):
    store = RecordStore(tmp_path / "update.json")
    store.path.write_text("{not json")
    assert store.load().state is State.ROLLING_BACK
