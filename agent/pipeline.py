"""One running pipeline: the loaded model, its window queue, the sources feeding it, and the
thread that writes results to the sinks.

The inference loop only takes a batch (a view of the queued windows) and calls the runtime (which
releases the GIL); encoding the results and writing them happens in ``ResultWriter``'s thread, so
the two overlap. The writer's queue is bounded: slow sinks hold back inference, and through the window
queue, the sources (or the overflow policy drops, counted). A pipeline is built when a model
becomes active (or the configuration is reloaded) and torn down before the next one is built; the
agent adds its counters to its totals.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from typing import Any

import numpy as np

from edgeopt.agent.batcher import WindowQueue
from edgeopt.agent.config import AgentConfig
from edgeopt.agent.model import LoadedModel
from edgeopt.agent.profile import Lap, Profile
from edgeopt.agent.results import encode_results
from edgeopt.agent.sinks import Sink
from edgeopt.agent.sources import Source, SourceContext, make_source
from edgeopt.agent.telemetry import InferenceStats
from edgeopt.agent.windowing import WindowBatch
from edgeopt.errors import EdgeoptError

log = logging.getLogger("edgeopt.agent")


class ResultWriter:
    """Records and sink writes, in batch order, on one thread."""

    def __init__(self, model: LoadedModel, sinks: list[Sink], meta: dict[str, Any], backlog: int = 8):
        self.model = model
        self.sinks = sinks
        self.meta = meta
        self.sink_errors = 0  # windows a sink failed to take
        self.windows_written = 0
        self.lap = Lap()  # wait, encode, sink:KIND (agent/profile.py)
        self._queue: queue.Queue = queue.Queue(backlog)
        self._thread = threading.Thread(target=self._run, name="result-writer", daemon=True)
        self._thread.start()
        self._last_error_log = -1e9

    def submit(self, batch: WindowBatch, outputs: dict[str, np.ndarray], model: LoadedModel | None = None) -> None:
        """Queue one batch's results; ``model`` is the one that produced them (it changes at a switch)."""
        self._queue.put((batch, outputs, model or self.model))

    def _run(self) -> None:
        lap = self.lap
        lap.restart()
        while True:
            item = self._queue.get()
            lap("wait")
            if item is None:
                return
            batch, outputs, model = item
            meta = {**self.meta, "model": {"name": model.name, "version": model.version}}
            try:
                results = encode_results(meta, batch, outputs)
            except Exception:  # a bug; keep going, say so
                log.exception("cannot build result records")
                self.sink_errors += len(batch)
                continue
            finally:
                lap("encode")
            for sink in self.sinks:
                try:
                    sink.write(results)
                except Exception as exc:  # disk full, a broken pipe: count, log now and then, go on
                    self.sink_errors += len(batch)
                    if time.monotonic() - self._last_error_log > 10:
                        self._last_error_log = time.monotonic()
                        log.error("%s sink failed on %d result(s): %s", sink.kind, len(batch), exc)
                lap(f"sink:{sink.kind}")
            self.windows_written += len(batch)

    def close(self, timeout: float = 5.0) -> None:
        """Write everything submitted, then stop."""
        self._queue.put(None)
        self._thread.join(timeout)


