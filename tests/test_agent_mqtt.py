"""The agent end to end with a real Mosquitto: CSV replay → model → MQTT results, retained state
with a last will, telemetry, and the offline outbox across a broker crash."""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pytest

from edgeopt.agent.statedir import StateDir

from agent_harness import AgentProcess, base_config
from brokers import Mosquitto, Subscriber

WINDOW, HOP = 64, 32


def window_labels(csv_path) -> list[int]:
    """The majority label of every window of the CSV, computed here independently of the agent."""
    labels = np.loadtxt(csv_path, delimiter=",", skiprows=1, usecols=3).astype(int)
    starts = range(0, len(labels) - WINDOW + 1, HOP)
    return [int(np.bincount(labels[s:s + WINDOW]).argmax()) for s in starts]


@pytest.fixture
def state(tmp_path, imu_model):
    StateDir(tmp_path / "state").install(imu_model["artifact"])
    return tmp_path / "state"


def mqtt_config(tmp_path, broker, mqtt=None, **extra):
    return base_config(tmp_path, mqtt={"host": broker.host, "port": broker.port, "reconnect_min_s": 0.1,
                                       "reconnect_max_s": 0.5, **(mqtt or {})}, **extra)


def result_ids(sub: Subscriber, redeliveries: bool = True) -> list[str]:
    return [r["id"] for msg in sub.payloads("/results", redeliveries) for r in msg["results"]]


def test_csv_to_mqtt_results_state_and_telemetry(tmp_path, imu_model, state):
    expected = window_labels(imu_model["stream"])
    with Mosquitto(tmp_path) as broker:
        sub = Subscriber(broker, "edgeopt/devices/dev1/#")
        cfg = mqtt_config(tmp_path, broker, agent={"exit_when_sources_end": True},
                          batching={"max_batch": 16, "overflow": "block"},
                          source=[{"type": "csv", "name": "imu", "path": str(imu_model["stream"]), "replay": "fast"}],
                          sink=[{"type": "mqtt"}])
        agent = AgentProcess(tmp_path, cfg)
        assert agent.communicate() == 0, agent.err
        sub.wait_for(lambda: any(not m["online"] for m in sub.payloads("/state")), what="offline state")
        sub.close()
    messages = sub.payloads("/results")
    records = [r for m in messages for r in m["results"]]
    assert [r["id"] for r in records] == [f"imu:{i}" for i in range(len(expected))]
    assert all(m["device"] == "dev1" and m["model"] == {"name": "imu-cnn", "version": "3"} for m in messages)
    assert all(r["t_end"] > r["t_start"] and len(r["outputs"]["activity"]) == 4 for r in records)
    # the manifest's preprocessing (channel order, normalization, window, hop) was applied: the model
    # classifies the held-out stream as well as it did in training
    accuracy = np.mean([r["top1"] == y for r, y in zip(records, expected, strict=True)])
    assert accuracy >= 0.9, accuracy
    states = sub.payloads("/state")
    running = [s for s in states if s["status"] == "running"]
    assert running and running[0]["online"] is True and running[0]["model"]["version"] == "3"
    assert states[-1]["online"] is False and states[-1]["status"] == "stopped"
    assert [retain for t, _, retain, _ in sub.messages if t.endswith("/state")][-1] is False  # live, not replayed
    status = agent.status()["telemetry"]
    assert status["windows_out"] == len(expected) and sum(status["dropped"].values()) == 0
    assert status["outbox"]["pending"] == 0 and status["outbox"]["acked"] == len(messages)
    assert set(status["batch_size_histogram"]) and max(map(int, status["batch_size_histogram"])) <= 16


