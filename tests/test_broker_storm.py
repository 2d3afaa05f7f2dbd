"""A reconnect storm against the local brokers ``edgeopt fleet serve`` can start (fleet/broker.py):
200 paho clients connect, subscribe to their own retained ``desired``, report, receive a live
update and disconnect, all at once, three rounds in a row.

What must hold, on every broker the service may pick:
- no connection is dropped by the broker (nor refused) -- iotcore excepted, within limits (below);
- a client receives only its own topic (no other device's retained ``desired``), and the retained
  message it gets on connecting is the latest one for its topic;
- every QoS 1 message is delivered: each device's report reaches the fleet client, and each live
  ``desired`` the fleet client sends in answer reaches its device.

No timing is asserted: a round ends when everything arrived, or fails after a generous deadline.
Run as a script to measure a broker: ``python tests/test_broker_storm.py iotcore``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from edgeopt.fleet.broker import available, start_local_broker

DEVICES, ROUNDS = 200, 3
PREFIX = "storm"
ROUND_DEADLINE = 60.0


def desired_topic(device: str) -> str:
    return f"{PREFIX}/devices/{device}/desired"


@dataclass
class StormReport:
    dropped: list[str] = field(default_factory=list)     # "device round: why"
    stray: list[str] = field(default_factory=list)       # "device got topic"
    stale: list[str] = field(default_factory=list)       # retained desired older than the latest
    missing_reports: list[str] = field(default_factory=list)
    missing_updates: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def problems(self) -> dict[str, int]:
        return {k: len(v) for k, v in vars(self).items() if isinstance(v, list) and v}


def _client(client_id: str):
    import paho.mqtt.client as mqtt

    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                       protocol=mqtt.MQTTv311)


class Fleet:
    """The fleet side: retained ``desired`` per device; answers each report with the next round's
    ``desired`` (QoS 1, retained), and records every report."""

    def __init__(self, host: str, port: int, devices: list[str]):
        self.reports: Counter[tuple[str, int]] = Counter()
        self.lock = threading.Lock()
        self.client = _client("storm-fleet")
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_report
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        self.client.subscribe(f"{PREFIX}/devices/+/state", qos=1)
        assert subscribed.wait(10), "the fleet client's subscription was not acknowledged"
        infos = [self.client.publish(desired_topic(d), json.dumps({"device": d, "round": 0}), qos=1, retain=True)
                 for d in devices]
        for info in infos:
            info.wait_for_publish(30)

    def _on_report(self, client, userdata, msg) -> None:
        report = json.loads(msg.payload)
        with self.lock:
            self.reports[(report["device"], report["round"])] += 1
        client.publish(desired_topic(report["device"]),
                       json.dumps({"device": report["device"], "round": report["round"] + 1}), qos=1, retain=True)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _device_round(host: str, port: int, device: str, rnd: int, report: StormReport, start: threading.Barrier,
                  heal: bool) -> None:
    """One device, one round: connect, subscribe, get its retained desired (round ``rnd``), report,
    get the live desired for round ``rnd + 1``, disconnect. ``heal``: after a drop, reconnect (as
    every edgeopt client does) and carry on; the drop is still recorded."""
    got_retained, got_update, done = threading.Event(), threading.Event(), threading.Event()
    leaving = threading.Event()
    client = _client(device)

    def on_connect(c, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            report.dropped.append(f"{device} round {rnd}: refused ({reason_code})")
            done.set()
            return
        c.subscribe(desired_topic(device), qos=1)

    def on_message(c, userdata, msg):
        body = json.loads(msg.payload)
        if msg.topic != desired_topic(device) or body.get("device") != device:
            report.stray.append(f"{device} got {msg.topic}")
            return
        if not got_retained.is_set():
            if body["round"] != rnd:
                report.stale.append(f"{device} round {rnd}: retained desired of round {body['round']}")
            got_retained.set()
            c.publish(f"{PREFIX}/devices/{device}/state", json.dumps({"device": device, "round": rnd}), qos=1)
        elif body["round"] == rnd + 1:  # live, or retained again after a reconnect
            got_update.set()

    def on_disconnect(c, userdata, flags, reason_code, properties):
        if not leaving.is_set():
            report.dropped.append(f"{device} round {rnd}: disconnected by the broker ({reason_code})")
            if not heal:
                done.set()

    client.on_connect, client.on_message, client.on_disconnect = on_connect, on_message, on_disconnect
    if heal:
        client.reconnect_delay_set(0.05, 0.5)
    else:
        client.reconnect_delay_set(60, 60)  # a drop must show as a drop, not heal itself
    start.wait()
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        report.dropped.append(f"{device} round {rnd}: cannot connect ({exc})")
        return
    client.loop_start()
    deadline = time.monotonic() + ROUND_DEADLINE
    while not (got_update.is_set() or done.is_set()) and time.monotonic() < deadline:
        got_update.wait(0.2)
    if not got_update.is_set() and not done.is_set():
        report.missing_updates.append(f"{device} round {rnd}: " + (
            "no retained desired" if not got_retained.is_set() else f"no live desired for round {rnd + 1}"))
    leaving.set()
    client.disconnect()
    client.loop_stop()


def run_storm(host: str, port: int, devices: int = DEVICES, rounds: int = ROUNDS, heal: bool = False) -> StormReport:
    names = [f"dev-{i:04d}" for i in range(devices)]
    report = StormReport()
    started = time.monotonic()
    fleet = Fleet(host, port, names)
    try:
        for rnd in range(rounds):
            start = threading.Barrier(devices)
            threads = [threading.Thread(target=_device_round, args=(host, port, d, rnd, report, start, heal),
                                        daemon=True)
                       for d in names]
            for t in threads:
                t.start()
            for t in threads:
                t.join(ROUND_DEADLINE + 30)
        time.sleep(0.2)  # the last reports' callbacks
        with fleet.lock:
            report.missing_reports = [f"{d} round {r}" for d in names for r in range(rounds)
                                      if fleet.reports[(d, r)] == 0]
    finally:
        fleet.close()
    report.seconds = time.monotonic() - started
    return report


# amqtt 0.12 is kept as the service's last resort and shown failing here (it takes ~6 s): measured on
# this machine, one storm dropped 139 of 600 connections, delivered 3,646 messages to clients whose topic
# they were not (other devices' retained desired) and lost the reports of the dropped clients.
AMQTT_FAILS = pytest.mark.xfail(strict=True, reason="amqtt 0.12 drops clients that connect while another "
                                "subscribes and sends retained messages to the wrong clients")
# iotcore 0.4.0 embeds rumqttd 0.20, which can drop a client right after CONNACK or SUBACK: when a client
# ends with a DISCONNECT packet, the router frees its connection id, and the link then reports the
# closed socket as a second disconnect of that id -- which a new connection may hold by then
# (rumqttd/src/server/broker.rs, remote(); unchanged upstream). Measured here: 0 of 12,000
# connections idle, about 1 in 5,000 on a loaded machine. Its clients reconnect (edgeopt's all do), so
# it is held to everything but the drops, and to at most 1 % of them.
HEALING = {"iotcore"}


def _check(kind: str, report: StormReport) -> None:
    shown = {k: v[:5] for k, v in vars(report).items() if isinstance(v, list) and v}
    if kind in HEALING:
        problems = {k: n for k, n in report.problems().items() if k != "dropped"}
        assert problems == {} and len(report.dropped) <= DEVICES * ROUNDS // 100, shown
    else:
        assert report.problems() == {}, shown


@pytest.mark.parametrize("kind", [pytest.param("auto", id="default"), "mosquitto", "iotcore",
                                  pytest.param("amqtt", marks=AMQTT_FAILS)])
def test_reconnect_storm_loses_nothing(kind):
    if kind != "auto" and not available()[kind]:
        pytest.skip(f"the {kind} broker is not installed here")
    broker = start_local_broker("127.0.0.1:0", kind)
    try:
        report = run_storm("127.0.0.1", broker.port, heal=broker.kind in HEALING)
    finally:
        broker.stop()
    _check(broker.kind, report)


if __name__ == "__main__":  # python tests/test_broker_storm.py [auto|mosquitto|iotcore|amqtt] [devices]
    kind = sys.argv[1] if len(sys.argv) > 1 else "auto"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else DEVICES
    b = start_local_broker("127.0.0.1:0", kind)
    try:
        r = run_storm("127.0.0.1", b.port, n, heal=b.kind in HEALING)
    finally:
        b.stop()
    print(json.dumps({"broker": b.describe(), "devices": n, "rounds": ROUNDS, "seconds": round(r.seconds, 1),
                      "problems": r.problems(), "examples": {k: v[:3] for k, v in vars(r).items()
                                                             if isinstance(v, list) and v}}, indent=1))
