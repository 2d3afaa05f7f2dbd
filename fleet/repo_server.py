"""Serves the signed repository to devices over MQTT: metadata files and artifact byte ranges.

Every request is validated (``edgeopt.protocol``); a malformed one is counted and logged and
never raises out of the handler. Requests ask for bounded chunks, so a device can resume a download
at any offset after a disconnect or a restart.

Artifact chunks are *cast*: a device that asks with ``cast`` has subscribed to the chunk's topic
(``{prefix}/repo/cast/{sha256}/{grid}/{offset}``: the chunk of the device's chunk size, ``grid``, that
holds the offset asked for), and the server publishes the chunk there once, retained, with the next
ones (``CAST_AHEAD``); every later device gets it from the broker on subscribing. So a
wave of N devices costs the server each chunk about once instead of N times. A chunk asked for
``RECAST_S`` or more after its last cast goes out again (the broker, or a bridged one, may have lost
it: restarted without persistence), so its cost is bounded by time, not devices. Beside the chunks
a retained index (``castidx/{sha256}``) says until when the file stays: any server — a replica, or
this one after a crash — clears a file whose time is up (``sweep``), so the broker does not keep old
artifacts. Bytes from the broker are checked by TUF like any others (length and sha256).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from edgeopt.fleet.repository import Repository
from edgeopt.protocol import (
    CAST_ID,
    DEFAULT_CHUNK,
    MAX_CHUNK,
    ProtocolError,
    cast_grid,
    cast_index_topic,
    cast_key,
    cast_topic,
    check_int,
    device_from_request_topic,
    load_object,
    require,
    response_topic,
)
from edgeopt.repo_frames import ChunkRequest, ChunkResponse, decode_request

log = logging.getLogger("edgeopt.fleet.repo")
CAST_AHEAD = 16        # chunks cast on one request: the asked one and those after it
RECAST_S = 1.0         # a chunk cast this recently is on the broker: a request for it needs nothing
CAST_KEEP_S = 300.0    # a cast file nobody asked for this long is cleared from the broker


@dataclass
class _Cast:
    """One file being cast: when each chunk ((grid, offset)) was last published, on which grids, and
    the index's deadline."""

    sha: str
    total: int
    chunks: dict[tuple[int, int], float] = field(default_factory=dict)
    grids: set[int] = field(default_factory=set)
    until: float = 0.0  # wall clock, as published in the index


