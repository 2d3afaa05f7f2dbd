"""Request/response over MQTT to the repository server (one outstanding request at a time)."""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from typing import Protocol

from edgeopt.repo_protocol import (
    ChunkRequest,
    ChunkResponse,
    ProtocolError,
    decode_response,
    request_topic,
    response_topic,
)

log = logging.getLogger("edgeopt.agent.update")


class RepoLink(Protocol):
    def request(self, path: str, offset: int, length: int, timeout: float) -> ChunkResponse | None:
        """One chunk, or None when no valid answer came within ``timeout`` seconds."""


class Topics(Protocol):
    """What the link needs from an MQTT connection (edgeopt.mqtt.PahoTopics, the agent's transport)."""

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> object: ...

    def subscribe(self, topic: str, handler) -> None: ...


class MqttRepoLink:
    """Publishes chunk requests on ``{prefix}/repo/req/{device}`` and waits for the matching response.

    Responses that do not decode, or that answer an older request, are counted and dropped; the
    caller sees a timeout and retries.
    """

    def __init__(self, topics: Topics, device_id: str, prefix: str = "edgeopt", max_chunk: int = 1 << 20):
        self.topics, self.device_id, self.prefix, self.max_chunk = topics, device_id, prefix, max_chunk
        self._responses: queue.Queue[ChunkResponse] = queue.Queue()
        self._lock = threading.Lock()
        self.dropped = 0
        topics.subscribe(response_topic(prefix, device_id), lambda topic, payload: self._on_response(payload))

    def _on_response(self, payload: bytes) -> None:
        try:
            self._responses.put(decode_response(payload, self.max_chunk))
        except ProtocolError as exc:
            self.dropped += 1
            log.warning("dropped malformed repository response: %s", exc)

    def request(self, path: str, offset: int, length: int, timeout: float) -> ChunkResponse | None:
        with self._lock:
            req = ChunkRequest(uuid.uuid4().hex[:16], path, offset, length)
            while not self._responses.empty():  # stale answers to requests that timed out
                self._responses.get_nowait()
                self.dropped += 1
            self.topics.publish(request_topic(self.prefix, self.device_id), req.encode(), qos=1)
            try:
                while True:
                    resp = self._responses.get(timeout=timeout)
                    if resp.id == req.id and resp.path == path:
                        return resp
                    self.dropped += 1
            except queue.Empty:
                return None
