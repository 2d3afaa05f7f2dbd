"""A simulated device follows only its own ``desired`` topic: some brokers (amqtt 0.12) hand a
connecting client other devices' retained messages, and a device that obeyed them would update
outside any rollout."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from edgeopt.fleet.simulator import SimConfig, SimDevice, Simulator
from edgeopt.protocol import Desired, ModelRef, encode_desired


@dataclass
class Message:  # what paho hands on_message
    topic: str
    payload: bytes


@pytest.fixture
def devices():
    sim = Simulator(SimConfig(broker="mqtt://127.0.0.1:1", devices=2))  # never started: nothing connects
    mine, other = SimDevice(sim, 0), SimDevice(sim, 1)
    yield mine, other
    sim.pool.shutdown(wait=False)


def _told(device) -> list[Desired]:
    seen: list[Desired] = []
    device.on_desired = seen.append
    return seen


def test_another_devices_retained_desired_is_ignored(devices):
    mine, other = devices
    told = _told(mine)
    payload = encode_desired(ModelRef("kws", "2"), "r-1")
    mine._on_message(None, None, Message(f"edgeopt/devices/{other.device_id}/desired", payload))
    assert told == [] and mine.stats["wrong_topic"] == 1
    mine._on_message(None, None, Message(f"edgeopt/devices/{mine.device_id}/desired", payload))
    assert told == [Desired(ModelRef("kws", "2"), "r-1")]


def test_a_lookalike_topic_is_not_the_devices_own(devices):
    mine, _ = devices
    told = _told(mine)
    payload = encode_desired(ModelRef("kws", "2"), None)
    for topic in (f"edgeopt/devices/x{mine.device_id}/desired", f"other/devices/{mine.device_id}/desired",
                  f"edgeopt/devices/{mine.device_id}/desired/x", f"edgeopt/repo/resp/{mine.device_id}x"):
        mine._on_message(None, None, Message(topic, payload))
    assert told == [] and mine.stats["wrong_topic"] == 4


def test_a_malformed_desired_is_counted_by_reason(devices):
    mine, _ = devices
    told = _told(mine)
    mine._on_message(None, None, Message(f"edgeopt/devices/{mine.device_id}/desired",
                                         b'{"name": "kws", "version": "2\\n"}'))
    assert told == [] and mine.stats["rejected_desired_bad_version"] == 1


class FakeLoop:
    """The simulator's ``call_later`` on a clock the test moves."""

    def __init__(self):
        import itertools

        self.now, self.queue, self.seq = 0.0, [], itertools.count()

    def call_later(self, delay, fn):
        import heapq

        heapq.heappush(self.queue, (self.now + delay, next(self.seq), fn))

    def run_until(self, t: float) -> None:
        import heapq

        while self.queue and self.queue[0][0] <= t:
            self.now, _, fn = heapq.heappop(self.queue)
            fn()


def test_every_simulated_device_sends_telemetry_at_its_interval():
    from collections import Counter

    sim = Simulator(SimConfig(broker="mqtt://127.0.0.1:1", devices=3, telemetry_interval=1.0))
    sim.devices = [SimDevice(sim, i) for i in range(3)]
    sent: Counter[str] = Counter()
    for d in sim.devices:
        d.publish_telemetry = lambda d=d: sent.update([d.device_id])
    sim.loop = FakeLoop()
    sim._schedule_telemetry()
    sim.loop.run_until(10.0)
    sim.pool.shutdown(wait=False)
    # each device on its own timer (once, all the timers but the first ended up ticking the last device)
    assert all(9 <= sent[d.device_id] <= 10 for d in sim.devices), sent