class RepoServer:
    def __init__(self, repo: Repository, topics, prefix: str = "edgeopt", max_chunk: int = DEFAULT_CHUNK,
                 share: str | None = None, cast: bool = True, keep_s: float = CAST_KEEP_S, clock=time.monotonic):
        """``topics``: ``publish(topic, payload, qos, retain)`` / ``subscribe(topic, handler(topic, payload))``;
        ``share``: the shared-subscription group of the replicas, so each request is answered once;
        ``cast``: multicast artifact chunks to the devices that ask for it (see the module docstring)."""
        if not 1 <= max_chunk <= MAX_CHUNK:
            raise ValueError(f"max_chunk must be in [1, {MAX_CHUNK}]")
        self.repo, self.topics, self.prefix, self.max_chunk, self.share = repo, topics, prefix, max_chunk, share
        self.cast, self.keep_s, self.clock = cast, keep_s, clock
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._casts: dict[str, _Cast] = {}       # repo path -> what this server cast
        self._indexes: dict[str, tuple[int, tuple[int, ...], float]] = {}  # sha -> (total, grids, until): every
        # cast file on the broker, as its index says

    def start(self) -> None:
        if self.cast:  # the retained indexes arrive now: what earlier servers left on the broker
            self.topics.subscribe(f"{self.prefix}/repo/castidx/+", self._on_index)
        if self.share:
            self.topics.subscribe(f"{self.prefix}/repo/req/+", self.handle, share=self.share)
        else:
            self.topics.subscribe(f"{self.prefix}/repo/req/+", self.handle)

    def handle(self, topic: str, payload: bytes) -> ChunkResponse | None:
        """Answer one request; returns the response sent (None when the request was rejected, or
        answered by a cast)."""
        try:
            device = device_from_request_topic(self.prefix, topic)
            req = decode_request(payload, self.max_chunk)
        except ProtocolError as exc:
            self._count("rejected")
            log.warning("rejected repository request on %s: %s", topic, exc)
            return None
        if req.cast and self.cast and self._cast(req, len(payload)):
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

    # -- casting -------------------------------------------------------------------------------------
    def _cast(self, req: ChunkRequest, request_bytes: int) -> bool:
        """Answer ``req`` on its cast topic; False when it needs an ordinary answer (an error, a grid
        this server does not cast on)."""
        sha, grid = cast_key(req.path), req.cast
        if sha is None or cast_grid(grid, self.max_chunk) != grid:
            return False
        path = self.repo.file_for(req.path)
        try:
            total = path.stat().st_size if path is not None else 0
        except OSError:
            return False
        if req.offset >= total:
            return False
        base = req.offset - req.offset % grid
        now, wall = self.clock(), time.time()
        with self._lock:
            c = self._casts.get(req.path)
            if c is None or c.total != total:
                c = self._casts[req.path] = _Cast(sha, total)
            # the asked chunk unless it went out just now (then the device has it: it listened before
            # asking), and the ones after it that never went out
            todo = [] if now - c.chunks.get((grid, base), -RECAST_S) < RECAST_S else [base]
            todo += [o for o in range(base + grid, min(total, base + CAST_AHEAD * grid), grid)
                     if (grid, o) not in c.chunks]
            for o in todo:
                c.chunks[grid, o] = now
            index = None
            if c.until < wall + self.keep_s / 2 or grid not in c.grids:
                c.grids.add(grid)
                index = c.until = wall + self.keep_s
                grids = sorted(c.grids)
        if index is not None:  # first, so that a sweeper never sees chunks without an index
            self.topics.publish(cast_index_topic(self.prefix, sha), json.dumps(
                {"path": req.path, "total": total, "grids": grids, "until": round(index, 3)}).encode(),
                qos=1, retain=True)
        sent = 0
        try:
            with open(path, "rb") as f:  # type: ignore[arg-type]
                for o in todo:
                    f.seek(o)
                    frame = ChunkResponse(CAST_ID, req.path, o, total, f.read(grid)).encode()
                    self.topics.publish(cast_topic(self.prefix, sha, grid, o), frame, qos=1, retain=True)
                    sent += len(frame)
        except OSError as exc:
            log.error("cannot read %s: %s", path, exc)
            with self._lock:
                for o in todo:
                    c.chunks.pop((grid, o), None)
            return False
        self._count("cast_requests", casts=len(todo), payload_bytes=sent, bytes_sent=sent,
                    request_bytes=request_bytes)
        return True

    def _on_index(self, topic: str, payload: bytes) -> None:
        sha = topic.rsplit("/", 1)[-1]
        if not payload:  # cleared
            with self._lock:
                self._indexes.pop(sha, None)
            return
        try:
            obj = load_object(payload, 4096, "cast index")
            require(cast_key(obj.get("path")) == sha, "path", "targets/SHA.NAME of this topic", obj.get("path"))
            total = check_int(obj.get("total"), "total", 1, 2**32)  # bounds the clearing
            grids = obj.get("grids")
            require(isinstance(grids, list) and 0 < len(grids) <= 9 and all(cast_grid(g) == g for g in grids),
                    "grids", "a list of chunk sizes (powers of two from 4 KiB to 1 MiB)", grids)
            until = obj.get("until")
            require(isinstance(until, int | float) and not isinstance(until, bool), "until", "a time", until)
        except ProtocolError as exc:
            self._count("rejected")
            log.warning("ignored a malformed cast index on %s: %s", topic, exc)
            return
        with self._lock:
            self._indexes[sha] = (total, tuple(grids), float(until))

    def sweep(self, wall: float | None = None) -> int:
        """Clear from the broker every cast file whose index has run out (this server's or any
        other's); returns how many. The fleet service calls it on its housekeeping tick."""
        wall = time.time() if wall is None else wall
        with self._lock:
            due = [(sha, total, grids) for sha, (total, grids, until) in self._indexes.items() if until < wall]
            for sha, _, _ in due:
                self._indexes.pop(sha, None)
            for path in [p for p, c in self._casts.items() if c.until < wall]:
                del self._casts[path]
        for sha, total, grids in due:
            self._clear(sha, total, grids)
        return len(due)

    def clear_all(self) -> int:
        """Clear every cast file this server published (a service that stops with no replica)."""
        with self._lock:
            mine = [(c.sha, c.total, tuple(c.grids)) for c in self._casts.values()]
            self._casts.clear()
        for sha, total, grids in mine:
            self._clear(sha, total, grids)
        return len(mine)

    def _clear(self, sha: str, total: int, grids) -> None:
        for grid in grids:
            for o in range(0, total, grid):  # an empty retained message deletes the retained one
                self.topics.publish(cast_topic(self.prefix, sha, grid, o), b"", qos=1, retain=True)
        self.topics.publish(cast_index_topic(self.prefix, sha), b"", qos=1, retain=True)
        self._count("casts_cleared")

    def _count(self, key: str, **more: int) -> None:
        with self._lock:
            self.stats[key] += 1
            for k, v in more.items():
                self.stats[k] += v

    def snapshot_stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.stats)
