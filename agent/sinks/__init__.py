"""Sinks: where results go. One small interface: ``write(results)`` gets one inference batch, encoded
once for every sink (``EncodedResults``: the device and model fields, and one JSON record per window
in window order), ``close()`` flushes. A sink that cannot keep up must not lose results silently:
the MQTT sink spools to the on-disk outbox, the file sinks write synchronously, one write per batch."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any, BinaryIO

from edgeopt.agent.config import JsonlSink, SinkBase
from edgeopt.agent.sinks.base import Sink
from edgeopt.agent.sinks.mqtt import MqttResultsSink
from edgeopt.fsutil import environment_fault


class StdoutResultsSink(Sink):
    kind = "stdout"

    def write(self, results) -> None:
        sys.stdout.write(results.lines())
        sys.stdout.flush()


class JsonlResultsSink(Sink):
    """JSON Lines, rotated by size: ``path`` → ``path.1`` → … → ``path.{keep}`` (the oldest is deleted),
    as the standard library's RotatingFileHandler names them. The results of a write go in with one
    write call while they fit; when they would take the file past ``max_bytes`` they are written up to
    the last line that fits, then the file rotates, so a file passes ``max_bytes`` only by a single
    line longer than it."""

    kind = "jsonl"

    def __init__(self, cfg: JsonlSink):
        self.path = Path(cfg.path)
        self.max_bytes = cfg.max_bytes
        self.keep = cfg.keep
        self.lines = 0
        self._file: BinaryIO | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open()
        except OSError as exc:
            raise environment_fault(exc, self.path) from exc

    def _open(self) -> None:
        self._file = open(self.path, "ab")  # noqa: SIM115 - held until close()
        self._size = self._file.tell()
        self._rotates = stat.S_ISREG(os.fstat(self._file.fileno()).st_mode)  # not a FIFO or /dev/stdout

    def write(self, results) -> None:
        data = results.lines().encode()
        if self._file is None:  # a rotation failed half-way: carry on in a file at self.path
            self._open()
        if self._rotates and self._size + len(data) > self.max_bytes:
            self._write_rotating(data)
        else:
            self._put(data)
        self.lines += len(results)

    def _write_rotating(self, data: bytes) -> None:
        """Whole lines up to where the file is full, a rotation, and so on."""
        start = 0
        while start < len(data):
            end = data.rfind(b"\n", start, start + self.max_bytes - self._size) + 1  # after the last line that fits
            if end <= start:  # not one more line fits
                if self._size:
                    self._rotate()
                    continue
                end = data.index(b"\n", start) + 1  # a line longer than max_bytes: a file of its own
            self._put(data[start:end])
            start = end
            if start < len(data):
                self._rotate()

    def _put(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        self._size += len(data)

    def _rotate(self) -> None:
        self._file.close()
        self._file = None
        for i in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._open()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def stats(self) -> dict[str, Any]:
        return {"lines": self.lines}


def make_sink(cfg: SinkBase, **context: Any) -> Sink:
    if cfg.type == "stdout":
        return StdoutResultsSink()
    if cfg.type == "jsonl":
        return JsonlResultsSink(cfg)  # type: ignore[arg-type]
    if cfg.type == "mqtt":
        return MqttResultsSink(context["topic"], context["outbox"], context["publisher"])
    raise ValueError(f"unknown sink type {cfg.type!r}")
