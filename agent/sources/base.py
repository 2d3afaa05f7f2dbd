"""Sources: where sensor samples come from. Each runs in its own thread and feeds its own windower.

One small interface: a source implements ``_run()``, which calls ``self.bind(names, count)`` once
it knows its channels (a CSV header, the configured names, or the model's count) and then
``self.emit(samples [n, C], timestamps [n])`` as samples arrive, returning when the source ends
or ``self.stopping`` is set. The base class turns failures into a source status (``error`` with a
one-line message, shown in the agent's state) without touching the other sources.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from edgeopt.agent.batcher import QueueClosed, WindowQueue
from edgeopt.agent.config import SourceBase
from edgeopt.agent.profile import Lap
from edgeopt.agent.windowing import Preprocessing, Windower, channel_map
from edgeopt.errors import EdgeoptError

log = logging.getLogger("edgeopt.agent.sources")

DEFAULT_RATE_HZ = 50.0


@dataclass
class SourceContext:
    """What the service hands every source."""

    pre: Preprocessing
    nan_policy: str
    queue: WindowQueue
    transport: Any = None  # MqttTransport, for mqtt sources

    @property
    def rate_hz(self) -> float:
        return self.pre.sample_rate_hz or DEFAULT_RATE_HZ


class Source:
    kind: ClassVar[str] = ""

    def __init__(self, cfg: SourceBase, ctx: SourceContext):
        self.cfg = cfg
        self.name = cfg.name
        self.ctx = ctx
        self.stopping = threading.Event()
        self.status = "starting"
        self.error: str | None = None
        self.malformed = 0
        self.dropped_at_stop = 0
        self.windower: Windower | None = None
        self._thread: threading.Thread | None = None
        self._malformed_logged = 0
        self.lap = Lap()  # this source's thread: read, preprocess, window, queue_wait (agent/profile.py)

    # -- hooks ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        raise NotImplementedError

    def _wake(self) -> None:
        """Unblock ``_run`` on stop (close a socket...); default: ``_run`` polls ``self.stopping``."""

    # -- for implementations -------------------------------------------------------------------------
    def bind(self, names: list[str] | None, count: int | None = None) -> None:
        """Declare this source's channels; raises naming the mismatch with the model's."""
        names = list(self.cfg.channels) or names
        index = channel_map(self.name, names, count, self.ctx.pre)
        self.windower = Windower(self.name, self.ctx.pre, self.ctx.nan_policy, index)

    @property
    def channels_sent(self) -> int:
        """How many channels each sample of this source has (the configured names, else the model's)."""
        return len(self.cfg.channels) or self.ctx.pre.channels

    def emit(self, samples: np.ndarray, timestamps: np.ndarray) -> None:
        if self.windower is None:
            raise RuntimeError("Source.bind() must come before emit()")
        lap = self.lap
        lap("read")  # everything since the last emit: the source's own reading (and waiting)
        block = self.windower.push(samples, timestamps, lap)
        if not len(block):
            return
        try:
            self.ctx.queue.put(block)
        except QueueClosed as closed:  # shutting down: windows cut but never queued are counted
            self.dropped_at_stop += len(block) - closed.queued
            raise
        finally:
            lap("queue_wait")

    @property
    def windows_cut(self) -> int:
        return self.windower.seq if self.windower else 0

    def count_malformed(self, n: int, detail: str) -> None:
        self.malformed += n
        if self._malformed_logged < 5:
            self._malformed_logged += 1
            log.warning("source '%s': skipped malformed input: %s", self.name, detail)

    def sleep_until(self, deadline: float) -> bool:
        """Sleep until ``deadline`` (monotonic); False when the source is stopping."""
        left = deadline - time.monotonic()
        return not self.stopping.wait(left) if left > 0 else not self.stopping.is_set()

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=f"source-{self.name}", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        self.status = "running"
        self.lap.restart()
        try:
            self._run()
            self.status = "stopped" if self.stopping.is_set() else "ended"
        except QueueClosed:
            self.status = "stopped"
        except EdgeoptError as exc:
            self._fail(str(exc))
        except OSError as exc:
            self._fail(f"source '{self.name}': {exc.strerror or exc}"
                       f"{' (' + str(exc.filename) + ')' if exc.filename else ''}")
        except Exception as exc:  # a bug: keep the agent and the other sources running, say what broke
            log.exception("source '%s' crashed", self.name)
            self._fail(f"source '{self.name}' failed: {type(exc).__name__}: {exc}")

    def _fail(self, message: str) -> None:
        self.status = "error"
        self.error = message
        log.error("%s", message)

    def stop(self) -> None:
        self.stopping.set()
        self._wake()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def finished(self) -> bool:
        return self.status in ("ended", "stopped", "error")

    def stats(self) -> dict[str, Any]:
        w = self.windower
        return {"type": self.kind, "status": self.status, "error": self.error,
                "samples": w.samples_in if w else 0, "windows": w.seq if w else 0,
                "malformed_rows": self.malformed, "nan_windows_dropped": w.nan_windows if w else 0,
                "dropped_at_stop": self.dropped_at_stop}


def parse_lines(text: str, n_fields: int, source: Source, timestamped: bool) -> tuple[np.ndarray, np.ndarray]:
    """Lines 'v0,v1,...' (or 't,v0,v1,...') → (samples [n, C], timestamps [n]); malformed lines
    (wrong field count, not numbers) are counted on ``source`` and skipped."""
    rows, stamps = [], []
    now = time.time()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(",")
        want = n_fields + (1 if timestamped else 0)
        if len(fields) != want:
            source.count_malformed(1, f"expected {want} fields, got {len(fields)}: {line[:80]!r}")
            continue
        try:
            values = [float(f) for f in fields]
        except ValueError:
            source.count_malformed(1, f"not a number in {line[:80]!r}")
            continue
        if timestamped:
            stamps.append(values[0])
            values = values[1:]
        else:
            stamps.append(now)
        rows.append(values)
    if not rows:
        return np.empty((0, n_fields), np.float32), np.empty(0)
    return np.asarray(rows, np.float32), np.asarray(stamps, np.float64)

