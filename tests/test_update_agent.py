"""Signed updates on a real agent: a real Mosquitto, the signed repository served over it, real
ONNX Runtime, an agent subprocess inferring on a live synthetic IMU stream the whole time."""

from __future__ import annotations

import json

import pytest

from update_harness import (
    Rig,
    convert,
    crashes_on_load,
    model_version,
    nan_on_golden,
    nan_on_live_data,
    permuted_classes,
    scrambled,
    seq_gaps,
    update_of,
    wait_outcome,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def artifacts(imu_model, tmp_path_factory):
    """v1 and v2 of the IMU model, and bad candidates built from it."""
    root = tmp_path_factory.mktemp("update-artifacts")
    arts = {"1": convert(imu_model, root / "v1", "1"), "2": convert(imu_model, root / "v2", "2")}
    arts["scrambled"] = scrambled(arts["2"], root / "scrambled", "3")
    arts["nan"] = nan_on_golden(arts["2"], root / "nan", "4")
    arts["disagree"] = convert(imu_model, root / "disagree", "5", permuted_classes(imu_model, root / "perm.onnx"))
    arts["nan_live"] = convert(imu_model, root / "nan_live", "6", nan_on_live_data(imu_model, root / "nanlive.onnx"))
    arts["crash"] = crashes_on_load(arts["2"], root / "crash", "7")
    return arts


@pytest.fixture
def rig(tmp_path, artifacts):
    r = Rig(tmp_path)
    r.publish(artifacts["1"], "1")
    yield r
    r.close()


def _running_v1(rig, tmp_path, **update):
    """An agent that took v1 through the update path and now runs it."""
    jsonl = tmp_path / "results.jsonl"
    agent = rig.start_agent(rig.agent_config(tmp_path / "state", jsonl, **update))
    rig.set_desired("dev1", "1")
    status = wait_outcome(agent, "1")
    assert update_of(status)["state"] == "COMMITTED", update_of(status)
    return agent, jsonl


def test_happy_path_commits_v2_and_no_window_is_lost_across_the_switch(rig, artifacts, tmp_path):
    agent, jsonl = _running_v1(rig, tmp_path)
    v2 = rig.publish(artifacts["2"], "2")
    rig.set_desired("dev1", "2", rollout="wave-1")
    status = wait_outcome(agent, "2")
    update = update_of(status)
    assert update["state"] == "COMMITTED" and update["rollout"] == "wave-1", update
    assert model_version(status) == "2" and status["state"]["status"] == "running"
    # v2 is v1 with another version: it came as a delta from the running v1, not as the full artifact
    downloads = status["telemetry"]["update_downloads"]
    assert downloads["deltas_applied"] == 1 and downloads["deltas_refused"] == 0, downloads
    assert downloads["bytes_saved"] > 0.8 * v2["length"], downloads
    # v1 and the delta came as the repository server's casts (fleet/repo_server.py), all of them good
    assert downloads["cast_chunks"] >= 2 and downloads["cast_refused"] == 0, downloads
    assert downloads["last"] == {"target": {"name": "imu-cnn", "version": "2"}, "delta": True,
                                 "bytes": downloads["delta_bytes"], "full_bytes": v2["length"]}, downloads
    agent.wait_status(lambda s: s["telemetry"]["windows_out"] > status["telemetry"]["windows_out"] + 20,
                      what="more windows on v2")
    assert agent.stop() == 0
    missing, versions = seq_gaps(jsonl)
    assert missing == [], f"windows lost across the switch: {missing[:10]}"
    first_v2 = versions.index("2")
    assert versions[first_v2 - 1] == "1" and set(versions[first_v2:]) == {"2"}  # one clean switch
    assert versions.count("1") > 20 and versions.count("2") > 20  # inference ran throughout


def test_state_topic_reports_each_transition(rig, artifacts, tmp_path):
    import threading

    from edgeopt.mqtt import connect, make_client
    from edgeopt.protocol import parse_state

    seen: list[str] = []
    lock = threading.Lock()
    watcher = make_client("watcher", rig.broker.url)

    def on_message(c, u, msg):
        if msg.payload:
            st = parse_state("dev1", msg.payload)  # the fleet's own parser accepts every message
            with lock:
                if getattr(st, "update", None) and (not seen or seen[-1] != st.update.state):
                    seen.append(st.update.state)

    watcher.on_message = on_message
    connect(watcher)
    watcher.subscribe("edgeopt/devices/dev1/state", qos=1)
    try:
        agent, _ = _running_v1(rig, tmp_path)
        rig.publish(artifacts["2"], "2")
        rig.set_desired("dev1", "2")
        wait_outcome(agent, "2")
        agent.stop()
    finally:
        watcher.disconnect()
        watcher.loop_stop()
    expected = ["DOWNLOADING", "VERIFYING", "STAGED", "SELF_TEST", "SHADOW", "PROBATION", "COMMITTED"]
    tail = seen[len(seen) - 1 - seen[::-1].index("DOWNLOADING"):]
    assert tail == expected, seen


@pytest.mark.parametrize("variant,config,reason", [
    ("scrambled", {}, "golden vectors"),
    ("nan", {}, "NaN/Inf on golden inputs"),
    ("2", {"latency_budget_ms": 0.0001}, "exceeds the budget"),
])
def test_self_test_failures_roll_back(rig, artifacts, tmp_path, variant, config, reason):
    agent, jsonl = _running_v1(rig, tmp_path, **config) if not config else (None, None)
    if agent is None:  # a budget no model meets: install v1 without it, then update with it
        agent, jsonl = _running_v1(rig, tmp_path)
        agent.stop()
        cfg = rig.agent_config(tmp_path / "state", jsonl, **config)
        agent = rig.start_agent(cfg, name="agent2.toml")
    version = json.loads((artifacts[variant] / "manifest.json").read_text())["version"]
    rig.publish(artifacts[variant], version)
    rig.set_desired("dev1", version)
    status = wait_outcome(agent, version)
    update = update_of(status)
    assert update["state"] == "ROLLED_BACK" and "self-test" in update["reason"] and reason in update["reason"], update
    assert model_version(status) == "1" and status["state"]["status"] == "running"
    before = status["telemetry"]["windows_out"]
    agent.wait_status(lambda s: s["telemetry"]["windows_out"] > before + 10, what="v1 still inferring")
    assert agent.stop() == 0
    assert set(seq_gaps(jsonl)[1]) == {"1"}  # the candidate never served a window


def test_a_model_that_crashes_its_runtime_on_load_rolls_back_and_the_agent_survives(rig, artifacts, tmp_path):
    from edgeopt import registry

    if "tvm" not in registry.names(registry.RUNTIMES):
        pytest.skip("needs the tvm runtime (pip install 'edgeopt[tvm]') to load a native model library")
    agent, jsonl = _running_v1(rig, tmp_path)
    rig.publish(artifacts["crash"], "7")
    rig.set_desired("dev1", "7")
    status = wait_outcome(agent, "7")
    update = update_of(status)
    assert update["state"] == "ROLLED_BACK" and "crashed loading the model (signal 6)" in update["reason"], update
    assert agent.proc.poll() is None and model_version(status) == "1"  # the child died, not the agent
    before = status["telemetry"]["windows_out"]
    agent.wait_status(lambda s: s["telemetry"]["windows_out"] > before + 10, what="v1 still inferring")
    assert agent.stop() == 0
    missing, versions = seq_gaps(jsonl)
    assert missing == [] and set(versions) == {"1"}


def test_shadow_disagreement_rolls_back_before_the_switch(rig, artifacts, tmp_path):
    agent, jsonl = _running_v1(rig, tmp_path, shadow_windows=40)
    rig.publish(artifacts["disagree"], "5")
    rig.set_desired("dev1", "5")
    status = wait_outcome(agent, "5")
    update = update_of(status)
    assert update["state"] == "ROLLED_BACK" and "shadow: top-1 agreement" in update["reason"], update
    assert model_version(status) == "1"
    assert agent.stop() == 0
    assert set(seq_gaps(jsonl)[1]) == {"1"}


def test_probation_error_rate_rolls_back_to_the_previous_model(rig, artifacts, tmp_path):
    agent, jsonl = _running_v1(rig, tmp_path, probation_windows=200, probation_s=3.0)
    rig.publish(artifacts["nan_live"], "6")
    rig.set_desired("dev1", "6")
    status = wait_outcome(agent, "6")
    update = update_of(status)
    assert update["state"] == "ROLLED_BACK" and "probation" in update["reason"], update
    assert "NaN" in update["reason"] or "error rate" in update["reason"]
    assert model_version(status) == "1"
    before = status["telemetry"]["windows_out"]
    agent.wait_status(lambda s: s["telemetry"]["windows_out"] > before + 10, what="v1 inferring again")
    assert agent.stop() == 0
    missing, versions = seq_gaps(jsonl)
    assert missing == []  # no window lost through switch and rollback
    assert "6" in versions and versions[-1] == "1"  # the candidate served on probation, then v1 again


def test_a_version_not_in_signed_targets_is_refused_and_the_model_untouched(rig, artifacts, tmp_path):
    agent, _ = _running_v1(rig, tmp_path)
    rig.publish(artifacts["2"], "2")
    rig.repo.revoke("imu-cnn", "2")
    for version in ("2", "9"):  # revoked, never published
        rig.set_desired("dev1", version)
        status = wait_outcome(agent, version)
        update = update_of(status)
        assert update["state"] == "ROLLED_BACK" and update["reason"].startswith("not_allowed"), update
        assert model_version(status) == "1"
    slots = sorted(p.name for p in (tmp_path / "state" / "slots").iterdir() if not p.name.startswith("."))
    assert len(slots) == 1  # nothing was staged
    assert agent.stop() == 0


@pytest.mark.parametrize("fixed_by", ["a new rollout", "the backoff"])
def test_a_download_corrupted_in_transit_is_tried_again_once_the_file_is_fixed(rig, artifacts, tmp_path, fixed_by):
    """The server's copy is damaged (the device sees bytes that do not match the signed hash), then
    restored: the same signed target. A new rollout tries it at once (the backoff is an hour here);
    with a short backoff the same desired tries it again by itself."""
    backoff = 3600.0 if fixed_by == "a new rollout" else 0.5
    # latency is not what this test is about: on a busy machine the probation's latency gate may bite
    agent, _ = _running_v1(rig, tmp_path, refused_retry_s=backoff, refused_retry_max_s=backoff,
                           probation_latency_factor=1000.0)
    full = rig.stored(rig.publish(artifacts["2"], "2"))
    # the delta from v1 too: a damaged delta falls back to the full artifact, damaged as well here
    damaged_files = [full, *rig.repo.targets_dir.glob("*.imu-cnn-2.from-*.zst")]
    assert len(damaged_files) == 2
    good = {path: path.read_bytes() for path in damaged_files}
    for path, data in good.items():
        damaged = bytearray(data)
        damaged[len(damaged) // 2] ^= 0xFF
        path.write_bytes(bytes(damaged))
    rig.set_desired("dev1", "2", rollout="wave-1")
    status = wait_outcome(agent, "2")
    update = update_of(status)
    assert update["state"] == "ROLLED_BACK" and update["reason"].startswith("hash_mismatch"), update
    assert f"tried again in {backoff:.0f} s, or at once by a new rollout" in update["reason"], update
    for path, data in good.items():
        path.write_bytes(data)
    if fixed_by == "a new rollout":
        rig.set_desired("dev1", "2", rollout="wave-2")
    status = agent.wait_status(lambda s: update_of(s)["state"] == "COMMITTED" and model_version(s) == "2",
                               timeout=60, what="v2 committed after the fix")
    assert update_of(status)["rollout"] == ("wave-2" if fixed_by == "a new rollout" else "wave-1")
    assert agent.stop() == 0
    record = json.loads((tmp_path / "state" / "update.json").read_text())
    assert record["refusals"] == {}  # committed: nothing refused any more


def test_a_self_test_refusal_stays_refused_within_its_rollout(rig, artifacts, tmp_path):
    agent, _ = _running_v1(rig, tmp_path, refused_retry_s=0.5)
    rig.publish(artifacts["scrambled"], "3")
    rig.set_desired("dev1", "3", rollout="wave-1")
    update = update_of(wait_outcome(agent, "3"))
    assert update["state"] == "ROLLED_BACK" and "tried again only by a new rollout" in update["reason"], update
    record = json.loads((tmp_path / "state" / "update.json").read_text())
    assert record["refusals"]["imu-cnn@3"]["fault"] == "behaviour"
    rig.set_desired("dev1", "3", rollout="wave-2")  # the operator re-rolls it: it is tried once more
    agent.wait_status(lambda s: update_of(s)["rollout"] == "wave-2" and update_of(s)["state"] == "ROLLED_BACK",
                      what="the second try under wave-2 to end")
    assert agent.stop() == 0
    history = json.loads((tmp_path / "state" / "update.json").read_text())["history"]
    assert [h["from"] for h in history if h["to"] == "ROLLING_BACK"] == ["SELF_TEST", "SELF_TEST"]  # no loop


def test_rolling_back_to_a_damaged_previous_slot_runs_no_model_and_says_why(rig, artifacts, tmp_path):
    agent, _ = _running_v1(rig, tmp_path, probation_windows=200, probation_s=3.0)
    previous = tmp_path / "state" / "slots" / (tmp_path / "state" / "active").read_text().strip()
    rig.publish(artifacts["nan_live"], "6")
    rig.set_desired("dev1", "6")
    model = previous / "model.onnx"  # v1 keeps running from memory; its slot on disk is damaged meanwhile
    model.write_bytes(model.read_bytes()[:-1] + b"\0")
    status = wait_outcome(agent, "6")
    assert update_of(status)["state"] == "ROLLED_BACK" and "probation" in update_of(status)["reason"]
    status = agent.wait_status(lambda s: s["state"]["model"] is None, what="no model after the rollback")
    errors = status["state"]["slot_errors"]
    assert list(errors) == [previous.name] and "model.onnx does not match its sha256" in errors[previous.name]
    assert agent.proc.poll() is None and agent.stop() == 0


def test_malformed_desired_messages_are_ignored(rig, tmp_path):
    agent, _ = _running_v1(rig, tmp_path)
    for payload in (b"{", b"[]", json.dumps({"name": "../x", "version": "1"}).encode(), b"\xff" * 2000,
                    json.dumps({"name": "imu-cnn"}).encode()):
        rig.server_client.publish("edgeopt/devices/dev1/desired", payload, qos=1, retain=True).wait_for_publish(5)
    status = agent.wait_status(lambda s: s["state"]["status"] == "running", what="still running")
    assert model_version(status) == "1" and update_of(status)["state"] == "COMMITTED"
    assert agent.stop() == 0


def test_an_agent_with_repo_url_takes_its_updates_over_http(rig, artifacts, tmp_path):
    """[update] repo_url: the signed repository from a static web server (here nginx where installed,
    else the fleet service's own --http-repo), desired still over MQTT; the MQTT repository server
    answers no request of this device."""
    from web_servers import static_server

    web = static_server(rig.repo.root, tmp_path)
    try:
        agent, _ = _running_v1(rig, tmp_path, repo_url=web.url, chunk_bytes=2**20)
        v2 = rig.publish(artifacts["2"], "2")
        rig.set_desired("dev1", "2")
        status = wait_outcome(agent, "2")
        assert update_of(status)["state"] == "COMMITTED" and model_version(status) == "2", update_of(status)
        downloads = status["telemetry"]["update_downloads"]
        assert downloads["deltas_applied"] == 1 and downloads["last"]["full_bytes"] == v2["length"], downloads
        assert rig.server.snapshot_stats().get("requests", 0) == 0  # nothing over MQTT's repository server
        assert agent.stop() == 0
    finally:
        web.stop()


def test_a_restarted_agent_does_not_update_to_the_version_it_already_runs(rig, artifacts, tmp_path):
    """The retained desired names the running version: after a restart the agent takes it as done —
    no download, no self-test, no swap (the updater starts once the active model was looked for)."""
    agent, _ = _running_v1(rig, tmp_path)
    assert agent.stop() == 0
    history = json.loads((tmp_path / "state" / "update.json").read_text())["history"]
    for attempt in range(3):
        again = rig.start_agent(rig.agent_config(tmp_path / "state", tmp_path / "results.jsonl"),
                                name=f"again-{attempt}.toml")
        status = again.wait_status(lambda s: s["state"]["status"] == "running" and s["telemetry"]["windows_out"] > 20,
                                   what="inference after the restart")
        assert model_version(status) == "1" and update_of(status)["state"] == "COMMITTED", update_of(status)
        assert status["telemetry"]["update_downloads"]["bytes_network"] == 0
        assert again.stop() == 0
        assert json.loads((tmp_path / "state" / "update.json").read_text())["history"] == history
