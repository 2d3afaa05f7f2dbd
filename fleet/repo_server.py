"""Serves the signed repository to devices over MQTT: metadata files and artifact byte ranges.

Every request is validated (``edgeopt.protocol``); a malformed one is counted and logged and
never raises out of the handler. Requests ask for bounded chunks, so a device can resume a download
at any offset after a disconnect or a restart.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any

from edgeopt.fleet.repository import Repository
from edgeopt.protocol import (
    DEFAULT_CHUNK,
    MAX_CHUNK,
    ProtocolError,
    device_from_request_topic,
    response_topic,
)
from edgeopt.repo_frames import ChunkResponse, decode_request

log = logging.getLogger("edgeopt.fleet.repo")


class RepoServer:
    def __init__(self, repo: Repository, topics, prefix: str = "edgeopt", max_chunk: int = DEFAULT_CHUNK,
                 share: str | None = None):
        """``topics``: ``publish(topic, payload, qos)`` / ``subscribe(topic, handler(topic, payload))``;
        ``share``: the shared-subscription group of the replicas, so each request is answered once."""
        if not 1 <= max_chunk <= MAX_CHUNK:
            raise ValueError(f"max_chunk must be in [1, {MAX_CHUNK}]")
        self.repo, self.topics, self.prefix, self.max_chunk, self.share = repo, topics, prefix, max_chunk, share
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()

    def start(self) -> None:
        if self.share:
            self.topics.subscribe(f"{self.prefix}/repo/req/+", self.handle, share=self.share)
        else:
            self.topics.subscribe(f"{self.prefix}/repo/req/+", self.handle)

    def handle(self, topic: str, payload: bytes) -> ChunkResponse | None:
        """Answer one request; returns the response sent (or None when the request was rejected)."""
        try:
            device = device_from_request_topic(self.prefix, topic)
            req = decode_request(payload, self.max_chunk)
        except ProtocolError as exc:
            self._count("rejected")
            log.warning("rejected repository request on %s: %s", topic, exc)
            return None
        resp = self._answer(req)
        frame = resp.encode()
        self.topics.publish(response_topic(self.prefix, device), frame, qos=1)
        self._count("requests", errors=int(resp.error is not None), bytes_sent=len(resp.data),
                    payload_bytes=len(frame), request_bytes=len(payload))
        return resp

    def _answer(self, req) -> ChunkResponse:
        path = self.repo.file_for(req.path)
        if path is None:
            return ChunkResponse(req.id, req.path, error="not_found")
        try:
            with open(path, "rb") as f:
                f.seek(0, 2)
                total = f.tell()
                if req.offset > total:
                    return ChunkResponse(req.id, req.path, error="bad_offset")
                f.seek(req.offset)
                data = f.read(req.length)
        except OSError as exc:
            log.error("cannot read %s: %s", path, exc)
            return ChunkResponse(req.id, req.path, error="unavailable")
        return ChunkResponse(req.id, req.path, req.offset, total, data)

    def _count(self, key: str, **more: int) -> None:
        with self._lock:
            self.stats[key] += 1
            for k, v in more.items():
                self.stats[k] += v

    def snapshot_stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.stats)
