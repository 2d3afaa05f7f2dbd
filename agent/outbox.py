"""A bounded on-disk outbox: result messages wait here until the broker has acknowledged them.

Every MQTT result message is appended here first and sent from here, in order; an entry is done
once the broker acknowledges it (QoS 1). So while the broker is unreachable the agent keeps
inferring and results pile up on disk; on reconnect they go out oldest first. A restart of the agent
resends whatever was not acknowledged (at-least-once: the ids in the results let a consumer drop the
few duplicates a crash can cause).

Layout: ``DIR/seg-<first seq>.log`` segment files of framed records, and ``DIR/acked`` holding the
highest sequence number below which everything is done. The total size is capped: past
``max_bytes`` the oldest segment is deleted, and the entries in it that were never sent are
counted in ``dropped``. Records carry a CRC, so a record torn by a power loss is detected and the
file truncated there. (Hand-written because no small library offers a size-capped, ordered,
crash-safe file queue with acknowledgement; sqlite would do it at several times the write cost.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from edgeopt.errors import EnvironmentFault
from edgeopt.fsutil import atomic_write_bytes, environment_fault, fsync_dir

log = logging.getLogger("edgeopt.agent.outbox")

_HEADER = struct.Struct(">IIQH")  # body length, crc32 of body, seq, topic length
ACKED = "acked"


@dataclass
class Entry:
    seq: int
    topic: str
    payload: bytes


@dataclass
class _Segment:
    path: Path
    first_seq: int
    last_seq: int  # first_seq - 1 while empty
    size: int


def _parse(data: bytes, limit: int | None = None) -> tuple[list[tuple[int, int, int]], int]:
    """([(seq, offset, end)], length of the valid prefix) of (the start of) a segment's bytes."""
    out, pos = [], 0
    while pos + _HEADER.size <= len(data) and (limit is None or len(out) < limit):
        length, crc, seq, topic_len = _HEADER.unpack_from(data, pos)
        end = pos + _HEADER.size + length
        if end > len(data) or zlib.crc32(data[pos + 8:end]) != crc or topic_len > length:
            break
        out.append((seq, pos, end))
        pos = end
    return out, pos


def _decode(data: bytes, offset: int) -> Entry:
    length, _crc, seq, topic_len = _HEADER.unpack_from(data, offset)
    body = data[offset + _HEADER.size:offset + _HEADER.size + length]
    return Entry(seq, body[:topic_len].decode(), bytes(body[topic_len:]))


