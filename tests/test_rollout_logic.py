"""Rollout decisions as pure functions of recorded device states: parsing operator input, wave
plans, per-device outcomes, and the wave / abort / completion decisions, exhaustively on small fleets."""

from __future__ import annotations

import copy
import itertools

import pytest

from edgeopt.errors import UserInputError
from edgeopt.fleet.rollout import (
    Assignment,
    DeviceRecord,
    Outcome,
    Phase,
    apply_command,
    decide,
    device_outcome,
    health_violation,
    new_rollout,
    progress,
)
from edgeopt.fleet.rollout_spec import (
    Gates,
    RolloutSpec,
    WaveStep,
    parse_duration,
    parse_failure_threshold,
    parse_percent,
    parse_selector,
    parse_waves,
    plan_waves,
    wave_sizes,
)
from edgeopt.protocol import Health, ModelRef, Telemetry, UpdateStatus

V1, V2 = ModelRef("kws", "1"), ModelRef("kws", "2")


# -- operator input ------------------------------------------------------------------------------
def test_parse_waves_cumulative_incremental_and_counts():
    assert [str(s) for s in parse_waves("1%,10%,50%,100%")] == ["1%", "10%", "50%", "100%"]
    assert [s.value for s in parse_waves("10%,40%,50%")] == [10, 50, 100]  # wave sizes summing to 100
    assert [str(s) for s in parse_waves("2, 20, 100%")] == ["2", "20", "100%"]
    assert [str(s) for s in parse_waves("100%")] == ["100%"]


@pytest.mark.parametrize("text,needle", [
    ("1%,10%,50%", "sum to 100%"), ("50%,60%", "sum to 100%"), ("", "1 to 20"), ("10%,x", "neither"),
    ("0%,100%", "(0%, 100%]"), ("150%", "(0%, 100%]"), ("0,100%", "whole count"), ("1.5,100%", "whole count"),
    ("20,10,100%", "must increase"), (",".join(["5%"] * 21), "1 to 20"),
])
def test_parse_waves_errors(text, needle):
    with pytest.raises(UserInputError) as exc:
        parse_waves(text)
    assert needle in str(exc.value)


def test_parse_durations_percents_thresholds_selectors():
    assert parse_duration("10m", "--bake") == 600 and parse_duration("1.5h", "x") == 5400
    assert parse_duration("250ms", "x") == 0.25 and parse_duration("30", "x") == 30
    assert parse_percent("95%", "x") == 0.95 and parse_percent("0.5", "x") == 0.5
    assert parse_failure_threshold("5%") == (0.05, None) and parse_failure_threshold("3") == (None, 3)
    assert parse_failure_threshold("5%,3") == (0.05, 3)
    assert parse_selector(("site=lab", "ring=canary,hw=pi4")) == {"site": "lab", "ring": "canary", "hw": "pi4"}
    for call in (lambda: parse_duration("soon", "--bake"), lambda: parse_percent("120%", "x"),
                 lambda: parse_failure_threshold("lots"), lambda: parse_selector(("site",)),
                 lambda: parse_selector(("a b=c",)), lambda: parse_failure_threshold(",")):
        with pytest.raises(UserInputError):
            call()


def test_wave_sizes():
    steps = parse_waves("1%,10%,50%,100%")
    assert wave_sizes(steps, 200) == [2, 18, 80, 100]
    assert wave_sizes(steps, 10_000) == [100, 900, 4000, 5000]
    assert wave_sizes(steps, 3) == [1, 0, 1, 1]
    assert wave_sizes(parse_waves("2,20,100%"), 50) == [2, 18, 30]
    assert wave_sizes(parse_waves("2,5"), 5) == [2, 3]
    with pytest.raises(UserInputError, match="asks for 20 devices but the selector matches 10"):
        wave_sizes(parse_waves("2,20,100%"), 10)
    with pytest.raises(UserInputError, match="cover 5 of the 9"):
        wave_sizes(parse_waves("2,5"), 9)


