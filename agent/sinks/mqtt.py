"""MQTT results: every batch becomes one message on {prefix}/devices/{id}/results, appended to the
on-disk outbox and sent from there in order by ``ResultPublisher`` (QoS 1, at most ``max_inflight``
unacknowledged), so results survive broker outages and agent restarts."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

from edgeopt.agent.outbox import Outbox
from edgeopt.agent.sinks.base import Sink

log = logging.getLogger("edgeopt.agent.results")


class ResultPublisher:
    """Drains the outbox to the broker while connected. paho calls ``on_ack`` on its network thread
    while holding its own lock, so acknowledgements are only queued there and processed here."""

    def __init__(self, transport, outbox: Outbox, max_inflight: int):
        self.transport = transport
        self.outbox = outbox
        self.max_inflight = max_inflight
        self.resent = 0  # messages in flight at a disconnect: paho sends them again (possible duplicates)
        self._mid_seq: dict[int, int] = {}
        self._acks: collections.deque[int] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        transport.on_ack = self._on_ack
        transport.on_disconnect_hooks.append(self._on_disconnect)
        transport.on_connect_hooks.append(self.wake)
        self._thread = threading.Thread(target=self._run, name="results-publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _on_ack(self, mid: int) -> None:
        self._acks.append(mid)
        self._wake.set()

    def _on_disconnect(self) -> None:
        self.resent += len(self._mid_seq)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
            self._pump()

    def _pump(self) -> None:
        while self._acks:
            seq = self._mid_seq.pop(self._acks.popleft(), None)
            if seq is not None:
                self.outbox.ack(seq)
        if self.transport.connected.is_set():
            room = self.max_inflight - len(self._mid_seq)
            if room > 0:
                for entry in self.outbox.next_unsent(room):
                    self._mid_seq[self.transport.publish(entry.topic, entry.payload, qos=1)] = entry.seq
        if not self._mid_seq and self.outbox.unsent == 0:
            self._idle.set()
        else:
            self._idle.clear()

    def drain(self, timeout: float) -> bool:
        """Wait until every result is acknowledged (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        self.wake()
        while time.monotonic() < deadline:
            if self.outbox.pending == 0:
                return True
            self.wake()
            time.sleep(0.02)
        return self.outbox.pending == 0

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(1.0)

    def stats(self) -> dict[str, Any]:
        return {"pending": self.outbox.pending, "inflight": len(self._mid_seq), "bytes": self.outbox.size_bytes,
                "dropped": self.outbox.dropped, "acked": self.outbox.acked, "resent_after_disconnect": self.resent}


class MqttResultsSink(Sink):
    kind = "mqtt"

    def __init__(self, topic: str, outbox: Outbox, publisher: ResultPublisher):
        self.topic = topic
        self.outbox = outbox
        self.publisher = publisher

    def write(self, results) -> None:
        self.outbox.append(self.topic, results.message())
        self.publisher.wake()

    def stats(self) -> dict[str, Any]:
        return self.publisher.stats()
