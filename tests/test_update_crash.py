"""Crash safety: the agent is SIGKILLed in every update state, restarted, and must converge
(commit or roll back) while always running a model that passed its checks; a corrupted active
slot is detected by its hashes at start and the other, known-good slot takes over."""

from __future__ import annotations

import json
import signal
import stat

import pytest

from update_harness import Rig, convert, model_version, scrambled, update_of, wait, wait_outcome

pytestmark = pytest.mark.slow

HOOK = """#!/bin/sh
# [update] state_hook: on entering the state named in $EDGEOPT_BLOCK_IN, say so and hang there
if [ "$1" = "$EDGEOPT_BLOCK_IN" ]; then touch "$EDGEOPT_MARK_DIR/$1"; exec sleep 120 </dev/null >/dev/null 2>&1; fi
"""


@pytest.fixture(scope="module")
def artifacts(imu_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("crash-artifacts")
    arts = {"1": convert(imu_model, root / "v1", "1"), "2": convert(imu_model, root / "v2", "2")}
    arts["bad"] = scrambled(arts["2"], root / "bad", "3")
    return arts


@pytest.fixture
def rig(tmp_path, artifacts):
    r = Rig(tmp_path)
    r.publish(artifacts["1"], "1")
    r.publish(artifacts["2"], "2")
    r.publish(artifacts["bad"], "3")
    yield r
    r.close()


def _hook(tmp_path):
    hook = tmp_path / "hook.sh"
    hook.write_text(HOOK)
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "marks").mkdir()
    return hook


# (state to die in, version to update to, how it must end, the model running at the end)
CASES = [
    ("DOWNLOADING", "2", "COMMITTED", "2"),
    ("VERIFYING", "2", "COMMITTED", "2"),
    ("STAGED", "2", "COMMITTED", "2"),
    ("SELF_TEST", "2", "COMMITTED", "2"),
    ("SHADOW", "2", "COMMITTED", "2"),
    ("PROBATION", "2", "ROLLED_BACK", "1"),   # a restart during probation counts against the candidate
    ("COMMITTED", "2", "COMMITTED", "2"),
    ("ROLLING_BACK", "3", "ROLLED_BACK", "1"),
    ("ROLLED_BACK", "3", "ROLLED_BACK", "1"),
]


@pytest.mark.parametrize("state,version,outcome,running", CASES, ids=[c[0] for c in CASES])
def test_killed_in_state_converges_to_a_checked_model(rig, tmp_path, state, version, outcome, running):
    hook = _hook(tmp_path)
    jsonl = tmp_path / "results.jsonl"
    cfg = rig.agent_config(tmp_path / "state", jsonl, state_hook=str(hook), shadow_windows=20)
    first = rig.start_agent(cfg)
    rig.set_desired("dev1", "1")
    assert update_of(wait_outcome(first, "1"))["state"] == "COMMITTED"
    first.proc.kill()
    first.communicate()

    import os
    os.environ["EDGEOPT_BLOCK_IN"], os.environ["EDGEOPT_MARK_DIR"] = state, str(tmp_path / "marks")
    try:
        doomed = rig.start_agent(cfg, name="agent-doomed.toml")
    finally:
        del os.environ["EDGEOPT_BLOCK_IN"], os.environ["EDGEOPT_MARK_DIR"]
    rig.set_desired("dev1", version)
    wait(lambda: (tmp_path / "marks" / state).exists(), timeout=60, what=f"the agent to enter {state}")
    doomed.proc.send_signal(signal.SIGKILL)
    doomed.communicate()
    on_disk = json.loads((tmp_path / "state" / "update.json").read_text())
    assert on_disk["state"] == state  # it really died in that state

    (tmp_path / "state" / "status.json").unlink()  # what the killed agent last wrote must not count
    restarted = rig.start_agent(cfg, name="agent-restarted.toml")
    status = wait_outcome(restarted, version)
    assert update_of(status)["state"] == outcome, update_of(status)
    status = restarted.wait_status(lambda s: s["state"]["status"] == "running" and s["telemetry"]["windows_out"] > 5,
                                   what="inference after the restart")
    assert model_version(status) == running
    record = json.loads((tmp_path / "state" / "update.json").read_text())
    if running == version:  # the candidate now serves: it passed its self-test and probation
        assert record["target"]["self_test"]["ok"] is True and "probation" in record["target"]
    if state == "PROBATION":
        assert "restarted during probation" in update_of(status)["reason"]
    assert restarted.stop() == 0


def test_corrupt_active_slot_falls_back_to_the_other_slot(rig, tmp_path):
    jsonl = tmp_path / "results.jsonl"
    cfg = rig.agent_config(tmp_path / "state", jsonl)
    agent = rig.start_agent(cfg)
    rig.set_desired("dev1", "1")
    assert update_of(wait_outcome(agent, "1"))["state"] == "COMMITTED"
    rig.set_desired("dev1", "2")
    assert update_of(wait_outcome(agent, "2"))["state"] == "COMMITTED"
    assert agent.stop() == 0
    state_dir = tmp_path / "state"
    active = (state_dir / "active").read_text().strip()
    model = state_dir / "slots" / active / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit on disk while the agent is stopped
    model.write_bytes(bytes(data))

    (state_dir / "status.json").unlink()
    again = rig.start_agent(cfg, name="agent-again.toml")
    status = again.wait_status(lambda s: s["state"]["status"] == "running" and s["telemetry"]["windows_out"] > 5,
                               what="running after the fall-back")
    assert model_version(status) == "1"
    assert (state_dir / "active").read_text().strip() != active
    assert "failed verification" in status["state"]["fallback"] and "model.onnx" in status["state"]["fallback"]
    assert again.stop() == 0
