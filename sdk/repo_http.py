"""The signed repository over HTTP(S): the same chunks as over MQTT (``repo_client.RepoLink``), fetched
with range requests from any web server, object store or CDN that serves the repository's
``metadata/`` and ``targets/`` as static files (never ``keys/``), or from ``fleet serve --http-repo``.

Only the bytes move differently: python-tuf still decides what to fetch and checks every signature,
version, expiry, length and hash, and the fetcher still resumes a download from its ``.part`` file by
offset — here with ``Range: bytes=OFFSET-END``. A server that ignores ranges (HTTP 200) still works,
more slowly: the chunk is cut out of the whole body. urllib3 (python-tuf's own HTTP library) does the
HTTP; what is ours is mapping its answers onto chunks, and which failures are worth a retry.
"""

from __future__ import annotations

import contextlib
import logging
import re
import ssl
import threading
import uuid
from urllib.parse import quote

from edgeopt.errors import UserInputError
from edgeopt.protocol import REPO_PATH_RE, matches
from edgeopt.repo_frames import ChunkResponse

log = logging.getLogger("edgeopt.repo_http")
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)\Z")
UNSATISFIED = re.compile(r"bytes \*/(\d+)\Z")
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}  # worth asking again (None: the fetcher backs off)


class HttpRepoLink:
    """``request(path, offset, length, timeout)`` → a chunk of ``base_url + path``, an error chunk
    (not_found, http_NNN, bad_range), or None when the network or a busy server gave no answer."""

    def __init__(self, base_url: str, ca_file: str = "", user_agent: str = "edgeopt-agent", pool_size: int = 1):
        import urllib3

        if not re.match(r"https?://[^/\s]+", base_url):
            raise UserInputError(f"repository URL {base_url!r}: expected http(s)://HOST[:PORT]/PATH/")
        self.base = base_url if base_url.endswith("/") else base_url + "/"
        context = None
        if self.base.startswith("https://"):
            context = ssl.create_default_context(cafile=ca_file or None)
        elif ca_file:
            raise UserInputError(f"repository URL {base_url!r}: a CA file is for https URLs")
        self._urllib3 = urllib3
        self.pool = urllib3.PoolManager(ssl_context=context, headers={"User-Agent": user_agent}, maxsize=pool_size)
        self.ignores_ranges = threading.Event()  # seen an HTTP 200 to a range request
        self.last_error: str | None = None  # why the last request had no answer (the fetcher's message says it)

    def request(self, path: str, offset: int, length: int, timeout: float) -> ChunkResponse | None:
        rid = uuid.uuid4().hex[:16]
        if not matches(REPO_PATH_RE, path) or offset < 0 or length < 1:
            return ChunkResponse(rid, path, error="bad_request")
        u3 = self._urllib3
        # urllib3 only follows redirects; the fetcher retries with its backoff (every other kind at 0:
        # a certificate error is "other", and left unlimited urllib3 retried it until Python's recursion limit)
        try:
            resp = self.pool.request("GET", self.base + quote(path), preload_content=False,
                                     headers={"Range": f"bytes={offset}-{offset + length - 1}"},
                                     timeout=u3.Timeout(connect=timeout, read=timeout),
                                     retries=u3.Retry(total=5, connect=0, read=0, status=0, other=0, redirect=5))
        except u3.exceptions.HTTPError as exc:
            log.info("repository %s: %s", self.base, exc)
            self.last_error = _reason(exc)
            return None
        try:
            return self._chunk(rid, path, offset, length, resp)
        except u3.exceptions.HTTPError as exc:  # the body broke off
            log.info("repository %s: %s cut off: %s", self.base, path, exc)
            return None
        finally:  # a connection goes back to the pool only with its body read to the end
            if resp.status == 200:
                resp.close()  # the rest of a whole file: not worth reading
            else:
                with contextlib.suppress(u3.exceptions.HTTPError, OSError):
                    resp.drain_conn()
            resp.release_conn()

    def _chunk(self, rid: str, path: str, offset: int, length: int, resp) -> ChunkResponse | None:
        status = resp.status
        self.last_error = f"HTTP {status}" if status in RETRY_STATUS else None
        if status == 404:
            return ChunkResponse(rid, path, error="not_found")
        if status in RETRY_STATUS:
            return None
        if status == 416:  # asked from the end: an empty answer, as over MQTT
            m = UNSATISFIED.match(resp.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == offset:
                return ChunkResponse(rid, path, offset, offset, b"")
            return ChunkResponse(rid, path, error="bad_offset")
        if status == 206:
            m = CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                return ChunkResponse(rid, path, error="bad_range")
            data = resp.read(length + 1)
            if len(data) != int(m.group(2)) - offset + 1:
                return None  # shorter than it said: asked again
            return ChunkResponse(rid, path, offset, int(m.group(3)), data)
        if status == 200:  # the server ignores ranges: cut the chunk out of the whole file
            if not self.ignores_ranges.is_set():
                self.ignores_ranges.set()
                log.warning("repository %s ignores range requests: every chunk reads its file from the start",
                            self.base)
            skipped = 0
            while skipped < offset:
                piece = resp.read(min(offset - skipped, 1 << 20))
                if not piece:
                    return ChunkResponse(rid, path, error="bad_offset")
                skipped += len(piece)
            data = resp.read(length)
            rest = resp.headers.get("Content-Length")
            total = int(rest) if rest and rest.isdigit() else None
            if total is None:
                return ChunkResponse(rid, path, error="no_length")
            return ChunkResponse(rid, path, offset, total, data)
        return ChunkResponse(rid, path, error=f"http_{status}")


def _reason(exc: Exception) -> str:
    """The innermost cause of a urllib3 failure, in one line (a certificate that does not verify, a
    refused connection), not urllib3's retry wrapper around it."""
    inner = getattr(exc, "reason", None) or exc
    while getattr(inner, "reason", None) is not None and inner.reason is not inner:
        if not isinstance(inner.reason, Exception):
            break
        inner = inner.reason
    return " ".join(str(inner).split())[:300]
