"""python-tuf's ``FetcherInterface`` over the MQTT repository protocol, resumable by offset.

TUF decides what to download and verifies it (signatures, versions, expiry, length, hashes); this
class only moves bytes. An artifact download keeps its bytes in a ``.part`` file named after the
target path (which carries the sha256, so different content never shares a part file): after a
disconnect or an agent restart the download continues from the bytes already on disk, and the
bytes it re-reads from there go through TUF's length/hash check like the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tuf.api.exceptions import DownloadError, DownloadHTTPError
from tuf.ngclient import FetcherInterface

from edgeopt.agent.update.link import RepoLink
from edgeopt.repo_protocol import DEFAULT_CHUNK

log = logging.getLogger("edgeopt.agent.update")
URL_SCHEME = "edgeopt-repo:"
READ_PIECE = 1 << 20


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
        if self.partial_dir is not None:
            self.partial_dir.mkdir(parents=True, exist_ok=True)
        self.stats: Counter[str] = Counter()  # bytes_network, bytes_resumed, requests, retries

    def partial_path(self, repo_path: str) -> Path | None:
        if self.partial_dir is None or not repo_path.startswith("targets/"):
            return None
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
        raise DownloadError(f"no answer from the repository for {path} at offset {offset} "
                            f"after {self.retries + 1} attempts")

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