def test_plan_is_reproducible_disjoint_and_complete():
    devices = [f"d{i:03d}" for i in range(200)]
    a = plan_waves("r-1", parse_waves("1%,10%,50%,100%"), devices)
    assert a == plan_waves("r-1", parse_waves("1%,10%,50%,100%"), list(reversed(devices)))
    assert [len(w) for w in a] == [2, 18, 80, 100]
    assert sorted(itertools.chain(*a)) == devices
    assert plan_waves("r-2", parse_waves("1%,10%,50%,100%"), devices)[0] != a[0]


def test_selector_matching_no_device_is_refused():
    with pytest.raises(UserInputError, match="site=nowhere matches no device"):
        new_rollout("r-1", spec(selector={"site": "nowhere"}), [], 0.0)


# -- per device outcome ----------------------------------------------------------------------------
def spec(**over) -> RolloutSpec:
    base = dict(target=V2, selector={}, waves=parse_waves("50%,100%"), bake_s=10.0, success_threshold=1.0,
                failure_pct=0.25, failure_count=None, device_timeout_s=100.0, gates=Gates())
    base.update(over)
    return RolloutSpec(**base)


def rec(model=V1, state="IDLE", target=None, changed=None, **kw) -> DeviceRecord:
    return DeviceRecord("d1", online=kw.pop("online", True), model=model,
                        update=UpdateStatus(state, target, kw.pop("rollout", None), kw.pop("reason", None), 0.0),
                        update_changed_at=changed, **kw)


TOLD = Assignment("d1", 0, assigned_at=100.0, previous=V1)
STATES = ("IDLE", "DOWNLOADING", "VERIFYING", "STAGED", "SELF_TEST", "SHADOW", "PROBATION", "COMMITTED",
          "ROLLING_BACK", "ROLLED_BACK")


def expected_outcome(model, state, target):
    if target == V2 and state in ("ROLLING_BACK", "ROLLED_BACK"):
        return Outcome.FAILURE
    if model == V2 and state in ("COMMITTED", "IDLE"):
        return Outcome.SUCCESS
    return Outcome.PENDING


@pytest.mark.parametrize("model,state,target", list(itertools.product((V1, V2, None), STATES, (V1, V2, None))))
def test_outcome_for_every_model_state_and_target(model, state, target):
    outcome, reason = device_outcome(TOLD, rec(model, state, target, changed=120.0), spec(), now=150.0)
    assert outcome is expected_outcome(model, state, target)
    assert (reason is None) == (outcome is not Outcome.FAILURE)


def test_idle_naming_the_target_with_a_reason_is_a_rollback():
    back = rec(V1, "IDLE", V2, changed=120.0, reason="golden self-test failed")
    assert device_outcome(TOLD, back, spec(), 130.0) == (Outcome.FAILURE, "rolled back: golden self-test failed")
    committed = rec(V2, "IDLE", V2, changed=120.0, reason="stale text")
    assert device_outcome(TOLD, committed, spec(), 130.0)[0] is Outcome.SUCCESS


def test_a_rollback_reported_for_an_earlier_rollout_is_not_this_rollouts_failure():
    """A re-roll of a refused version: until the device reacts to the new desired it still reports
    the old rollout's rollback of that same version; that is not a failure of the new rollout."""
    old = rec(V1, "IDLE", V2, changed=50.0, reason="self-test failed", rollout="r1")
    assert device_outcome(TOLD, old, spec(), 130.0, rollout_id="r2")[0] is Outcome.PENDING
    assert device_outcome(TOLD, old, spec(), 130.0, rollout_id="r1")[0] is Outcome.FAILURE
    again = rec(V1, "ROLLED_BACK", V2, changed=120.0, reason="self-test failed", rollout="r2")
    assert device_outcome(TOLD, again, spec(), 130.0, rollout_id="r2") == (Outcome.FAILURE, "rolled back: self-test failed")
    unnamed = rec(V1, "IDLE", V2, changed=120.0, reason="self-test failed")  # a device that names no rollout
    assert device_outcome(TOLD, unnamed, spec(), 130.0, rollout_id="r2")[0] is Outcome.FAILURE


