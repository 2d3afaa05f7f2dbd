"""Line-oriented live sources: stdin, Unix stream and datagram sockets, a serial port, an MQTT topic.

Every line is one sample, ``v0,v1,...`` (with ``timestamped = true``: ``t,v0,v1,...``, t in UNIX
seconds; otherwise the arrival time). Malformed lines are counted and skipped.
"""

from __future__ import annotations

import contextlib
import os
import queue
import selectors
import socket
import sys
from pathlib import Path

from edgeopt.agent.sources.base import Source, parse_lines
from edgeopt.errors import MissingDependency, UserInputError

POLL_S = 0.2


class _LineSource(Source):
    def _start_lines(self) -> None:
        self.bind(None, self.channels_sent)
        self._partial = b""

    def feed_bytes(self, data: bytes, final: bool = False) -> None:
        """Bytes of a stream → complete lines → samples (a trailing partial line waits for more)."""
        data = self._partial + data
        if final:
            complete, self._partial = data, b""
        else:
            cut = data.rfind(b"\n") + 1
            complete, self._partial = data[:cut], data[cut:]
        if complete:
            self.feed_text(complete.decode("utf-8", errors="replace"))

    def feed_text(self, text: str) -> None:
        samples, stamps = parse_lines(text, self.channels_sent, self, self.cfg.timestamped)
        if len(samples):
            self.emit(samples, stamps)


class StdinLinesSource(_LineSource):
    kind = "stdin"

    def _run(self) -> None:
        self._start_lines()
        fd = sys.stdin.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while not self.stopping.is_set():
                if not sel.select(POLL_S):
                    continue
                data = os.read(fd, 65536)
                if not data:
                    self.feed_bytes(b"", final=True)
                    return
                self.feed_bytes(data)


def _bind_unix(path: str, kind: int, name: str) -> socket.socket:
    p = Path(path)
    if p.exists() or p.is_symlink():
        if not p.is_socket():
            raise UserInputError(f"source '{name}': {path} exists and is not a socket")
        p.unlink()  # a stale socket from a previous run
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    sock.bind(path)
    sock.settimeout(POLL_S)
    return sock


class UnixStreamSocketSource(_LineSource):
    """Listens on a stream socket; one sensor connection at a time (others wait in the backlog)."""

    kind = "unix-stream"

    def _run(self) -> None:
        self._start_lines()
        self._sock = _bind_unix(self.cfg.path, socket.SOCK_STREAM, self.name)
        try:
            self._sock.listen(4)
            while not self.stopping.is_set():
                try:
                    conn, _ = self._sock.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(POLL_S)
                    while not self.stopping.is_set():
                        try:
                            data = conn.recv(65536)
                        except TimeoutError:
                            continue
                        if not data:
                            self.feed_bytes(b"", final=True)
                            break
                        self.feed_bytes(data)
        finally:
            self._sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.cfg.path)


class UnixDatagramSource(_LineSource):
    kind = "unix-dgram"

    def _run(self) -> None:
        self._start_lines()
        sock = _bind_unix(self.cfg.path, socket.SOCK_DGRAM, self.name)
        try:
            while not self.stopping.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                self.feed_text(data.decode("utf-8", errors="replace"))
        finally:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.cfg.path)


class SerialPortSource(_LineSource):
    kind = "serial"

    def _run(self) -> None:
        try:
            import serial
        except ImportError as exc:
            raise MissingDependency("pyserial", "serial", f"source '{self.name}' (serial port)") from exc
        self._start_lines()
        try:
            port = serial.serial_for_url(self.cfg.port, baudrate=self.cfg.baudrate, timeout=POLL_S)
        except serial.SerialException as exc:
            raise UserInputError(f"source '{self.name}': cannot open serial port {self.cfg.port}: {exc}") from None
        with port:
            while not self.stopping.is_set():
                try:
                    data = port.read(4096)
                except serial.SerialException as exc:
                    raise UserInputError(f"source '{self.name}': serial port {self.cfg.port} failed: {exc}") from None
                if data:
                    self.feed_bytes(data)


class MqttTopicSource(_LineSource):
    """Each message holds one or more lines. paho's network thread only queues the payloads (a
    bounded queue, overflow counted as malformed input); this source's thread parses them."""

    kind = "mqtt"
    BACKLOG = 1024

    def _run(self) -> None:
        if self.ctx.transport is None:
            raise UserInputError(f"source '{self.name}': needs [mqtt] host")
        self._start_lines()
        self._inbox: queue.Queue[bytes] = queue.Queue(self.BACKLOG)
        self.ctx.transport.subscribe(self.cfg.topic, self._on_payload)
        while not self.stopping.is_set():
            try:
                payload = self._inbox.get(timeout=POLL_S)
            except queue.Empty:
                continue
            self.feed_text(payload.decode("utf-8", errors="replace"))

    def _on_payload(self, payload: bytes) -> None:
        try:
            self._inbox.put_nowait(payload)
        except queue.Full:
            self.count_malformed(1, f"message backlog of {self.BACKLOG} full; message dropped")
