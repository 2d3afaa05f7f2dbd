"""Many paho-mqtt clients driven by one thread (epoll via ``selectors``), for the device simulator.

paho's own ``loop_start`` costs a thread (and a socket pair) per client, which ends at a few
hundred clients. paho also supports an external event loop (``loop_read`` / ``loop_write`` /
``loop_misc`` and the ``on_socket_*`` callbacks); this class is that loop, so ten thousand
simulated devices each keep their own real MQTT connection in one process. Other threads may
publish on any client: paho asks to be watched for writing through ``on_socket_register_write``,
which is applied at once under a short lock (epoll picks the change up while it waits).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

from edgeopt.mqtt import set_nodelay

log = logging.getLogger("edgeopt.fleet.sim")
MISC_INTERVAL = 1.0   # keep-alive bookkeeping (and a sweep for writes paho may not have announced)


class ClientLoop:
    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._lock = threading.RLock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.clients: list = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- clients -------------------------------------------------------------------------------
    def add(self, client) -> None:
        """Watch ``client`` (call before ``client.connect``)."""
        client.on_socket_open = self._on_open
        client.on_socket_close = self._on_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self.clients.append(client)

    def _on_open(self, client, userdata, sock) -> None:
        set_nodelay(sock)
        with self._lock:
            self._sel.register(sock, selectors.EVENT_READ, client)

    def _on_close(self, client, userdata, sock) -> None:
        with self._lock, contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)

    def _set_events(self, sock, client, events: int) -> None:
        with self._lock:
            try:
                key = self._sel.get_key(sock)
            except (KeyError, ValueError):
                return
            if key.events != events:
                self._sel.modify(sock, events, client)

    def _on_register_write(self, client, userdata, sock) -> None:
        self._set_events(sock, client, selectors.EVENT_READ | selectors.EVENT_WRITE)

    def _on_unregister_write(self, client, userdata, sock) -> None:
        self._set_events(sock, client, selectors.EVENT_READ)

    # -- calls and timers ----------------------------------------------------------------------
    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread (thread-safe)."""
        self._calls.append(fn)
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        when = time.monotonic() + delay
        self.call_soon(lambda: heapq.heappush(self._timers, (when, next(self._seq), fn)))

    # -- running -------------------------------------------------------------------------------
    def start(self) -> ClientLoop:
        self._thread = threading.Thread(target=self.run, name="edgeopt-sim-loop", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        next_misc = time.monotonic() + MISC_INTERVAL
        while not self._stop.is_set():
            now = time.monotonic()
            timeout = min(next_misc, self._timers[0][0] if self._timers else next_misc) - now
            for key, mask in self._sel.select(max(0.0, min(timeout, 0.5))):
                if key.data is None:
                    self._drain_wake()
                    continue
                self._dispatch(key.data, mask)
            while self._calls:
                self._safe(self._calls.popleft())
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                self._safe(heapq.heappop(self._timers)[2])
            if now >= next_misc:
                next_misc = now + MISC_INTERVAL
                for client in list(self.clients):
                    self._safe(client.loop_misc)
                    if client.want_write() and client.socket() is not None:
                        self._set_events(client.socket(), client, selectors.EVENT_READ | selectors.EVENT_WRITE)

    def _dispatch(self, client, mask: int) -> None:
        # No lock held here: paho takes its own locks inside, and other threads publishing take
        # them before calling back into _set_events (holding ours here would invert that order).
        if mask & selectors.EVENT_READ:
            self._safe(client.loop_read)
        if mask & selectors.EVENT_WRITE:
            self._safe(client.loop_write)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    @staticmethod
    def _safe(fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception:  # one device's bug must not stop the other nine thousand
            log.exception("simulated device callback failed")

    def stop(self) -> None:
        self._stop.set()
        self.call_soon(lambda: None)
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