def test_recorded_rollback_counts_only_after_the_device_was_told():
    after = rec(V1, "IDLE", None, failed_target=V2, failed_reason="self-test failed", failed_at=120.0)
    assert device_outcome(TOLD, after, spec(), 130.0) == (Outcome.FAILURE, "rolled back: self-test failed")
    before = rec(V1, "IDLE", None, failed_target=V2, failed_reason="old", failed_at=90.0)
    assert device_outcome(TOLD, before, spec(), 130.0)[0] is Outcome.PENDING
    other = rec(V1, "IDLE", None, failed_target=ModelRef("kws", "3"), failed_at=120.0)
    assert device_outcome(TOLD, other, spec(), 130.0)[0] is Outcome.PENDING


def test_timeout_counts_from_the_last_progress_towards_the_target():
    s = spec(device_timeout_s=100.0)
    assert device_outcome(TOLD, None, s, 200.0)[0] is Outcome.PENDING
    outcome, reason = device_outcome(TOLD, None, s, 201.0)
    assert outcome is Outcome.FAILURE and "never reported" in reason and "offline" in reason
    moving = rec(V1, "DOWNLOADING", V2, changed=180.0)
    assert device_outcome(TOLD, moving, s, 279.0)[0] is Outcome.PENDING
    assert device_outcome(TOLD, moving, s, 281.0)[1].startswith("timeout: no progress for 101 s (last state DOWNLOADING")
    other_target = rec(V1, "DOWNLOADING", ModelRef("kws", "9"), changed=180.0)
    assert device_outcome(TOLD, other_target, s, 201.0)[0] is Outcome.FAILURE


def test_failure_is_final_success_is_not():
    failed = Assignment("d1", 0, 100.0, V1, Outcome.FAILURE, "timeout", 150.0)
    assert device_outcome(failed, rec(V2, "COMMITTED"), spec(), 160.0) == (Outcome.FAILURE, "timeout")
    ok = Assignment("d1", 0, 100.0, V1, Outcome.SUCCESS, None, 150.0)
    bad = rec(V2, "IDLE", health=Health(error_rate=0.5))
    assert device_outcome(ok, bad, spec(gates=Gates(max_error_rate=0.1)), 160.0)[0] is Outcome.FAILURE


@pytest.mark.parametrize("gates,health,telemetry,needle", [
    (Gates(max_error_rate=0.1), Health(0.2), None, "error rate 0.2 > 0.1"),
    (Gates(max_error_rate=0.1), Health(0.0), Telemetry("d1", V2, None, 0.3), "error rate 0.3"),
    (Gates(min_agreement=0.95), Health(0.0, None, 0.9), None, "agreement 0.9 < 0.95"),
    (Gates(max_latency_p95_ms=5), Health(0.0, 6.0), None, "latency p95 6 ms > 5 ms"),
    (Gates(max_latency_p95_ms=5), None, Telemetry("d1", V2, 7.0, None), "latency p95 7 ms"),
    (Gates(max_nan_outputs=0), Health(0.0, None, None, 3), None, "3 NaN outputs > 0"),
    (Gates(max_error_rate=0.1, min_agreement=0.9, max_latency_p95_ms=5, max_nan_outputs=0),
     Health(0.1, 5.0, 0.9, 0), Telemetry("d1", V2, 5.0, 0.1), None),
    (Gates(), Health(1.0, 1e6, 0.0, 10**6), None, None),
])
def test_health_gates(gates, health, telemetry, needle):
    if needle is None:
        assert health_violation(health, telemetry, gates) is None
    else:
        assert needle in health_violation(health, telemetry, gates)


def test_health_gates_apply_while_the_device_tries_or_runs_the_target_only():
    gates = Gates(max_error_rate=0.1)
    sick = Health(0.5)
    for model, state, target, expected in [
        (V2, "IDLE", None, Outcome.FAILURE), (V1, "PROBATION", V2, Outcome.FAILURE),
        (V1, "SHADOW", V2, Outcome.FAILURE), (V1, "DOWNLOADING", V2, Outcome.PENDING),
        (V1, "IDLE", None, Outcome.PENDING),
    ]:
        r = rec(model, state, target, changed=120.0, health=sick)
        assert device_outcome(TOLD, r, spec(gates=gates), 130.0)[0] is expected, (model, state)
    # telemetry about another model version is not held against the target
    r = rec(V2, "IDLE", telemetry=Telemetry("d1", V1, None, 0.9))
    assert device_outcome(TOLD, r, spec(gates=gates), 130.0)[0] is Outcome.SUCCESS


