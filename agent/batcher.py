"""The bounded window queue between the sources and the model, and dynamic batching.

Sources ``put`` blocks of windows; the inference loop takes batches with ``get_batch``: up to
``max_batch`` windows, waiting at most ``max_wait_s`` after the first one arrives (or returning at
once when the queue is closing, so a shutdown flushes the partial batch). Capacity and drops are
counted in windows, not blocks: when the queue is full, the overflow policy decides: ``drop-oldest``
discards the oldest queued windows and counts each; ``block`` makes the source wait for room
(back-pressure, for replays) — until half the queue is free, or room for all its windows, so a fast
replay refills the queue in large steps rather than waking at every batch. Windows leave in the order they came, so the order of each source is
kept; a batch is made of block slices (views), so a batch inside one block is that block's rows.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

from edgeopt.agent.windowing import WindowBatch, WindowBlock

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
        self._blocks: deque[WindowBlock] = deque()
        self._head_used = 0  # windows of the first block already taken (a slice costs less than two)
        self._windows = 0  # windows in self._blocks, less the used ones
        lock = threading.Lock()
        self._windows_queued = threading.Condition(lock)  # the inference loop waits on it
        self._room_made = threading.Condition(lock)       # blocked sources wait on it
        self._resume_room = max(1, capacity // 2)
        self._closed = False
        self._interrupted = False
        self.windows_in = 0
        self.dropped = 0
        self.dropped_by_source: Counter[str] = Counter()

    def __len__(self) -> int:
        return self._windows

    def put(self, block: WindowBlock) -> None:
        """Queue the windows of ``block`` in order (one wake-up for all of them); raises
        ``QueueClosed`` (saying how many got in first) once the queue is closing."""
        queued = 0
        with self._windows_queued:
            try:
                while queued < len(block):
                    if self._closed:
                        raise QueueClosed(queued)
                    room = self.capacity - self._windows
                    if self.overflow == "drop-oldest":
                        part = block[queued:]
                        self._drop_oldest(len(part) - room)
                    elif room >= min(len(block) - queued, self._resume_room):
                        part = block[queued:queued + room]
                    else:
                        self._windows_queued.notify_all()  # let the consumer make room
                        self._room_made.wait(0.1)
                        continue
                    self._append(part)
                    queued += len(part)
            finally:
                if queued:
                    self._windows_queued.notify_all()

    def _append(self, block: WindowBlock) -> None:
        if len(block) > self.capacity:  # drop-oldest with more windows than the queue holds
            self._count_dropped(block.source, len(block) - self.capacity)
            block = block[len(block) - self.capacity:]
        self._blocks.append(block)
        self._windows += len(block)
        self.windows_in += len(block)

    def _drop_oldest(self, n: int) -> None:
        """Discard the ``n`` oldest queued windows (counted per source)."""
        while n > 0 and self._blocks:
            head = self._blocks[0]
            left = len(head) - self._head_used
            if left <= n:
                self._blocks.popleft()
                self._head_used = 0
                gone = left
            else:
                self._head_used += n
                gone = n
            self._windows -= gone
            self._count_dropped(head.source, gone)
            n -= gone

    def _count_dropped(self, source: str, n: int) -> None:
        self.dropped += n
        self.dropped_by_source[source] += n

    def get_batch(self, max_batch: int, max_wait_s: float, idle_timeout_s: float = 0.1,
                  up_to: int = 0) -> WindowBatch:
        """Up to ``max_batch`` windows — or ``up_to`` when that many are already queued: waiting fills
        one batch, what is waiting beyond it is taken at once; an empty batch when none arrived within
        ``idle_timeout_s``. Returns early (with what it has) after ``close`` or ``interrupt``."""
        with self._windows_queued:
            if not self._windows and not self._closed and not self._interrupted:
                self._windows_queued.wait(idle_timeout_s)
            if not self._windows:
                self._interrupted = False
                return WindowBatch([])
            deadline = time.monotonic() + max_wait_s
            while self._windows < max_batch and not self._closed and not self._interrupted:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._windows_queued.wait(left)
            self._interrupted = False
            batch = self._take(max(max_batch, up_to))
            if self.capacity - self._windows >= self._resume_room:
                self._room_made.notify_all()
            return batch

    def _take(self, n: int) -> WindowBatch:
        """The ``n`` oldest windows (or all there are): whole blocks, and a slice of the last one."""
        blocks = []
        while n > 0 and self._blocks:
            head, used = self._blocks[0], self._head_used
            if len(head) - used <= n:
                self._blocks.popleft()
                self._head_used = 0
                blocks.append(head[used:] if used else head)
            else:
                self._head_used = used + n
                blocks.append(head[used:used + n])
            n -= len(blocks[-1])
            self._windows -= len(blocks[-1])
        return WindowBatch(blocks)

    def interrupt(self) -> None:
        """Make a waiting ``get_batch`` return now (the queue stays open: sources keep going)."""
        with self._windows_queued:
            self._interrupted = True
            self._windows_queued.notify_all()

    def close(self) -> None:
        """Stop accepting windows and wake every waiter (a partial batch is returned at once)."""
        with self._windows_queued:
            self._closed = True
            self._windows_queued.notify_all()
            self._room_made.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