def test_retained_state_and_last_will(tmp_path, state, imu_model):
    with Mosquitto(tmp_path) as broker:
        cfg = mqtt_config(tmp_path, broker, mqtt={"keepalive_s": 5},
                          source=[{"type": "synthetic", "name": "imu", "replay": "recorded"}], sink=[{"type": "mqtt"}])
        agent = AgentProcess(tmp_path, cfg)
        agent.wait_status(lambda s: s["telemetry"]["windows_out"] > 0 and s["telemetry"]["mqtt"]["connected"],
                          what="first results")
        late = Subscriber(broker, "edgeopt/devices/dev1/state", clean_session=True)  # joins later: gets the retained
        late.wait_for(lambda: late.messages, what="retained state")
        topic, payload, retained, _ = late.messages[0]
        assert retained and json.loads(payload)["online"] is True and json.loads(payload)["status"] == "running"
        telemetry = Subscriber(broker, "edgeopt/devices/dev1/telemetry", clean_session=True)
        telemetry.wait_for(lambda: telemetry.payloads("telemetry"), what="telemetry")
        t = telemetry.payloads("telemetry")[-1]
        for k in ("windows_in", "windows_out", "dropped", "batch_size_histogram", "latency_ms", "queue_depth",
                  "rss_bytes", "model"):
            assert k in t, k
        assert t["model"]["version"] == "3" and t["rss_bytes"] > 0 and t["latency_ms"]["p50_ms"] > 0
        agent.proc.kill()  # no clean DISCONNECT: the broker publishes the last will
        agent.communicate()
        late.wait_for(lambda: any(not json.loads(p)["online"] for _, p, _, _ in late.messages), timeout=15,
                      what="last will")
        late.close()
        telemetry.close()


def test_offline_broker_crash_loses_no_result_and_keeps_order(tmp_path, imu_model, state):
    """The broker is killed mid-stream and restarted 2.5 s later. The agent keeps inferring into its
    outbox and flushes it in order on reconnect: every window id arrives, first occurrences in order;
    a repeat is allowed only for messages that were in flight at the crash (counted by the agent as
    resent), and every drop counter stays 0.

    The broker gets SIGTERM, not SIGKILL: Mosquitto acknowledges a QoS 1 message once it is in its
    memory and writes its database to disk only every `autosave_interval`, so a SIGKILL can lose
    messages the broker itself had acknowledged (seen under load) — a broker durability limit the
    agent cannot see. For the agent both are the same fault: the connection drops mid-stream, with
    messages in flight, and the broker is unreachable until it restarts."""
    n_windows = len(window_labels(imu_model["stream"]))
    with Mosquitto(tmp_path) as broker:
        sub = Subscriber(broker, "edgeopt/devices/dev1/results", client_id="results-reader")
        cfg = mqtt_config(tmp_path, broker, agent={"exit_when_sources_end": True},
                          batching={"max_batch": 4, "max_wait_ms": 50, "overflow": "block"},
                          source=[{"type": "csv", "name": "imu", "path": str(imu_model["stream"]), "rate_hz": 1000.0}],
                          sink=[{"type": "mqtt"}])
        agent = AgentProcess(tmp_path, cfg)
        agent.wait_status(lambda s: s["telemetry"]["windows_out"] >= 30, what="30 windows")
        broker.stop()
        down = agent.wait_status(lambda s: not s["telemetry"]["mqtt"]["connected"], what="disconnect")
        time.sleep(2.5)
        during = agent.status()["telemetry"]
        assert during["windows_out"] > down["telemetry"]["windows_out"], "inference stopped while offline"
        assert during["outbox"]["pending"] > 0
        broker.start()
        assert agent.communicate(60) == 0, agent.err
        try:
            sub.wait_for(lambda: len(set(result_ids(sub))) >= n_windows, timeout=30, what="every result")
        finally:
            sub.close()
            missing = sorted({f"imu:{i}" for i in range(n_windows)} - set(result_ids(sub)),
                             key=lambda i: int(i.split(":")[1]))
            print("missing:", missing, "final:", json.dumps(agent.status()["telemetry"]["outbox"]),
                  json.dumps(agent.status()["telemetry"]["mqtt"]))
    ids = result_ids(sub)
    final = agent.status()["telemetry"]
    assert sum(final["dropped"].values()) == 0
    assert set(ids) == {f"imu:{i}" for i in range(n_windows)}
    first_seen = list(dict.fromkeys(ids))
    assert first_seen == sorted(first_seen, key=lambda i: int(i.split(":")[1])), "order not preserved"
    # repeats the agent caused (not the broker's own redelivery to this subscriber, flagged dup)
    sent = result_ids(sub, redeliveries=False)
    repeats = sum(c - 1 for c in Counter(sent).values())
    batch = cfg["batching"]["max_batch"]
    assert repeats <= final["outbox"]["resent_after_disconnect"] * batch
    assert final["mqtt"]["disconnects"] >= 1 and final["mqtt"]["connects"] >= 2