# -- rollout decisions -----------------------------------------------------------------------------
class Fleet:
    """Recorded device states for the decisions, driven by hand."""

    def __init__(self, n: int, **spec_over):
        self.ids = [f"d{i:02d}" for i in range(n)]
        self.devices = {d: DeviceRecord(d, True, model=V1, update=UpdateStatus("IDLE")) for d in self.ids}
        self.status, self.assignments = new_rollout("r-1", spec(**spec_over), self.ids, 0.0)
        self.desired: list = []
        self.now = 0.0

    def apply(self, decision):
        self.status = decision.rollout
        self.assignments.update(decision.assignments)
        self.desired.extend(decision.desired)
        return decision

    def tick(self, dt: float = 1.0):
        self.now += dt
        return self.apply(decide(self.status, self.assignments, self.devices, self.now))

    def command(self, cmd):
        return self.apply(apply_command(self.status, self.assignments, cmd, self.now))

    def wave(self, i):
        return sorted(a.device_id for a in self.assignments.values() if a.wave == i)

    def commit(self, *ids):
        for d in ids:
            self.devices[d] = DeviceRecord(d, True, model=V2, update=UpdateStatus("IDLE"), update_changed_at=self.now)

    def roll_back(self, *ids):
        for d in ids:
            self.devices[d] = DeviceRecord(d, True, model=V1, update=UpdateStatus("ROLLED_BACK", V2, "r-1", "bad"),
                                           update_changed_at=self.now, failed_target=V2, failed_reason="bad",
                                           failed_at=self.now)


def test_happy_path_waves_bake_and_complete():
    f = Fleet(8, waves=parse_waves("25%,100%"), bake_s=5.0)
    f.tick()
    assert f.status.state is Phase.CREATED and not f.desired  # nothing happens before start
    f.command("start")
    d = f.tick()
    assert f.status.state is Phase.RUNNING and f.status.waves[0].state is Phase.RUNNING
    assert sorted(w.device_id for w in d.desired) == f.wave(0) and all(w.model == V2 for w in d.desired)
    assert all(f.assignments[x].previous == V1 and f.assignments[x].assigned_at == f.now for x in f.wave(0))
    f.commit(f.wave(0)[0])
    f.tick()
    assert f.status.waves[0].success_since is None  # 1 of 2 < 100%
    f.commit(*f.wave(0))
    f.tick()
    since = f.status.waves[0].success_since
    assert since == f.now and f.status.current_wave == 0
    f.tick(4.0)
    assert f.status.current_wave == 0  # bake not over
    d = f.tick(1.0)
    assert f.status.waves[0].state is Phase.COMPLETED and f.status.current_wave == 1
    assert sorted(w.device_id for w in d.desired) == f.wave(1)
    f.commit(*f.wave(1))
    f.tick()
    d = f.tick(5.0)
    assert f.status.state is Phase.COMPLETED and [w.state for w in f.status.waves] == [Phase.COMPLETED] * 2
    assert sorted(w.device_id for w in f.desired) == sorted(f.ids)  # each told exactly once
    kinds = [k for k, _ in d.events]
    assert "wave_completed" in kinds and "completed" in kinds
    assert progress(f.status, f.assignments)[1] == {"wave": 2, "state": "COMPLETED", "size": 6, "told": 6,
                                                    "success": 6, "failure": 0, "pending": 0,
                                                    "started_at": f.status.waves[1].started_at,
                                                    "success_since": f.status.waves[1].success_since,
                                                    "ended_at": f.status.waves[1].ended_at}


