"""When a refused version is tried again: the fault class of every refusal, the backoff, the
decision ``wanted`` (a pure function of desired, the running model, the refusal memory and the
time), and the memory kept in the update record by the machine — no broker, no agent."""

from __future__ import annotations

import json

import pytest

from edgeopt.agent.update.machine import (
    BEHAVIOUR_STATES,
    INCONCLUSIVE,
    MANIFEST_MISMATCH,
    REFUSALS_KEEP,
    TRANSITIONS,
    Backoff,
    Event,
    Fault,
    RecordStore,
    State,
    UpdateMachine,
    UpdateRecord,
    UpdateTarget,
    fault_of,
    note_refusal,
    reason_text,
    wanted,
)

V2 = {"name": "imu", "version": "2", "rollout": "r1"}
RUNNING_V1 = {"name": "imu", "version": "1", "slot": "a", "runtime": "onnxruntime"}
BACKOFF = Backoff(60.0, 3600.0)

# Every reason word DeviceTrust (sdk/repo_client.py) gives a refusal, and the other texts the
# DOWNLOADING / VERIFYING / STAGED steps write: all are about getting intact, signed bytes.
TRANSPORT_REASONS = [
    (State.DOWNLOADING, "repository unreachable: no reply within 2 s"),
    (State.DOWNLOADING, "download_failed: chunk 3"),
    (State.DOWNLOADING, "hash_mismatch: imu-2.tar: hashes do not match"),
    (State.DOWNLOADING, "oversized: imu-2.tar: longer than its signed length"),
    (State.DOWNLOADING, "not_allowed: imu@2 is not in the signed targets"),
    (State.DOWNLOADING, "bad_name: invalid model name"),
    (State.DOWNLOADING, "expired: timestamp.json is expired"),
    (State.DOWNLOADING, "rollback: targets version 3 < 4"),
    (State.DOWNLOADING, "bad_signature: root threshold not reached"),
    (State.DOWNLOADING, "repository_invalid: signed target describes imu@3"),
    (State.DOWNLOADING, "error: something python-tuf raised"),
    (State.DOWNLOADING, "gave up after 30 retries in DOWNLOADING"),
    (State.VERIFYING, "hash_mismatch: the downloaded file does not match its signed length and sha256"),
    (State.STAGED, "staged: imu-2.tar: not a valid or not a safe artifact archive (bad header)"),
    (State.STAGED, "staged: no space left on device while writing /var/lib/edgeopt-agent/slots/b"),
    (State.STAGED, "staged: OSError: [Errno 5] Input/output error"),
    (None, "update record unreadable"),
    # too few live windows to compare: proved nothing about the candidate
    (State.SHADOW, f"shadow: {INCONCLUSIVE}: only 12 of 200 live windows within 120 s"),
]
BEHAVIOUR_REASONS = [
    (State.STAGED, f"staged: {MANIFEST_MISMATCH}: the artifact's manifest says imu@2, not imu@3"),
    (State.SELF_TEST, "self-test: golden vectors: output 'y' is 0.8 from the expected outputs"),
    (State.SELF_TEST, "self-test: the runtime crashed loading the model (signal 6)"),
    (State.SHADOW, "shadow: top-1 agreement 12% with the current model is below 95%"),
    (State.SHADOW, "shadow: candidate does not load: ..."),
    (State.PROBATION, "probation: 3 window(s) with NaN/Inf outputs"),
    (State.PROBATION, "agent restarted during probation"),
]


@pytest.mark.parametrize("failed_in,reason", TRANSPORT_REASONS)
def test_transport_integrity_and_availability_refusals(failed_in, reason):
    assert fault_of(failed_in, reason) is Fault.TRANSPORT


@pytest.mark.parametrize("failed_in,reason", BEHAVIOUR_REASONS)
def test_behaviour_refusals(failed_in, reason):
    assert fault_of(failed_in, reason) is Fault.BEHAVIOUR


