"""The repository's transfer frames over MQTT (fleet/repo_server.py answers, ``edgeopt.repo_client``
asks): a request names a byte range of a metadata or target file; a response is a length-prefixed
JSON header and the bytes, or an error. Checked field by field with ``edgeopt.protocol``'s rules."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from edgeopt.protocol import (
    MAX_CHUNK,
    MAX_HEADER_BYTES,
    MAX_REQUEST_BYTES,
    REASON_CHARS,
    REPO_PATH_RE,
    REQUEST_ID_RE,
    ProtocolError,
    check_id,
    check_int,
    clean_text,
    dump,
    is_text,
    load_object,
    matches,
    require,
)


def _repo_path(v: Any) -> str:
    require(matches(REPO_PATH_RE, v), "path", "metadata/FILE or targets/FILE", v)
    return v


@dataclass(frozen=True)
class ChunkRequest:
    """{"id", "path", "offset", "length"[, "cast": GRID]}: ``length`` bytes of ``path`` from ``offset``.

    ``cast``: the device has subscribed to the cast topic of the GRID-byte chunk that holds ``offset``
    (``edgeopt.protocol.cast_topic``) and takes it from there; a server that does not cast (or not on
    that grid) answers as usual. 0: not listening."""

    id: str
    path: str
    offset: int
    length: int
    cast: int = 0

    def encode(self) -> bytes:
        body = {"id": self.id, "path": self.path, "offset": self.offset, "length": self.length}
        return dump(body | {"cast": self.cast} if self.cast else body)


def decode_request(payload: bytes, max_chunk: int = MAX_CHUNK) -> ChunkRequest:
    obj = load_object(payload, MAX_REQUEST_BYTES, "request")
    cast = check_int(obj.get("cast", 0), "cast", 0, MAX_CHUNK)
    return ChunkRequest(check_id(obj.get("id"), "id", REQUEST_ID_RE, False), _repo_path(obj.get("path")),  # type: ignore[arg-type]
                        check_int(obj.get("offset"), "offset", 0, 2**40), check_int(obj.get("length"), "length", 1, max_chunk),
                        cast)


@dataclass(frozen=True)
class ChunkResponse:
    """A frame: header {"id", "path", "offset", "total", "length"} + data, or {"id", "path", "error"}."""

    id: str
    path: str
    offset: int = 0
    total: int = 0
    data: bytes = b""
    error: str | None = None

    def encode(self) -> bytes:
        header: dict[str, Any] = {"id": self.id, "path": self.path}
        if self.error is not None:
            header["error"] = clean_text(self.error, REASON_CHARS) or "error"
        else:
            header.update(offset=self.offset, total=self.total, length=len(self.data))
        raw = dump(header)
        return struct.pack(">I", len(raw)) + raw + self.data


def decode_response(payload: bytes, max_chunk: int = MAX_CHUNK) -> ChunkResponse:
    if not isinstance(payload, bytes | bytearray) or len(payload) < 4:
        raise ProtocolError("response shorter than its frame header", "bad_frame", "frame")
    if len(payload) > 4 + MAX_HEADER_BYTES + max_chunk:
        raise ProtocolError(f"response of {len(payload)} bytes exceeds the largest chunk", "too_large", "frame")
    (n,) = struct.unpack(">I", payload[:4])
    if n > MAX_HEADER_BYTES or 4 + n > len(payload):
        raise ProtocolError(f"response header length {n} is invalid", "bad_frame", "frame")
    header = load_object(bytes(payload[4:4 + n]), MAX_HEADER_BYTES, "response header")
    data = bytes(payload[4 + n:])
    rid, path = check_id(header.get("id"), "id", REQUEST_ID_RE, False), _repo_path(header.get("path"))
    if "error" in header:
        err = header["error"]
        require(is_text(err, REASON_CHARS) and err != "", "error", "a short printable reason", err)
        return ChunkResponse(rid, path, error=err)  # type: ignore[arg-type]
    offset, total = check_int(header.get("offset"), "offset", 0, 2**40), check_int(header.get("total"), "total", 0, 2**40)
    length = check_int(header.get("length"), "length", 0, max_chunk)
    if length != len(data):
        raise ProtocolError(f"header says {length} data bytes, frame has {len(data)}", "bad_frame", "length")
    if offset + length > total:
        raise ProtocolError(f"chunk [{offset}, {offset + length}) runs past the total {total}", "bad_frame", "offset")
    return ChunkResponse(rid, path, offset, total, data)  # type: ignore[arg-type]
