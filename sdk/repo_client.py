"""The device's client of the signed repository, shared by the agent's updater and the fleet
simulator: request/response over MQTT (``MqttRepoLink``), python-tuf's fetcher over it
(``MqttFetcher``, resumable by offset) and the trusted view of the repository (``DeviceTrust``).

TUF decides what to download and verifies it (signatures, thresholds, versions, expiry, length,
hashes); the link and the fetcher only move bytes. An artifact download keeps its bytes in a
``.part`` file named after the target path (which carries the sha256, so different content never
shares a part file): after a disconnect or a restart the download continues from the bytes already
on disk, and the bytes it re-reads from there go through TUF's length/hash check like the rest.

The device trusts only its pinned root (``metadata/root.json``, written at provisioning) and what
chains to it; the trusted metadata is kept on disk so a restart cannot be fed older metadata
either. A model version is installable only if it is in the signed targets (the allow-list).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tuf.api.exceptions import DownloadError, DownloadHTTPError
from tuf.ngclient import FetcherInterface

from edgeopt.delta import CODEC, CODECS, DeltaError, apply_delta, delta_path, sha256
from edgeopt.errors import EdgeoptError, RemoteError, UserInputError
from edgeopt.fsutil import atomic_write_bytes
from edgeopt.protocol import (
    CAST_CHUNK,
    CAST_ID,
    DEFAULT_CHUNK,
    MAX_CHUNK,
    ProtocolError,
    cast_grid,
    cast_key,
    cast_topic,
    request_topic,
    response_topic,
    target_path,
)
from edgeopt.repo_frames import ChunkRequest, ChunkResponse, decode_response

log = logging.getLogger("edgeopt.repo_client")
URL_SCHEME = "edgeopt-repo:"
READ_PIECE = 1 << 20
# Whether the broker holds a chunk: its retained message comes one round trip after subscribing, so
# listen that long -- 1.5 x the link's measured request/response time, at least CAST_WAIT_S -- then
# ask. The server ignores a request for a chunk it cast just now: a short guess costs the request only.
CAST_WAIT_S = 0.05


# -- request/response over MQTT (one outstanding request at a time) ------------------------------------------
class RepoLink(Protocol):
    def request(self, path: str, offset: int, length: int, timeout: float) -> ChunkResponse | None:
        """One chunk, or None when no valid answer came within ``timeout`` seconds."""


class Topics(Protocol):
    """What the link needs from an MQTT connection (edgeopt.mqtt.PahoTopics, the agent's transport)."""

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> object: ...

    def subscribe(self, topic: str, handler) -> None: ...

    # optional: with it, artifact chunks come by cast (``unsubscribe(topic)``)


class MqttRepoLink:
    """Publishes chunk requests on ``{prefix}/repo/req/{device}`` and waits for the matching response.

    An artifact chunk is taken from its cast topic (see fleet/repo_server.py) when the topics can
    unsubscribe: subscribe to the chunk's topic, then ask with ``cast``; the chunk comes from the
    broker (retained, when another device had it cast) or from the server's cast, and an older server
    answers on the response topic as before. ``distrust_cast(path)`` turns casting off for a file
    whose cast bytes failed verification, so the retry comes from the server itself.

    Responses that do not decode are refused (``on_rejected(error)`` is told, e.g. the agent's
    rejected-message counter); those that answer an older request are dropped. Both are counted in
    ``dropped``; the caller sees a timeout and retries.
    """

    def __init__(self, topics: Topics, device_id: str, prefix: str = "edgeopt", max_chunk: int = MAX_CHUNK,
                 on_rejected: Callable[[ProtocolError], None] | None = None, cast: bool = True,
                 cast_chunk: int = CAST_CHUNK, cast_wait: float = CAST_WAIT_S):
        """``cast_chunk``: the chunk size the fetcher asks for (the cast grid is the power of two at or
        below it); ``cast_wait``: how long at least to listen for a chunk already on the broker before
        asking."""
        self.topics, self.device_id, self.prefix, self.max_chunk = topics, device_id, prefix, max_chunk
        self.on_rejected = on_rejected
        grid = cast_grid(cast_chunk, max_chunk)
        self.grid = grid if cast and grid and callable(getattr(topics, "unsubscribe", None)) else 0
        self.cast_wait = cast_wait
        self.rtt: float | None = None  # seconds from a request to its answer (moving average)
        self._responses: queue.Queue[ChunkResponse] = queue.Queue()
        self._lock = threading.Lock()
        self.dropped = 0
        self.cast_chunks = 0  # chunks that came by cast
        self._cast_paths: set[str] = set()
        self._no_cast: set[str] = set()
        topics.subscribe(response_topic(prefix, device_id), lambda topic, payload: self._on_response(payload))

    def _on_response(self, payload: bytes) -> None:
        try:
            self._responses.put(decode_response(payload, self.max_chunk))
        except ProtocolError as exc:
            self.dropped += 1
            log.warning("dropped malformed repository response: %s", exc)
            if self.on_rejected is not None:
                self.on_rejected(exc)

    def _on_cast(self, topic: str, payload: bytes) -> None:
        if payload:  # empty: a cast being cleared from the broker (a grid is never above max_chunk)
            self._on_response(payload)

    def distrust_cast(self, path: str) -> bool:
        """Fetch ``path`` from the server from now on; True if some of it had come by cast."""
        self._no_cast.add(path)
        return path in self._cast_paths

    def request(self, path: str, offset: int, length: int, timeout: float) -> ChunkResponse | None:
        sha = cast_key(path) if self.grid and path not in self._no_cast else None
        grid = self.grid if sha else 0
        with self._lock:
            req = ChunkRequest(uuid.uuid4().hex[:16], path, offset, length, cast=grid)
            while not self._responses.empty():  # stale answers to requests that timed out
                self._responses.get_nowait()
                self.dropped += 1
            base = offset - offset % grid if grid else None
            topic = cast_topic(self.prefix, sha, grid, base) if sha else None  # type: ignore[arg-type]
            resp = None
            if topic:  # before the request: the cast cannot go out before we listen
                self.topics.subscribe(topic, self._on_cast)
            try:
                if topic:  # on the broker already (another device had it cast): no request at all
                    resp = self._wait(req, base, min(max(self.cast_wait, 1.5 * (self.rtt or 0.0)), timeout / 2))
                if resp is None:
                    sent = time.monotonic()
                    self.topics.publish(request_topic(self.prefix, self.device_id), req.encode(), qos=1)
                    resp = self._wait(req, base, timeout)
                    if resp is not None:
                        took = time.monotonic() - sent
                        self.rtt = took if self.rtt is None else 0.8 * self.rtt + 0.2 * took
            finally:
                if topic:
                    self.topics.unsubscribe(topic)  # type: ignore[attr-defined]
        if resp is None or resp.id != CAST_ID:
            if resp is not None and grid and resp.error is None:
                self._no_cast.add(path)  # the server answered alone: it does not cast (--unicast, older)
            return resp
        self.cast_chunks += 1
        self._cast_paths.add(path)
        start = offset - base  # type: ignore[operator]
        return ChunkResponse(req.id, path, offset, resp.total, resp.data[start:start + length])

    def _wait(self, req: ChunkRequest, base: int | None, timeout: float) -> ChunkResponse | None:
        deadline = time.monotonic() + timeout
        try:
            while True:
                resp = self._responses.get(timeout=max(0.0, deadline - time.monotonic()))
                if resp.path == req.path and (resp.id == req.id or (
                        base is not None and resp.id == CAST_ID and resp.offset == base and resp.error is None
                        and base <= req.offset < base + len(resp.data))):
                    return resp
                self.dropped += 1
        except queue.Empty:
            return None


# -- python-tuf's fetcher over the link -----------------------------------------------------------------------
def url_for(kind: str) -> str:
    """Base URL for python-tuf: ``edgeopt-repo:metadata/`` or ``edgeopt-repo:targets/``."""
    return f"{URL_SCHEME}{kind}/"


class MqttFetcher(FetcherInterface):
    def __init__(self, link: RepoLink, *, chunk_size: int = DEFAULT_CHUNK, timeout: float = 5.0,
                 retries: int = 8, max_total: int = 2 * 2**30, partial_dir: Path | None = None,
                 backoff: float = 0.5):
        self.link, self.chunk_size, self.timeout, self.retries = link, chunk_size, timeout, retries
        self.max_total, self.backoff = max_total, backoff
        self.partial_dir = Path(partial_dir) if partial_dir else None
        self.stats: Counter[str] = Counter()  # bytes_network, bytes_resumed, requests, retries, cast_refused

    def partial_path(self, repo_path: str) -> Path | None:
        if self.partial_dir is None or not repo_path.startswith("targets/"):
            return None
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        return self.partial_dir / (repo_path.split("/", 1)[1] + ".part")

    def discard_partial(self, repo_path: str) -> None:
        part = self.partial_path(repo_path)
        if part is not None:
            part.unlink(missing_ok=True)

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(URL_SCHEME):
            raise DownloadError(f"unsupported URL {url!r}")
        return self._chunks(url[len(URL_SCHEME):])

    def _request(self, path: str, offset: int, length: int):
        for attempt in range(self.retries + 1):
            self.stats["requests"] += 1
            resp = self.link.request(path, offset, length, self.timeout)
            if resp is not None:
                return resp
            self.stats["retries"] += 1
            time.sleep(min(self.backoff * 2**attempt, 10.0))
        why = getattr(self.link, "last_error", None)  # an HTTP link says why (edgeopt.repo_http)
        raise DownloadError(f"no answer from the repository for {path} at offset {offset} "
                            f"after {self.retries + 1} attempts{f': {why}' if why else ''}")

    def _chunk(self, path: str, offset: int, total: int | None):
        want = self.chunk_size if total is None else max(1, min(self.chunk_size, total - offset))
        resp = self._request(path, offset, want)
        if resp.error == "not_found":
            raise DownloadHTTPError(f"{path} not found in the repository", 404)
        if resp.error is not None:
            raise DownloadError(f"repository error for {path}: {resp.error}")
        if resp.offset != offset:
            raise DownloadError(f"{path}: asked for offset {offset}, got a chunk at {resp.offset}")
        if len(resp.data) > want:
            raise DownloadError(f"{path}: asked for {want} bytes, got {len(resp.data)}")
        if resp.total > self.max_total:
            raise DownloadError(f"{path}: {resp.total} bytes exceeds the download cap {self.max_total}")
        if total is not None and resp.total != total:
            raise DownloadError(f"{path}: size changed during the download ({total} → {resp.total})")
        if not resp.data and offset < resp.total:
            raise DownloadError(f"{path}: empty chunk at offset {offset} of {resp.total}")
        return resp

    def _chunks(self, path: str) -> Iterator[bytes]:
        part = self.partial_path(path)
        offset, total, first = 0, None, None
        if part is not None and part.is_file() and part.stat().st_size > 0:
            have = part.stat().st_size
            try:
                first = self._chunk(path, have, None)  # learn the size before trusting the part file
            except DownloadError:
                first = None
            if first is not None and first.total >= have:
                with open(part, "rb") as f:
                    while piece := f.read(READ_PIECE):
                        self.stats["bytes_resumed"] += len(piece)
                        yield piece
                offset, total = have, first.total
            else:
                part.unlink(missing_ok=True)
                first = None
        with open(part, "ab") if part is not None else contextlib.nullcontext() as out:
            while total is None or offset < total:
                resp = first if first is not None else self._chunk(path, offset, total)
                first = None
                total = resp.total
                if out is not None:
                    out.write(resp.data)
                    out.flush()
                    os.fsync(out.fileno())
                self.stats["bytes_network"] += len(resp.data)
                offset += len(resp.data)
                if resp.data:
                    yield resp.data


# -- the device's trusted view of the repository ------------------------------------------------------------
class UpdateRefused(EdgeoptError):
    """The repository or the request failed a security check; nothing is installed. ``reason`` is a
    short machine-readable word for the state topic, the message says what exactly."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class ModelTarget:
    path: str
    name: str
    version: str
    length: int
    sha256: str
    custom: dict[str, Any]


# python-tuf exception → our reason word. Order matters: subclasses first.
def _reason(exc: Exception) -> str:
    from tuf.api import exceptions as e

    for cls, word in ((e.ExpiredMetadataError, "expired"), (e.BadVersionNumberError, "rollback"),
                      (e.UnsignedMetadataError, "bad_signature"), (e.LengthOrHashMismatchError, "hash_mismatch"),
                      (e.DownloadLengthMismatchError, "oversized"), (e.RepositoryError, "repository_invalid"),
                      (e.DownloadError, "download_failed")):
        if isinstance(exc, cls):
            return word
    return "error"


class DeviceTrust:
    def __init__(self, metadata_dir: Path, fetcher: MqttFetcher, download_dir: Path):
        self.metadata_dir, self.fetcher, self.download_dir = Path(metadata_dir), fetcher, Path(download_dir)
        if not (self.metadata_dir / "root.json").is_file():
            raise UserInputError(f"no pinned root: {self.metadata_dir / 'root.json'} is missing (provision the device)")
        self.download_dir.mkdir(parents=True, exist_ok=True)
        self._updater = None
        self.delta_stats: Counter[str] = Counter()  # applied, none, refused, bytes, bytes_saved

    def _new_updater(self):
        from tuf.ngclient import Updater, UpdaterConfig

        # targets metadata of a fleet stays small; artifacts are capped by their signed length
        config = UpdaterConfig(prefix_targets_with_hash=True)
        return Updater(str(self.metadata_dir), url_for("metadata"), str(self.download_dir), url_for("targets"),
                       fetcher=self.fetcher, config=config, bootstrap=None)

    def refresh(self) -> None:
        """Load the newest trusted metadata; raises ``UpdateRefused`` on any security failure."""
        from tuf.api import exceptions as e

        self._updater = self._new_updater()
        try:
            self._updater.refresh()
        except e.DownloadError as exc:
            self._updater = None
            raise RemoteError(f"repository unreachable: {exc}") from exc
        except e.RepositoryError as exc:
            self._updater = None
            raise UpdateRefused(_reason(exc), f"repository metadata refused: {exc}") from exc

    def lookup(self, name: str, version: str) -> ModelTarget:
        """The signed target for NAME@VERSION; ``UpdateRefused('not_allowed')`` if it is not signed."""
        if self._updater is None:
            self.refresh()
        try:
            path = target_path(name, version)
        except ProtocolError as exc:
            raise UpdateRefused("bad_name", str(exc)) from exc
        info = self._updater.get_targetinfo(path)
        if info is None:
            raise UpdateRefused("not_allowed", f"{name}@{version} is not in the signed targets (never published, "
                                               f"or revoked)")
        custom = info.custom or {}
        if custom.get("name") != name or custom.get("version") != version:
            raise UpdateRefused("repository_invalid", f"signed target {path} describes {custom.get('name')}@"
                                                      f"{custom.get('version')}")
        return ModelTarget(path, name, version, info.length, info.hashes["sha256"], custom)

    def download(self, target: ModelTarget, base: Callable[[], bytes | None] | None = None) -> Path:
        """Download (resuming a partial download) and verify length + sha256; the verified file path.

        With ``base`` (what the device runs, as the packed artifact, or None when it cannot say): first
        look for a signed delta from that base (``edgeopt.delta``), and build the artifact from it; any
        problem with the delta — none published, a base that is not what it was made from, a damaged
        delta, a result that is not the signed artifact — falls back to the full download."""
        if base is not None and (path := self._via_delta(target, base)) is not None:
            return path
        return self._download_full(target)

    def _via_delta(self, target: ModelTarget, base: Callable[[], bytes | None]) -> Path | None:
        from tuf.api import exceptions as e

        base_bytes = base()
        if not base_bytes:
            return None
        base_sha = sha256(base_bytes)
        info = self._updater.get_targetinfo(delta_path(target.name, target.version, base_sha))
        if info is None:
            self.delta_stats["none"] += 1
            return None
        d = (info.custom or {}).get("delta") or {}
        if (d.get("name"), d.get("version"), d.get("base_sha256"), d.get("full_sha256"), d.get("full_length")) != (
                target.name, target.version, base_sha, target.sha256, target.length):
            log.warning("delta %s names another base or result than %s: full download", info.path, target.path)
            self.delta_stats["refused"] += 1
            return None
        if d.get("codec", CODEC) not in CODECS:  # a newer publisher's kind: not worth fetching
            log.warning("delta %s is of a kind this agent cannot apply (%s): full download", info.path, d.get("codec"))
            self.delta_stats["none"] += 1
            return None
        repo_path = f"targets/{info.hashes['sha256']}.{info.path}"
        try:
            patch = Path(self._updater.download_target(info, str(self.download_dir / info.path))).read_bytes()
        except (e.LengthOrHashMismatchError, e.DownloadLengthMismatchError) as exc:
            self.fetcher.discard_partial(repo_path)  # poisoned bytes: never resume from them
            log.warning("delta %s refused (%s): full download", info.path, exc)
            self.delta_stats["refused"] += 1
            return None
        except e.DownloadError as exc:  # the network: retried later, resuming the delta
            raise RemoteError(f"download of {info.path} failed: {exc}") from exc
        finally:
            (self.download_dir / info.path).unlink(missing_ok=True)
        self.fetcher.discard_partial(repo_path)
        try:
            data = apply_delta(base_bytes, patch, target.length, d.get("codec", CODEC))
        except DeltaError as exc:
            log.warning("delta %s: %s: full download", info.path, exc)
            self.delta_stats["refused"] += 1
            return None
        if sha256(data) != target.sha256:
            log.warning("delta %s made an artifact whose sha256 is not the signed one: full download", info.path)
            self.delta_stats["refused"] += 1
            return None
        dest = self.download_dir / target.path
        atomic_write_bytes(dest, data)
        self.delta_stats["applied"] += 1
        self.delta_stats["bytes"] += len(patch)
        self.delta_stats["bytes_saved"] += target.length - len(patch)
        return dest

    def _download_full(self, target: ModelTarget, again: bool = True) -> Path:
        from tuf.api import exceptions as e

        info = self._updater.get_targetinfo(target.path)
        dest = self.download_dir / target.path
        repo_path = f"targets/{target.sha256}.{target.path}"
        try:
            path = self._updater.download_target(info, str(dest))
        except e.LengthOrHashMismatchError as exc:
            self.fetcher.discard_partial(repo_path)  # poisoned bytes: never resume from them
            distrust = getattr(self.fetcher.link, "distrust_cast", None)
            if again and distrust is not None and distrust(repo_path):
                # bytes from the broker's cast (anyone allowed to publish there could have put them):
                # once more, from the repository server alone
                log.warning("%s: the cast bytes failed verification (%s): downloading from the server", target.path, exc)
                self.fetcher.stats["cast_refused"] += 1
                return self._download_full(target, again=False)
            raise UpdateRefused("hash_mismatch", f"{target.path}: {exc}") from exc
        except e.DownloadLengthMismatchError as exc:
            self.fetcher.discard_partial(repo_path)
            raise UpdateRefused("oversized", f"{target.path}: {exc}") from exc
        except e.DownloadError as exc:
            raise RemoteError(f"download of {target.path} failed: {exc}") from exc
        self.fetcher.discard_partial(repo_path)
        return Path(path)
