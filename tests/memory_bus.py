"""An in-process stand-in for an MQTT broker, for unit tests of what talks over one: the repository link
and server (python-tuf's fetcher over chunks), without Mosquitto.

Each ``client()`` offers the ``publish`` / ``subscribe(topic, handler(topic, payload))`` interface of
``edgeopt.mqtt.PahoTopics``. Messages are delivered in publish order on one thread, as paho delivers
on its network thread, to every subscription whose filter matches (``+`` one level, ``#`` the rest).
Retained messages and QoS are not modelled: the repository protocol uses neither. The Mosquitto
integration tests cover the real broker.
"""

from __future__ import annotations

import queue
import threading


def matches(topic_filter: str, topic: str) -> bool:
    want, got = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(want):
        if part == "#":
            return True
        if i >= len(got) or (part != "+" and part != got[i]):
            return False
    return len(want) == len(got)


class MemoryBus:
    def __init__(self) -> None:
        self._subscriptions: list[tuple[str, object]] = []
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self.delivered = 0
        self._thread = threading.Thread(target=self._deliver, name="memory-bus", daemon=True)
        self._thread.start()

    def client(self, payload_only: bool = False) -> MemoryTopics:
        return MemoryTopics(self, payload_only)

    def publish(self, topic: str, payload: bytes) -> None:
        self._queue.put((topic, bytes(payload)))

    def subscribe(self, topic_filter: str, handler) -> None:
        with self._lock:
            self._subscriptions.append((topic_filter, handler))

    def _deliver(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            topic, payload = item
            with self._lock:
                handlers = [h for f, h in self._subscriptions if matches(f, topic)]
            for handler in handlers:
                handler(topic, payload)
            self.delivered += 1

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)


class MemoryTopics:
    """One client's view of the bus: ``PahoTopics``' interface (handlers take the topic and the
    payload), or with ``payload_only`` the agent transport's (handlers take the payload)."""

    def __init__(self, bus: MemoryBus, payload_only: bool = False):
        self.bus, self.payload_only = bus, payload_only

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.bus.publish(topic, payload)

    def subscribe(self, topic: str, handler) -> None:
        self.bus.subscribe(topic, (lambda _topic, payload: handler(payload)) if self.payload_only else handler)