def test_bake_clock_restarts_when_the_success_share_drops():
    f = Fleet(2, waves=parse_waves("50%,100%"), bake_s=5.0, gates=Gates(max_error_rate=0.5), failure_pct=1.0)
    f.command("start")
    f.tick()
    (first,) = f.wave(0)
    f.commit(first)
    f.tick()
    t0 = f.status.waves[0].success_since
    f.tick(3.0)
    f.devices[first] = DeviceRecord(first, True, model=V1, update=UpdateStatus("PROBATION", V2), update_changed_at=f.now)
    f.tick()
    assert f.status.waves[0].success_since is None
    f.commit(first)
    f.tick()
    assert f.status.waves[0].success_since > t0 and f.status.current_wave == 0


def test_failures_past_the_threshold_abort_and_roll_back_every_told_device():
    f = Fleet(20, waves=parse_waves("10%,50%,100%"), failure_pct=0.1, bake_s=0.0)
    f.devices["d00"] = DeviceRecord("d00", True, model=None, update=UpdateStatus("IDLE"))  # had no model
    f.command("start")
    f.tick()
    f.commit(*f.wave(0))
    f.tick()
    assert f.status.current_wave == 1
    told = f.wave(0) + f.wave(1)
    f.roll_back(*f.wave(1)[:1])
    f.tick()
    assert f.status.state is Phase.RUNNING  # 1 of 10 = 10%, not past 10%
    f.roll_back(*f.wave(1)[1:2])
    n = len(f.desired)
    d = f.tick()
    assert f.status.state is Phase.ABORTED and f.status.waves[1].state is Phase.ABORTED
    assert f.status.waves[2].state is Phase.CREATED
    assert "wave 2: 2 of 10 told devices failed (20%)" in f.status.reason and "rolled back: bad" in f.status.reason
    rollback = f.desired[n:]
    assert sorted(w.device_id for w in rollback) == sorted(told)
    for w in rollback:
        assert w.model == f.assignments[w.device_id].previous
    assert all(w.device_id not in f.wave(2) for w in f.desired)  # never told
    assert ("aborted", d.events[-1][1]) == d.events[-1]
    before = copy.deepcopy((f.status, f.assignments))
    assert not f.tick().changed and (f.status, f.assignments) == before  # aborted is final


def test_failure_count_threshold():
    f = Fleet(10, waves=parse_waves("100%"), failure_pct=None, failure_count=2)
    f.command("start")
    f.tick()
    f.roll_back("d01", "d02")
    f.tick()
    assert f.status.state is Phase.RUNNING
    f.roll_back("d03")
    f.tick()
    assert f.status.state is Phase.ABORTED and "3 of 10" in f.status.reason


def test_a_wave_that_ends_below_its_success_threshold_aborts():
    f = Fleet(10, waves=parse_waves("100%"), failure_pct=0.5, success_threshold=0.9)
    f.command("start")
    f.tick()
    f.commit(*f.ids[:8])
    f.roll_back(*f.ids[8:])
    f.tick()
    assert f.status.state is Phase.ABORTED and "below the success threshold of 90%" in f.status.reason


def test_pause_holds_the_wave_but_the_failure_gate_still_aborts():
    f = Fleet(4, waves=parse_waves("50%,100%"), bake_s=0.0, failure_pct=0.3)
    f.command("start")
    f.tick()
    f.command("pause")
    assert f.status.waves[0].state is Phase.PAUSED
    f.commit(*f.wave(0))
    for _ in range(3):
        f.tick(10.0)
    assert f.status.current_wave == 0 and f.status.state is Phase.PAUSED
    assert all(f.assignments[x].outcome is Outcome.SUCCESS for x in f.wave(0))  # still recorded
    f.command("resume")
    f.tick()
    assert f.status.current_wave == 1 and f.status.waves[1].state is Phase.RUNNING
    f.command("pause")
    f.roll_back(*f.wave(1))
    f.tick()
    assert f.status.state is Phase.ABORTED


def test_operator_abort_rolls_back_told_devices_only():
    f = Fleet(4, waves=parse_waves("50%,100%"))
    f.command("start")
    f.tick()
    d = f.command("abort")
    assert f.status.state is Phase.ABORTED and f.status.reason == "aborted by the operator"
    assert sorted(w.device_id for w in d.desired) == f.wave(0) and all(w.model == V1 for w in d.desired)


