"""Where a running pipeline spends its time: per thread, per stage, per window.

Each thread of the pipeline (every source, the inference loop, the result writer) owns a ``Lap``, a
stopwatch that charges the time since its previous call to the stage it names. Every moment of a
thread is charged to some stage — waits included — so a thread's stages add up to its wall time,
and divided by the windows the thread handled they give the time per window an operator can set
against the model's own. It costs one clock read and one dict update per stage per batch (not per
window): it is always on.

Stages (docs/agent.md, "Where the time goes"):
- a source: ``read`` (the source's own work and waiting for samples: file reads and parsing, the
  recorded rate, a socket), ``preprocess`` (NaN policy, channel order, normalization), ``window``
  (cutting windows), ``queue_wait`` (handing windows to the queue, waiting for room when it is full);
- inference: ``queue_wait`` (waiting for windows and for a batch to fill), ``inference`` (the model
  call with its checks), ``handoff`` (queueing results for the writer, waiting while it is behind),
  ``agent`` (statistics, update observers, the service loop between batches);
- writer: ``wait`` (for results), ``encode`` (JSON records), ``sink:KIND`` (writing or publishing).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from time import perf_counter_ns
from typing import Any


class Lap:
    """One thread's stopwatch: ``lap(stage)`` charges the time since the previous lap to ``stage``."""

    __slots__ = ("ns", "_t")

    def __init__(self) -> None:
        self.ns: dict[str, int] = {}
        self._t = perf_counter_ns()

    def restart(self) -> None:
        """Start timing now (the thread starts; what came before is not its time)."""
        self._t = perf_counter_ns()

    def __call__(self, stage: str) -> None:
        now = perf_counter_ns()
        self.ns[stage] = self.ns.get(stage, 0) + now - self._t
        self._t = now


class Profile:
    """The laps of one pipeline's threads, and what each thread's window count is."""

    def __init__(self) -> None:
        self._threads: dict[str, tuple[Lap, Callable[[], int]]] = {}
        self._lock = threading.Lock()

    def add(self, thread: str, lap: Lap, windows: Callable[[], int]) -> None:
        """Report ``lap`` as ``thread``'s; ``windows()`` tells how many windows the thread has handled."""
        with self._lock:
            self._threads[thread] = (lap, windows)

    def snapshot(self) -> dict[str, Any]:
        """Per thread: windows handled, seconds charged, and microseconds per window per stage."""
        with self._lock:
            threads = list(self._threads.items())
        out: dict[str, Any] = {}
        for name, (lap, windows) in threads:
            ns = dict(lap.ns)  # a copy: the thread keeps adding
            n = windows()
            out[name] = {"windows": n, "seconds": round(sum(ns.values()) / 1e9, 6),
                         "us_per_window": {stage: round(v / 1e3 / n, 3) if n else None for stage, v in ns.items()}}
        return out
