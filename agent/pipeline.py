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
import threading
import time
from collections import Counter, deque
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
from edgeopt.agent.worker import SLOTS, InferenceWorker, WorkerGone, unsuitable
from edgeopt.errors import EdgeoptError

log = logging.getLogger("edgeopt.agent")

# windows taken from the queue at once when they are waiting, in calls of max_batch (Pipeline.take): on
# the IMU model 32 -> 256 took the LiteRT agent from 0.47x to 0.62x a bare loop at batch 32; 512 gained
# a few % more but took the agent's peak RSS past 60 MiB (docs/benchmarks.md, "Issue 18")
TAKE_WINDOWS = 256
# Pipeline.inference() before any model runs
NO_INFERENCE = {"process": "thread", "worker_pid": None, "note": "no model yet", "worker_private_bytes": 0,
                "worker_peak_private_bytes": 0}


class ResultWriter:
    """Records and sink writes, in batch order, on one thread.

    It takes every batch queued since it last looked and encodes those of one model together (one
    encoder call per column, one write per sink): when inference runs ahead, the writer's cost per
    window falls instead of holding inference back. At most ``backlog`` batches wait; past that
    ``submit`` waits (a slow sink holds back inference, and through the window queue the sources)."""

    def __init__(self, model: LoadedModel, sinks: list[Sink], meta: dict[str, Any], backlog: int = 8):
        self.model = model
        self.sinks = sinks
        self.meta = meta
        self.sink_errors = 0  # windows a sink failed to take
        self.windows_written = 0
        self.lap = Lap()  # wait, encode, sink:KIND (agent/profile.py)
        self._backlog = backlog
        # the writer is woken when half the backlog waits (or a burst ends), not for every batch: waking a
        # thread costs the inference loop more than a small batch's hand-off (docs/agent.md, "Threads")
        self._wake_at = max(1, backlog // 2)
        self._items: deque = deque()  # (batch, outputs, model), or None: stop
        lock = threading.Lock()
        self._queued = threading.Condition(lock)  # the writer waits on it
        self._room = threading.Condition(lock)    # submit waits on it while the backlog is full
        self._thread = threading.Thread(target=self._run, name="result-writer", daemon=True)
        self._thread.start()
        self._last_error_log = -1e9

    def submit(self, batch: WindowBatch, outputs: dict[str, np.ndarray], model: LoadedModel | None = None) -> None:
        """Queue one batch's results; ``model`` is the one that produced them (it changes at a switch)."""
        self._put((batch, outputs, model or self.model))

    def _put(self, item, wake: bool = False) -> None:
        with self._queued:
            while len(self._items) >= self._backlog:
                self._room.wait()
            self._items.append(item)
            if wake or len(self._items) >= self._wake_at:
                self._queued.notify()

    def wake(self) -> None:
        """Let the writer take what is queued now: the inference loop calls it when a burst of batches
        ends (``Pipeline.step``), so results wait at most one burst."""
        with self._queued:
            if self._items:
                self._queued.notify()

    def _take(self) -> list:
        """Every queued item (waiting for the first)."""
        with self._queued:
            while not self._items:
                self._queued.wait()
            items = list(self._items)
            self._items.clear()
            self._room.notify_all()
            return items

    def _run(self) -> None:
        lap = self.lap
        lap.restart()
        while True:
            items = self._take()
            lap("wait")
            stop = items[-1] is None
            if stop:
                items.pop()
            for group in _by_model(items):
                self._write(group)
            if stop:
                return

    def _write(self, group: list) -> None:
        """The results of consecutive batches of one model, encoded together and written to every sink."""
        lap = self.lap
        model = group[0][2]
        batch = group[0][0] if len(group) == 1 else WindowBatch([b for item in group for b in item[0].blocks])
        outputs = group[0][1] if len(group) == 1 else {
            name: np.concatenate([item[1][name] for item in group]) for name in group[0][1]}
        meta = {**self.meta, "model": {"name": model.name, "version": model.version}}
        try:
            results = encode_results(meta, batch, outputs)
        except Exception:  # a bug; keep going, say so
            log.exception("cannot build result records")
            self.sink_errors += len(batch)
            return
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
        self._put(None, wake=True)
        self._thread.join(timeout)


def queue_capacity(config: AgentConfig, model: LoadedModel) -> int:
    """Windows the queue holds: ``queue_windows``, fewer when they would pass ``queue_bytes``."""
    b = config.batching
    window_bytes = 4 * int(np.prod(model.pre.window_shape))  # float32
    return max(min(b.queue_windows, b.queue_bytes // window_bytes), min(b.max_batch, b.queue_windows))


def _by_model(items: list) -> list[list]:
    """Runs of consecutive items whose batches one model produced (with the same output names)."""
    groups: list[list] = []
    for item in items:
        if groups and groups[-1][0][2] is item[2] and groups[-1][0][1].keys() == item[1].keys():
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


class Pipeline:
    def __init__(self, config: AgentConfig, model: LoadedModel, sinks: list[Sink], device_id: str,
                 stats: InferenceStats, transport=None):
        self.config = config
        self.model = model
        self.sinks = sinks
        self.stats = stats
        self.queue = WindowQueue(queue_capacity(config, model), config.batching.overflow)
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
        # the model's calls in a forked process when it can run there (agent/worker.py); the takes
        # sent to it and not yet received: (batch, model)
        self.worker: InferenceWorker | None = None
        self.process = "thread"  # where the model's calls run: "worker" once one starts, until one dies
        self.worker_note = ""  # why the model runs on this thread instead, when it does
        self.worker_peak_private = 0  # the largest worker's own memory seen, bytes
        self._inflight: deque[tuple[WindowBatch, LoadedModel]] = deque()

    def start(self) -> None:
        self._start_worker()  # before the sources: the fewer pages the agent has written, the fewer it copies
        self.lap.restart()
        for src in self.sources:
            src.start()

    def _start_worker(self) -> None:
        self.process = "thread"
        if self.config.model.process == "thread":
            self.worker_note = "[model] process = \"thread\""
            return
        self.worker_note = unsuitable(self.model) or ""
        if self.worker_note:
            log.info("running the model on the agent's thread: %s", self.worker_note)
            return
        try:
            self.worker = InferenceWorker(self.model, self.take, self.model.call_step(self.take, self.max_batch))
        except OSError as exc:  # no memory or processes left for it
            self.worker_note = f"cannot start the inference worker: {exc}"
            log.warning("running the model on the agent's thread: %s", self.worker_note)
            return
        self.process = "worker"

    def _stop_worker(self) -> None:
        self._drain()
        if self.worker is not None:
            self.worker_peak_private = max(self.worker_peak_private, self.worker.private_bytes())
            self.worker.close()
            self.worker = None

    def inference(self) -> dict[str, Any]:
        """Where the model's calls run, for telemetry: ``process`` ("worker" or "thread"); while a worker
        runs, its pid and its own memory (bytes); the largest it held; why the thread, when it is that."""
        w = self.worker
        private = w.private_bytes() if w is not None else 0
        self.worker_peak_private = max(self.worker_peak_private, private)
        return {"process": self.process, "worker_pid": w.pid if w is not None else None, "note": self.worker_note,
                "worker_private_bytes": private, "worker_peak_private_bytes": self.worker_peak_private}

    def step(self, idle_timeout_s: float = 0.1, burst_s: float = 0.005) -> int:
        """Take one batch (waiting at most ``idle_timeout_s`` for its first window), infer, write; then
        more while full batches are waiting, for up to ``burst_s`` (the service loop's checks run
        between bursts, not between every two batches). With a worker, up to ``SLOTS`` takes stay in
        flight between steps (it computes while the service loop runs); a step with no full batch to
        send takes the oldest one's results instead. Returns the number of windows handled."""
        self.lap("agent")  # the service loop's work since the last batch
        if self._inflight and len(self.queue) < self.max_batch:
            # no full batch to send the worker meanwhile: its results first (they come back in order)
            done = len(self._inflight[0][0])
            self._receive()
            self.writer.wake()
            return done
        take = self.take
        batch = self.queue.get_batch(self.max_batch, self.max_wait_s, idle_timeout_s, take)
        self.lap("queue_wait")
        if not batch:
            return 0
        self.infer(batch)
        done = len(batch)
        deadline = time.monotonic() + burst_s
        while len(self.queue) >= self.max_batch and time.monotonic() < deadline:
            batch = self.queue.get_batch(self.max_batch, 0.0, 0.0, take)
            self.lap("queue_wait")
            self.infer(batch)
            done += len(batch)
        self.writer.wake()
        return done

    @property
    def take(self) -> int:
        """Windows taken from the queue at once when they are waiting: several calls' worth
        (``TAKE_WINDOWS``, or one call's when ``max_batch`` is bigger), so the queue, the statistics, the
        observers and the writer's hand-off are paid once for all of them — each call still gets
        ``max_batch``."""
        return self.max_batch * max(1, TAKE_WINDOWS // self.max_batch)

    def infer(self, batch: WindowBatch) -> None:
        """Run the model on ``batch``: sent to the worker (its results are taken when the next take
        needs the slot, or by ``_drain``), else here."""
        worker = self.worker
        if worker is None:
            self._infer_here(batch, self.model)
            return
        if len(self._inflight) == SLOTS:
            self._receive()
            if self.worker is None:  # it died: the takes went to this thread
                self._infer_here(batch, self.model)
                return
        try:
            worker.send(batch)
        except WorkerGone as exc:
            self._worker_gone(exc, [(batch, self.model)])
            return
        except EdgeoptError:  # the model refuses the call's shape: said on this thread
            self._drain()
            self._infer_here(batch, self.model)
            return
        self.lap("inference")
        self._inflight.append((batch, self.model))

    def _receive(self) -> None:
        """Wait for the oldest take in flight and hand its results on (its windows count as inferred
        then: a take the worker did not finish runs again on this thread)."""
        batch, model = self._inflight.popleft()
        try:
            result = self.worker.receive(len(batch))  # type: ignore[union-attr]
        except WorkerGone as exc:
            self._worker_gone(exc, [(batch, model)])
            return
        self.lap("inference")
        if result is None:  # a call failed: run the take here, which says why and loses only that call
            self._infer_here(batch, model)
            return
        self.windows_inferred += len(batch)
        self._done(batch, model, *result)

    def _drain(self) -> None:
        """Receive every take in flight."""
        while self._inflight:
            self._receive()

    def _worker_gone(self, exc: WorkerGone, pending: list[tuple[WindowBatch, LoadedModel]]) -> None:
        """The worker exited: its takes in flight (and ``pending``) run here, as every later one."""
        pending = [*pending, *self._inflight]
        self._inflight.clear()
        log.error("the inference worker (pid %d) exited (%s); running the model on the agent's thread",
                  self.worker.pid if self.worker else 0, exc)
        self._stop_worker()
        self.process, self.worker_note = "thread", f"the inference worker exited ({exc})"
        for batch, model in pending:
            self._infer_here(batch, model)

    def _infer_here(self, batch: WindowBatch, model: LoadedModel) -> None:
        lap = self.lap
        self.windows_inferred += len(batch)
        try:
            outputs, calls = model.run_calls(batch, self.max_batch)
        except EdgeoptError as exc:
            if len(batch) > self.max_batch:  # a take of several calls: only the failing call's windows are lost
                self.windows_inferred -= len(batch)
                for part in batch.split(self.max_batch):
                    self._infer_here(part, model)
                return
            lap("inference")
            self.inference_errors += len(batch)
            log.error("inference failed on %d window(s) (%s): %s", len(batch), batch.describe(), exc)
            self._observe(batch, None, 0.0, model)
            lap("agent")
            return
        lap("inference")
        self._done(batch, model, outputs, calls)

    def _done(self, batch: WindowBatch, model: LoadedModel, outputs: dict[str, np.ndarray],
              calls: list[tuple[int, float]]) -> None:
        """A take's results: to the writer, the statistics and the observers."""
        lap = self.lap
        self.writer.submit(batch.labels(), outputs, model)
        lap("handoff")
        self.stats.record_calls(calls)
        # observers compare latencies: the longest call, not the take (which may be several calls)
        self._observe(batch, outputs, max(seconds for _, seconds in calls), model)
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
        """Use ``model`` from the next batch on (between two batches: no window is lost or repeated); a
        worker running the old one is replaced by one forked with the new one."""
        self._stop_worker()
        self.model = model
        self.max_batch = min(self.config.batching.max_batch, model.fixed_batch or self.config.batching.max_batch)
        self._start_worker()

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
        returns how many windows were inferred here (with the worker's takes in flight when it began)."""
        before = self.windows_inferred
        while len(self.queue):
            self.step(0.0)
        self._stop_worker()
        self.writer.close(timeout)
        return self.windows_inferred - before

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
