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