class Pipeline:
    def __init__(self, config: AgentConfig, model: LoadedModel, sinks: list[Sink], device_id: str,
                 stats: InferenceStats, transport=None):
        self.config = config
        self.model = model
        self.sinks = sinks
        self.stats = stats
        self.queue = WindowQueue(config.batching.queue_windows, config.batching.overflow)
        ctx = SourceContext(model.pre, config.preprocessing.nan_policy, self.queue, transport)
        self.sources: list[Source] = [make_source(cfg, ctx) for cfg in config.sources]
        self.max_batch = min(config.batching.max_batch, model.fixed_batch or config.batching.max_batch)
        self.max_wait_s = config.batching.max_wait_ms / 1000.0
        self.meta = {"device": device_id, "model": {"name": model.name, "version": model.version}}
        self.inference_errors = 0  # windows lost to a failing inference call
        self.windows_inferred = 0
        self.writer = ResultWriter(model, sinks, self.meta)
        # where the time goes, per thread and stage (agent/profile.py); ``lap`` is the inference loop's
        self.lap = Lap()
        self.profile = Profile()
        for src in self.sources:
            self.profile.add(f"source:{src.name}", src.lap, lambda src=src: src.windows_cut)
        self.profile.add("inference", self.lap, lambda: self.windows_inferred)
        self.profile.add("writer", self.writer.lap, lambda: self.writer.windows_written)
        # called after every batch with (windows, outputs or None, seconds, model): the updater's
        # shadow and probation watch live windows this way
        self.observers: list = []

    def start(self) -> None:
        self.lap.restart()
        for src in self.sources:
            src.start()

    def step(self, idle_timeout_s: float = 0.1) -> int:
        """Take one batch (waiting at most ``idle_timeout_s`` for its first window), infer, write; returns
        the number of windows handled."""
        self.lap("agent")  # the service loop's work since the last batch
        batch = self.queue.get_batch(self.max_batch, self.max_wait_s, idle_timeout_s)
        self.lap("queue_wait")
        if batch:
            self.infer(batch)
        return len(batch)

    def infer(self, batch: WindowBatch) -> None:
        model, lap = self.model, self.lap
        self.windows_inferred += len(batch)
        try:
            outputs, seconds = model.infer(batch)
        except EdgeoptError as exc:
            lap("inference")
            self.inference_errors += len(batch)
            log.error("inference failed on %d window(s) (%s): %s", len(batch), batch.describe(), exc)
            self._observe(batch, None, 0.0, model)
            lap("agent")
            return
        lap("inference")
        self.stats.record(len(batch), seconds)
        lap("agent")
        self.writer.submit(batch, outputs, model)
        lap("handoff")
        self._observe(batch, outputs, seconds, model)
        lap("agent")

    def _observe(self, batch: WindowBatch, outputs, seconds: float, model: LoadedModel) -> None:
        for observer in list(self.observers):
            try:
                observer(batch, outputs, seconds, model)
            except Exception:  # an observer must never stop inference
                log.exception("batch observer failed")

    def can_swap_to(self, model: LoadedModel) -> bool:
        """Whether ``model`` takes the same windows (the sources window and normalize for the model)."""
        a, b = self.model.pre, model.pre
        same = (a.window, a.hop, a.channels_first, a.channels, a.channel_names, a.sample_rate_hz) == (
            b.window, b.hop, b.channels_first, b.channels, b.channel_names, b.sample_rate_hz)
        arrays = all((x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))
                     for x, y in ((a.mean, b.mean), (a.std, b.std)))
        return same and arrays and self.model.sample_shape == model.sample_shape

    def swap_model(self, model: LoadedModel) -> None:
        """Use ``model`` from the next batch on (between two batches: no window is lost or repeated)."""
        self.model = model
        self.max_batch = min(self.config.batching.max_batch, model.fixed_batch or self.config.batching.max_batch)

    @property
    def sources_finished(self) -> bool:
        return all(s.finished for s in self.sources)

    def stop_sources(self, timeout: float = 1.0) -> None:
        """Close the queue (blocked sources give up at once), stop and join every source."""
        self.queue.close()
        for src in self.sources:
            src.stop()
        deadline = time.monotonic() + timeout
        for src in self.sources:
            src.join(max(0.0, deadline - time.monotonic()))

    def flush(self, timeout: float = 5.0) -> int:
        """Infer every window still queued (the partial batch included) and write every result;
        returns how many windows were inferred here."""
        done = 0
        while len(self.queue):
            done += self.step(0.0)
        self.writer.close(timeout)
        return done

    def counters(self) -> Counter[str]:
        c: Counter[str] = Counter()
        c["windows_in"] = self.queue.windows_in
        c["queue_overflow"] = self.queue.dropped
        c["inference_errors"] = self.inference_errors
        c["sink_errors"] = self.writer.sink_errors
        c["state_resets"] = self.model.state_resets
        for s in self.sources:
            st = s.stats()
            c["samples_in"] += st["samples"]
            c["malformed_rows"] += st["malformed_rows"]
            c["nan_windows"] += st["nan_windows_dropped"]
            c["stopped_mid_window"] += st["dropped_at_stop"]
        return c

    def source_stats(self) -> dict[str, Any]:
        return {s.name: s.stats() for s in self.sources}