class Outbox:
    def __init__(self, directory: str | Path, max_bytes: int = 16 << 20, segment_bytes: int = 1 << 20,
                 fsync_interval_s: float = 1.0):
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = max(512, min(segment_bytes, max_bytes // 4))
        self.fsync_interval_s = fsync_interval_s
        self.dropped = 0
        self.appended = 0
        self.acked = 0
        self._lock = threading.Lock()
        self._inflight: set[int] = set()
        self._segments: list[_Segment] = []
        self._writer = None
        self._last_sync = 0.0
        self._last_persist = 0.0
        self._last_drop_log = -1e9
        self._persisted_committed = -1
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._recover()
        except OSError as exc:
            raise environment_fault(exc, self.dir) from exc

    # -- recovery --------------------------------------------------------------------------------
    def _recover(self) -> None:
        try:
            committed = int((self.dir / ACKED).read_text().strip() or -1)
        except (FileNotFoundError, ValueError):
            committed = -1
        for path in sorted(self.dir.glob("seg-*.log")):
            data = path.read_bytes()
            records, valid = _parse(data)
            if valid < len(data):
                log.warning("outbox: %s has a torn record at byte %d (power loss?); truncating", path.name, valid)
                with open(path, "r+b") as f:
                    f.truncate(valid)
            if not records:
                path.unlink()
                continue
            self._segments.append(_Segment(path, records[0][0], records[-1][0], valid))
        self._next_seq = (self._segments[-1].last_seq + 1) if self._segments else committed + 1
        self._committed = committed
        self._sent_upto = committed  # unacknowledged entries of a previous run are sent again
        self._persisted_committed = committed
        self._cursor = (0, 0)  # (segment index, byte offset) of the next entry to read
        self._delete_done_segments()

    # -- writing ---------------------------------------------------------------------------------
    def append(self, topic: str, payload: bytes) -> int:
        topic_b = topic.encode()
        with self._lock:
            seq = self._next_seq
            body = topic_b + payload
            crc = zlib.crc32(struct.pack(">QH", seq, len(topic_b)) + body)
            record = _HEADER.pack(len(body), crc, seq, len(topic_b)) + body
            try:
                seg = self._write_segment()
                self._writer.write(record)
                self._writer.flush()
                if self.fsync_interval_s == 0 or time.monotonic() - self._last_sync >= self.fsync_interval_s:
                    os.fsync(self._writer.fileno())
                    self._last_sync = time.monotonic()
            except OSError as exc:
                raise environment_fault(exc, self.dir) from exc
            seg.last_seq = seq
            seg.size += len(record)
            self._next_seq += 1
            self.appended += 1
            self._enforce_cap()
            return seq

    def _write_segment(self) -> _Segment:
        seg = self._segments[-1] if self._segments else None
        if seg is None or seg.size >= self.segment_bytes or self._writer is None:
            if self._writer is not None:
                self._writer.close()
            if seg is None or seg.size >= self.segment_bytes:
                path = self.dir / f"seg-{self._next_seq:012d}.log"
                seg = _Segment(path, self._next_seq, self._next_seq - 1, 0)
                self._segments.append(seg)
                self._writer = open(path, "ab")  # noqa: SIM115 (kept open for appends; closed in close())
                fsync_dir(self.dir)
            else:
                self._writer = open(seg.path, "ab")  # noqa: SIM115
        return seg

    def _enforce_cap(self) -> None:
        while sum(s.size for s in self._segments) > self.max_bytes and len(self._segments) > 1:
            oldest = self._segments.pop(0)
            never_sent = oldest.last_seq - max(self._sent_upto, oldest.first_seq - 1)
            if never_sent > 0:
                self.dropped += never_sent
                if time.monotonic() - self._last_drop_log >= 10.0:
                    self._last_drop_log = time.monotonic()
                    log.warning("outbox full (%d bytes): dropping the oldest unsent results (%d so far)",
                                self.max_bytes, self.dropped)
            self._sent_upto = max(self._sent_upto, oldest.last_seq)
            seg_index, offset = self._cursor
            self._cursor = (seg_index - 1, offset) if seg_index > 0 else (0, 0)
            with contextlib.suppress(FileNotFoundError):
                oldest.path.unlink()
            self._update_committed()

    # -- reading and acknowledging -----------------------------------------------------------------
    def next_unsent(self, limit: int) -> list[Entry]:
        """Up to ``limit`` entries never handed out before (oldest first); they count as in flight."""
        out: list[Entry] = []
        with self._lock:
            while len(out) < limit and self._cursor[0] < len(self._segments):
                index, offset = self._cursor
                data = self._read(self._segments[index].path, offset)
                records, _valid = _parse(data, limit - len(out) + 256)
                if not records:  # this segment is read to its end
                    if index + 1 >= len(self._segments):
                        break
                    self._cursor = (index + 1, 0)
                    continue
                for seq, start, end in records:
                    if len(out) >= limit:
                        break
                    self._cursor = (index, offset + end)
                    if seq <= self._sent_upto:
                        continue
                    out.append(_decode(data, start))
                    self._inflight.add(seq)
                    self._sent_upto = seq
        return out

    @staticmethod
    def _read(path: Path, offset: int, chunk: int = 256 * 1024) -> bytes:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(chunk)
                if len(data) == chunk and not _parse(data, 1)[0]:
                    data += f.read()  # one record larger than the chunk
                return data
        except FileNotFoundError:
            return b""

    def ack(self, seq: int) -> None:
        with self._lock:
            if seq in self._inflight:
                self._inflight.discard(seq)
                self.acked += 1
            self._update_committed()
            if time.monotonic() - self._last_persist >= max(self.fsync_interval_s, 0.05):
                self._persist()

    def _update_committed(self) -> None:
        self._committed = (min(self._inflight) if self._inflight else self._sent_upto + 1) - 1
        self._delete_done_segments()

    def _delete_done_segments(self) -> None:
        # never the segment being written: appends continue there
        while len(self._segments) > 1 and self._segments[0].last_seq <= self._committed:
            seg = self._segments.pop(0)
            with contextlib.suppress(FileNotFoundError):
                seg.path.unlink()
            index, offset = self._cursor
            self._cursor = (index - 1, offset) if index > 0 else (0, 0)

    def _persist(self) -> None:
        if self._committed != self._persisted_committed:
            try:
                atomic_write_bytes(self.dir / ACKED, f"{self._committed}\n".encode())
            except EnvironmentFault as exc:
                log.warning("outbox: %s", exc)
                return
            self._persisted_committed = self._committed
        self._last_persist = time.monotonic()

    # -- facts -----------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Entries not yet acknowledged (in flight included), dropped ones excluded."""
        with self._lock:
            return max(0, self._next_seq - 1 - self._committed)

    @property
    def unsent(self) -> int:
        with self._lock:
            return max(0, self._next_seq - 1 - self._sent_upto)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def size_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    def forget_inflight(self) -> int:
        """The transport lost the in-flight entries (a new client session): send them again."""
        with self._lock:
            lost = len(self._inflight)
            if lost:
                self._sent_upto = min(self._inflight) - 1
                self._inflight.clear()
                self._cursor = (0, 0)
            return lost

    def close(self) -> None:
        with self._lock:
            if self._writer is not None:
                with contextlib.suppress(OSError):
                    self._writer.flush()
                    os.fsync(self._writer.fileno())
                self._writer.close()
                self._writer = None
            self._persist()