def test_every_state_that_can_fail_has_a_class():
    """The states with a FAILED edge split into the two classes; SELF_TEST, SHADOW and PROBATION
    are behaviour whatever their reason text (an unexpected error in the step included)."""
    failing = {s for (s, e) in TRANSITIONS if e is Event.FAILED}
    assert failing == {State.DOWNLOADING, State.VERIFYING, State.STAGED, *BEHAVIOUR_STATES}
    for state in failing:
        expected = Fault.BEHAVIOUR if state in BEHAVIOUR_STATES else Fault.TRANSPORT
        assert fault_of(state, f"{state.lower()}: RuntimeError: boom") is expected
        assert fault_of(state, None) is expected


def test_backoff_doubles_and_is_capped():
    assert [BACKOFF.delay(n) for n in range(1, 9)] == [60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert BACKOFF.delay(10_000) == 3600  # no overflow however often it was refused
    assert Backoff(5.0, 2.0).delay(1) == 2.0


def test_note_refusal_counts_within_a_rollout_and_restarts_with_a_new_one():
    once = note_refusal({}, V2, Fault.TRANSPORT, 1000.0, BACKOFF)
    assert once == {"imu@2": {"rollout": "r1", "fault": "transport", "attempts": 1, "refused_at": 1000.0,
                              "next_try_at": 1060.0}}
    twice = note_refusal(once, V2, Fault.TRANSPORT, 1100.0, BACKOFF)
    assert twice["imu@2"]["attempts"] == 2 and twice["imu@2"]["next_try_at"] == 1220.0
    assert once["imu@2"]["attempts"] == 1  # the input is not changed
    other = note_refusal(twice, {**V2, "rollout": "r2"}, Fault.TRANSPORT, 1300.0, BACKOFF)
    assert other["imu@2"]["attempts"] == 1 and other["imu@2"]["rollout"] == "r2"
    behaviour = note_refusal(other, {**V2, "rollout": "r2"}, Fault.BEHAVIOUR, 1400.0, BACKOFF)
    assert behaviour["imu@2"]["fault"] == "behaviour" and behaviour["imu@2"]["next_try_at"] is None


def test_refusal_memory_is_bounded_oldest_first():
    refusals: dict = {}
    for v in range(REFUSALS_KEEP + 5):
        refusals = note_refusal(refusals, {"name": "imu", "version": str(v), "rollout": None}, Fault.BEHAVIOUR,
                                float(v), BACKOFF)
    assert len(refusals) == REFUSALS_KEEP
    assert "imu@0" not in refusals and f"imu@{REFUSALS_KEEP + 4}" in refusals


def _refused(fault: Fault, rollout="r1", at=1000.0, attempts=1):
    refusals: dict = {}
    for i in range(attempts):
        refusals = note_refusal(refusals, {**V2, "rollout": rollout}, fault, at + i, BACKOFF)
    return refusals


# (desired, current, refusals, now) → (starts?, retry_at)
WANTED_CASES = {
    "nothing desired": (None, RUNNING_V1, {}, 0.0, False, None),
    "desired already runs": (V2, {**RUNNING_V1, "version": "2"}, {}, 0.0, False, None),
    "desired runs, even if refused once": (V2, {**RUNNING_V1, "version": "2"}, _refused(Fault.TRANSPORT), 0.0,
                                           False, None),
    "never refused, a model runs": (V2, RUNNING_V1, {}, 0.0, True, None),
    "never refused, no model yet": (V2, None, {}, 0.0, True, None),
    "another version was refused": ({**V2, "version": "3"}, RUNNING_V1, _refused(Fault.BEHAVIOUR), 1001.0, True,
                                    None),
    "behaviour, same rollout, right after": (V2, RUNNING_V1, _refused(Fault.BEHAVIOUR), 1001.0, False, None),
    "behaviour, same rollout, a year later": (V2, RUNNING_V1, _refused(Fault.BEHAVIOUR), 1000.0 + 3.2e7, False,
                                              None),
    "behaviour, new rollout": ({**V2, "rollout": "r2"}, RUNNING_V1, _refused(Fault.BEHAVIOUR), 1001.0, True, None),
    "behaviour, rollout id dropped": ({**V2, "rollout": None}, RUNNING_V1, _refused(Fault.BEHAVIOUR), 1001.0, True,
                                      None),
    "behaviour, no rollout id both times": ({**V2, "rollout": None}, RUNNING_V1,
                                            _refused(Fault.BEHAVIOUR, rollout=None), 1001.0, False, None),
    "transport, same rollout, during backoff": (V2, RUNNING_V1, _refused(Fault.TRANSPORT), 1059.0, False, 1060.0),
    "transport, same rollout, backoff over": (V2, RUNNING_V1, _refused(Fault.TRANSPORT), 1060.0, True, None),
    "transport, third refusal waits 240 s": (V2, RUNNING_V1, _refused(Fault.TRANSPORT, attempts=3), 1200.0, False,
                                             1002.0 + 240),
    "transport, new rollout, at once": ({**V2, "rollout": "r2"}, RUNNING_V1, _refused(Fault.TRANSPORT), 1001.0,
                                        True, None),
    "transport, the clock went back": (V2, RUNNING_V1, _refused(Fault.TRANSPORT), 5.0, True, None),
}


@pytest.mark.parametrize("case", WANTED_CASES)
def test_wanted(case):
    desired, current, refusals, now, starts, retry_at = WANTED_CASES[case]
    decision = wanted(desired, current, refusals, now)
    assert (decision.target is not None, decision.retry_at) == (starts, retry_at)
    if starts:
        assert decision.target == UpdateTarget(desired["name"], desired["version"], desired.get("rollout"))


def test_reason_text_is_one_short_line_and_keeps_its_tail():
    assert reason_text(None) is None
    assert reason_text("a\nb\x00c\x7f") == "a b c "
    long = reason_text("x" * 500, tail=" [note]")
    assert len(long) == 200 and long.endswith("... [note]")
    assert reason_text("short", tail=" [note]") == "short [note]"


# -- the machine keeps the memory ---------------------------------------------------------------------
class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _machine(tmp_path, fail_in: State | None, reason: str = "it failed", clock=None):
    store = RecordStore(tmp_path / "update.json")
    seen_on_disk: dict[State, dict] = {}

    def step_for(state):
        def step(record):
            seen_on_disk[state] = json.loads(store.path.read_text())
            if state is fail_in:
                record.reason = reason
                return Event.FAILED
            return Event.OK
        return step

    m = UpdateMachine(store, {s: step_for(s) for s in State if s is not State.IDLE}, clock=clock or Clock(),
                      backoff=BACKOFF)
    return m, store, seen_on_disk


@pytest.mark.parametrize("fail_in,reason,fault", [
    (State.DOWNLOADING, "hash_mismatch: imu-2.tar", "transport"),
    (State.VERIFYING, "hash_mismatch: the downloaded file", "transport"),
    (State.STAGED, "staged: bad archive", "transport"),
    (State.STAGED, f"staged: {MANIFEST_MISMATCH}: says imu@1", "behaviour"),
    (State.SELF_TEST, "self-test: golden vectors", "behaviour"),
    (State.SHADOW, "shadow: top-1 agreement", "behaviour"),
    (State.PROBATION, "probation: error rate", "behaviour"),
])
def test_a_rollback_is_remembered_in_the_same_save_as_rolled_back(tmp_path, fail_in, reason, fault):
    m, store, seen = _machine(tmp_path, fail_in, reason)
    m.begin(dict(V2), dict(RUNNING_V1))
    record = m.run()
    assert record.state is State.IDLE and record.outcome == "ROLLED_BACK" and record.failed_in == str(fail_in)
    on_disk = seen[State.ROLLED_BACK]  # what a crash right after entering ROLLED_BACK leaves
    memo = on_disk["refusals"]["imu@2"]
    assert (memo["fault"], memo["rollout"], memo["attempts"]) == (fault, "r1", 1)
    assert on_disk["reason"].startswith(reason)
    if fault == "transport":
        assert memo["next_try_at"] == 1060.0 and "tried again in 60 s, or at once by a new rollout" in on_disk["reason"]
    else:
        assert memo["next_try_at"] is None and "tried again only by a new rollout" in on_disk["reason"]
    assert RecordStore(store.path).load().refusals == record.refusals  # it survives a restart


def test_a_restart_in_probation_is_the_candidate_s_fault(tmp_path):
    m, store, _ = _machine(tmp_path, None)
    m.begin(dict(V2), dict(RUNNING_V1))
    record = store.load()
    record.state = State.PROBATION
    store.save(record)
    m.recover()
    assert m.run().refusals["imu@2"]["fault"] == "behaviour"


def test_commit_forgets_an_earlier_refusal(tmp_path):
    m, store, _ = _machine(tmp_path, State.DOWNLOADING)
    m.begin(dict(V2), dict(RUNNING_V1))
    assert "imu@2" in m.run().refusals
    m2, *_ = _machine(tmp_path, None)
    m2.begin({**V2, "rollout": "r2"}, dict(RUNNING_V1))
    assert m2.run().refusals == {}


def _updater_loop(tmp_path, fail_in, desired_by_time, clock, until: float, step_s: float = 1.0):
    """What the updater's loop does: every ``step_s`` it asks ``wanted`` and runs what it says."""
    m, store, _ = _machine(tmp_path, fail_in, "hash_mismatch: corrupted" if fail_in is State.DOWNLOADING else
                           "self-test: golden vectors", clock=clock)
    starts = []
    while clock.t < until:
        desired = desired_by_time(clock.t)
        decision = wanted(desired, dict(RUNNING_V1), store.load().refusals, clock.t)
        if decision.target is not None:
            starts.append((clock.t, decision.target.rollout))
            m.begin(decision.target, dict(RUNNING_V1))
            m.run()
        clock.t += step_s
    return starts


def test_a_retained_desired_refused_for_behaviour_never_loops(tmp_path):
    clock = Clock()
    starts = _updater_loop(tmp_path, State.SELF_TEST, lambda t: V2, clock, until=clock.t + 86_400, step_s=10.0)
    assert starts == [(1000.0, "r1")]


def test_a_transport_refusal_is_retried_with_backoff_then_at_once_by_a_new_rollout(tmp_path):
    clock = Clock()

    def desired(t):
        return V2 if t < 1000 + 3000 else {**V2, "rollout": "r2"}

    starts = _updater_loop(tmp_path, State.DOWNLOADING, desired, clock, until=clock.t + 3001)
    assert [t - 1000 for t, _ in starts] == [0, 60, 180, 420, 900, 1860, 3000]
    assert starts[-1][1] == "r2"  # at once when the new rollout came, not at the next backoff


def test_a_record_from_before_refusals_were_kept_still_blocks_a_behaviour_refusal(tmp_path):
    old = {"state": "IDLE", "target": {**V2, "path": "/x"}, "previous": None, "reason": "self-test: golden vectors",
           "attempts": 0, "entered_at": 500.0, "outcome": "ROLLED_BACK",
           "history": [{"from": "SELF_TEST", "to": "ROLLING_BACK", "at": 499.0},
                       {"from": "ROLLING_BACK", "to": "ROLLED_BACK", "at": 500.0}]}
    record = UpdateRecord.from_json(old)
    assert wanted(V2, RUNNING_V1, record.refusals, 10_000.0).target is None
    assert wanted({**V2, "rollout": "r2"}, RUNNING_V1, record.refusals, 10_000.0).target is not None
    old["reason"], old["history"][0]["from"] = "hash_mismatch: x", "DOWNLOADING"
    assert wanted(V2, RUNNING_V1, UpdateRecord.from_json(old).refusals, 10_000.0).target is not None
