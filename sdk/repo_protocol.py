"""Messages between a device and the repository server over MQTT (shared by both sides).

    {prefix}/repo/req/{device_id}    device → server, QoS 1, JSON:
        {"id": "<≤64 chars>", "path": "metadata/timestamp.json" | "targets/<sha256>.<name>",
         "offset": <int ≥ 0>, "length": <1 .. max chunk>}
    {prefix}/repo/resp/{device_id}   server → device, QoS 1, binary frame:
        4-byte big-endian header length | JSON header | data bytes
        header: {"id", "path", "offset", "total", "length"}  or  {"id", "path", "error": "<reason>"}

Chunks are bounded (default 64 KiB; brokers cap payloads: AWS IoT Core 128 KB), so any file moves
as a sequence of byte-range requests that can resume at any offset. Every field is validated on
arrival by the pure functions below; they raise ``ProtocolError`` and never anything else.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any

DEFAULT_CHUNK = 64 * 1024
MAX_CHUNK = 1024 * 1024  # the largest chunk either side will ever ask for or accept
MAX_REQUEST_BYTES = 1024
MAX_HEADER_BYTES = 4096
ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PATH_RE = re.compile(r"^(metadata|targets)/[A-Za-z0-9][A-Za-z0-9_.+-]{0,200}$")


class ProtocolError(ValueError):
    """A message that does not follow the protocol (the text says which field is wrong)."""


def request_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/repo/req/{device_id}"


def response_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/repo/resp/{device_id}"


def device_from_request_topic(prefix: str, topic: str) -> str:
    head = f"{prefix}/repo/req/"
    device = topic[len(head):] if topic.startswith(head) else ""
    if not DEVICE_ID_RE.match(device):
        raise ProtocolError(f"bad request topic {topic!r}")
    return device


@dataclass(frozen=True)
class ChunkRequest:
    id: str
    path: str
    offset: int
    length: int

    def encode(self) -> bytes:
        return json.dumps({"id": self.id, "path": self.path, "offset": self.offset, "length": self.length}).encode()


def _int(obj: dict, key: str, lo: int, hi: int) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"field '{key}' must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _str(obj: dict, key: str, pattern: re.Pattern) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not pattern.match(v) or ".." in v:
        raise ProtocolError(f"field '{key}' is missing or malformed: {str(v)[:80]!r}")
    return v


def _json_object(data: bytes, limit: int, what: str) -> dict[str, Any]:
    if len(data) > limit:
        raise ProtocolError(f"{what} of {len(data)} bytes exceeds {limit}")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{what} is not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return obj


def decode_request(payload: bytes, max_chunk: int = MAX_CHUNK) -> ChunkRequest:
    obj = _json_object(payload, MAX_REQUEST_BYTES, "request")
    return ChunkRequest(_str(obj, "id", ID_RE), _str(obj, "path", PATH_RE), _int(obj, "offset", 0, 2**40),
                        _int(obj, "length", 1, max_chunk))


@dataclass(frozen=True)
class ChunkResponse:
    id: str
    path: str
    offset: int = 0
    total: int = 0
    data: bytes = b""
    error: str | None = None

    def encode(self) -> bytes:
        header: dict[str, Any] = {"id": self.id, "path": self.path}
        if self.error is not None:
            header["error"] = self.error
        else:
            header.update(offset=self.offset, total=self.total, length=len(self.data))
        raw = json.dumps(header).encode()
        return struct.pack(">I", len(raw)) + raw + self.data


def decode_response(payload: bytes, max_chunk: int = MAX_CHUNK) -> ChunkResponse:
    if len(payload) < 4:
        raise ProtocolError("response shorter than its frame header")
    (n,) = struct.unpack(">I", payload[:4])
    if n > MAX_HEADER_BYTES or 4 + n > len(payload):
        raise ProtocolError(f"response header length {n} is invalid")
    header = _json_object(payload[4:4 + n], MAX_HEADER_BYTES, "response header")
    data = payload[4 + n:]
    rid, path = _str(header, "id", ID_RE), _str(header, "path", PATH_RE)
    if "error" in header:
        err = header["error"]
        if not isinstance(err, str) or len(err) > 200:
            raise ProtocolError("field 'error' is malformed")
        return ChunkResponse(rid, path, error=err)
    offset = _int(header, "offset", 0, 2**40)
    total = _int(header, "total", 0, 2**40)
    length = _int(header, "length", 0, max_chunk)
    if length != len(data):
        raise ProtocolError(f"header says {length} data bytes, frame has {len(data)}")
    if offset + length > total:
        raise ProtocolError(f"chunk [{offset}, {offset + length}) runs past the total {total}")
    return ChunkResponse(rid, path, offset, total, data)