@pytest.mark.parametrize("state,allowed", [
    (Phase.CREATED, {"start", "abort"}), (Phase.RUNNING, {"pause", "abort"}), (Phase.PAUSED, {"resume", "abort"}),
    (Phase.ABORTED, set()), (Phase.COMPLETED, set()),
])
def test_command_legality(state, allowed):
    f = Fleet(2)
    f.status.state = state
    for cmd in ("start", "pause", "resume", "abort"):
        if cmd in allowed:
            apply_command(f.status, f.assignments, cmd, 1.0)
        else:
            with pytest.raises(UserInputError, match=f"is {state}; only a"):
                apply_command(f.status, f.assignments, cmd, 1.0)
    with pytest.raises(UserInputError, match="unknown rollout command"):
        apply_command(f.status, f.assignments, "explode", 1.0)


def test_empty_waves_pass_straight_through():
    f = Fleet(3, waves=parse_waves("1%,10%,50%,100%"), bake_s=0.0)
    assert [w.size for w in f.status.waves] == [1, 0, 1, 1]
    f.command("start")
    f.tick()
    f.commit(*f.wave(0))
    f.tick()
    assert f.status.current_wave == 2 and f.status.waves[1].state is Phase.COMPLETED


def test_decide_does_not_modify_its_inputs():
    f = Fleet(6, waves=parse_waves("50%,100%"), bake_s=0.0)
    f.command("start")
    f.tick()
    f.commit(*f.wave(0))
    snapshot = copy.deepcopy((f.status, f.assignments, f.devices))
    decide(f.status, f.assignments, f.devices, 99.0)
    assert (f.status, f.assignments, f.devices) == snapshot


OUTCOME_STATES = {"pending": None, "success": "commit", "failure": "roll_back"}


@pytest.mark.parametrize("first", list(itertools.product(OUTCOME_STATES, repeat=2)))
@pytest.mark.parametrize("second", list(itertools.product(OUTCOME_STATES, repeat=3)))
def test_exhaustive_small_fleet(first, second):
    """Every combination of device outcomes over a 2-wave rollout of 5 devices: the decision aborts
    exactly when the failures cross the threshold, advances exactly when the wave succeeded, never
    tells a device of a wave that has not started, and rolls back exactly the told devices."""
    f = Fleet(5, waves=parse_waves("2,100%"), bake_s=0.0, failure_pct=0.2, success_threshold=1.0)
    f.command("start")
    f.tick()
    w0, w1 = f.wave(0), f.wave(1)
    for dev, what in zip(w0, first, strict=True):
        if OUTCOME_STATES[what]:
            getattr(f, OUTCOME_STATES[what])(dev)
    f.tick()
    failures0 = first.count("failure")
    if failures0 / 2 > 0.2:
        assert f.status.state is Phase.ABORTED
        assert sorted(w.device_id for w in f.desired[2:]) == w0
        return
    if first.count("success") < 2:
        assert f.status.current_wave == 0 and len(f.desired) == 2
        return
    assert f.status.current_wave == 1 and sorted(w.device_id for w in f.desired[2:]) == w1
    for dev, what in zip(w1, second, strict=True):
        if OUTCOME_STATES[what]:
            getattr(f, OUTCOME_STATES[what])(dev)
    f.tick()
    failures = second.count("failure")
    if failures / 5 > 0.2:
        assert f.status.state is Phase.ABORTED
        rollback = f.desired[5:]
        assert sorted(w.device_id for w in rollback) == sorted(w0 + w1) and all(w.model == V1 for w in rollback)
    elif second.count("success") == 3:
        assert f.status.state is Phase.COMPLETED and len(f.desired) == 5
    elif failures and "pending" not in second:
        assert f.status.state is Phase.ABORTED and "below the success threshold" in f.status.reason
    else:
        assert f.status.state is Phase.RUNNING and len(f.desired) == 5


def test_spec_json_round_trip():
    s = spec(gates=Gates(max_error_rate=0.1, max_latency_p95_ms=3.0), failure_count=4,
             waves=(WaveStep(5, False), WaveStep(100, True)))
    assert RolloutSpec.from_json(s.to_json()) == s
