"""The bounded window queue between the sources and the model, and dynamic batching.

Sources ``put`` windows; the inference loop takes batches with ``get_batch``: up to ``max_batch``
windows, waiting at most ``max_wait_s`` after the first one arrives (or returning at once when the
queue is closing, so a shutdown flushes the partial batch). When the queue is full, the overflow
policy decides: ``drop-oldest`` discards the oldest queued window and counts it; ``block`` makes the
source wait for room (back-pressure, for replays). Windows leave in the order they came, so the
order of each source is kept.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

from edgeopt.agent.windowing import Window

OVERFLOW_POLICIES = ("drop-oldest", "block")


class QueueClosed(Exception):
    """``put`` on a queue that is shutting down; ``queued``: how many of the windows got in first."""

    def __init__(self, queued: int = 0):
        super().__init__(f"queue closed after {queued} window(s)")
        self.queued = queued


class WindowQueue:
    def __init__(self, capacity: int, overflow: str = "drop-oldest"):
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
        self.capacity = capacity
        self.overflow = overflow
        self._items: deque[Window] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._interrupted = False
        self.windows_in = 0
        self.dropped = 0
        self.dropped_by_source: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, window: Window) -> None:
        self.put_many([window])

    def put_many(self, windows: list[Window]) -> int:
        """Queue ``windows`` in order (one wake-up for all of them); returns how many were queued
        before the queue closed (then raises ``QueueClosed``)."""
        queued = 0
        with self._cond:
            try:
                for window in windows:
                    while len(self._items) >= self.capacity:
                        if self._closed:
                            raise QueueClosed(queued)
                        if self.overflow == "drop-oldest":
                            old = self._items.popleft()
                            self.dropped += 1
                            self.dropped_by_source[old.source] += 1
                        else:
                            self._cond.notify_all()  # let the consumer make room
                            self._cond.wait(0.1)
                    if self._closed:
                        raise QueueClosed(queued)
                    self._items.append(window)
                    self.windows_in += 1
                    queued += 1
            finally:
                if queued:
                    self._cond.notify_all()
        return queued

    def get_batch(self, max_batch: int, max_wait_s: float, idle_timeout_s: float = 0.1) -> list[Window]:
        """Up to ``max_batch`` windows; [] when none arrived within ``idle_timeout_s``. Returns early
        (with what it has) after ``close`` or ``interrupt``."""
        with self._cond:
            if not self._items and not self._closed and not self._interrupted:
                self._cond.wait(idle_timeout_s)
            if not self._items:
                self._interrupted = False
                return []
            deadline = time.monotonic() + max_wait_s
            while len(self._items) < max_batch and not self._closed and not self._interrupted:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._interrupted = False
            batch = [self._items.popleft() for _ in range(min(max_batch, len(self._items)))]
            self._cond.notify_all()
            return batch

    def interrupt(self) -> None:
        """Make a waiting ``get_batch`` return now (the queue stays open: sources keep going)."""
        with self._cond:
            self._interrupted = True
            self._cond.notify_all()

    def close(self) -> None:
        """Stop accepting windows and wake every waiter (a partial batch is returned at once)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
