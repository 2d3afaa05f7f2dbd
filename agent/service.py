"""The agent's run loop: model from the state directory, sources → windows → batches → model →
sinks, MQTT state and telemetry, systemd notification, and the signals.

- SIGTERM / SIGINT: the window queue closes (sources stop at once), the windows still queued (the
  partial batch) are inferred and written, the outbox is drained to the broker while time remains,
  the retained state says ``online: false``, and the process exits 0 — all within
  ``[agent] shutdown_timeout_s``.
- SIGHUP: the configuration file is read again; if it is valid the pipeline is rebuilt with it
  (the same graceful steps, without exiting), otherwise the agent keeps running the old one and its
  state names the error.
- No model, or a model that cannot load (its runtime is not installed, a tampered file): the agent
  stays up, says so in its state and status file, and looks at the active slot again every
  ``[model] poll_interval_s`` seconds (and on SIGHUP).
- A slot that cannot be read or fails its hashes (at start, or when swapping or rolling back to it)
  is named in the state's ``slot_errors`` {slot: reason}; the agent falls back to the other slot when
  that one passed its checks before, else runs no model — it never stops for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from typing import Any

from edgeopt import __version__
from edgeopt.agent.config import AgentConfig, load_config
from edgeopt.agent.model import LoadedModel, NoModel, load_active_model
from edgeopt.agent.outbox import Outbox
from edgeopt.agent.pipeline import NO_INFERENCE, Pipeline
from edgeopt.agent.sinks import Sink, make_sink
from edgeopt.agent.sinks.mqtt import ResultPublisher
from edgeopt.agent.statedir import SLOTS, StateDir
from edgeopt.agent.systemd import Notifier
from edgeopt.agent.telemetry import InferenceStats, RejectedMessages, Uptime, rss_bytes
from edgeopt.agent.transport import MqttTransport
from edgeopt.agent.update.machine import reason_text
from edgeopt.errors import EdgeoptError
from edgeopt.fsutil import atomic_write_json
from edgeopt.protocol import (
    MAX_SOURCES,
    DeviceState,
    Health,
    ModelRef,
    ProtocolError,
    SourceStatus,
    UpdateStatus,
    clean_text,
    encode_state,
    encode_telemetry,
    is_name,
    offline_will,
    parse_device_topic,
)

log = logging.getLogger("edgeopt.agent")

EXIT_OK = 0
EXIT_SOURCE_FAILED = 1


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.notifier = Notifier(config.systemd.notify)
        self.uptime = Uptime()
        self.stats = InferenceStats()
        self.rejected = RejectedMessages()  # network messages refused, by topic kind and reason (kept across reloads)
        self._rejected_published = 0
        self.totals: Counter[str] = Counter()  # counters of pipelines already torn down
        self._worker_peak = 0  # the largest inference worker's own memory seen, bytes (agent/worker.py)
        self._inference_history = dict(NO_INFERENCE)  # where the last pipeline's model ran
        self.pipeline: Pipeline | None = None
        self.model: LoadedModel | None = None
        self.status = "starting"
        self.error: str | None = None
        self.config_error: str | None = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._model_key: tuple | None = None
        self._next_model_look = 0.0
        self._state_lock = threading.Lock()
        self.transport = None
        self.publisher = None
        self.outbox: Outbox | None = None
        self.sinks: list[Sink] = []
        self.updater = None
        self.fallback_note: str | None = None
        self.slot_errors: dict[str, str] = {}  # slot → why it cannot be used (for the state message)
        self.updates_note: str | None = None  # why updates are off, for the state message
        self.batch_observers: list = []       # shared with every pipeline (see Pipeline.observers)
        self._swap: tuple | None = None
        self._swap_lock = threading.Lock()

    # -- signals ----------------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        # Python runs a signal handler in the main thread between two bytecodes, also while that
        # thread holds a lock: the window queue's (inside get_batch) or an Event's (inside
        # Event.wait). Those locks are not re-entrant, so a handler that takes one (queue.close(),
        # Event.set()) waits for its own thread for ever and SIGTERM never stops the agent (seen
        # under load). The handler only writes the signal number to a pipe; the "signals" thread
        # acts on it, taking the locks like any other thread.
        read_fd, self._signal_fd = os.pipe()  # not inherited by children
        os.set_blocking(self._signal_fd, False)  # a handler must never block
        threading.Thread(target=self._signal_loop, args=(read_fd,), name="signals", daemon=True).start()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        with contextlib.suppress(OSError):  # the pipe full (thousands of signals unread): this one is moot
            os.write(self._signal_fd, bytes([signum]))

    def _signal_loop(self, read_fd: int) -> None:
        while True:
            for signum in os.read(read_fd, 64):
                if signum == signal.SIGHUP:
                    self._reload.set()
                    p = self.pipeline
                    if p is not None:
                        # wake the loop without closing the queue: a rejected config keeps this pipeline running
                        p.queue.interrupt()
                else:
                    self.request_stop()

    def request_stop(self) -> None:
        self._stop.set()
        p = self.pipeline  # called from the signals thread too: the main thread may tear it down meanwhile
        if p is not None:
            p.queue.close()  # a waiting batch returns at once, sources stop

    # -- set-up -----------------------------------------------------------------------------------------
    def _open_io(self) -> None:
        cfg = self.config
        self.state = StateDir(cfg.state_dir)
        self.state.ensure()
        if cfg.mqtt.host:
            self.transport = MqttTransport(cfg.mqtt, cfg.mqtt.client_id or f"edgeopt-agent-{cfg.device_id}",
                                           cfg.topic("state"), offline_will(cfg.device_id))
            self.transport.on_connect_hooks.append(self.publish_state)
            self.transport.on_unmatched = self._on_unmatched
            if any(s.type == "mqtt" for s in cfg.sinks):
                self.outbox = Outbox(cfg.outbox_dir, cfg.outbox.max_bytes, cfg.outbox.segment_bytes,
                                     cfg.outbox.fsync_interval_s)
                self.publisher = ResultPublisher(self.transport, self.outbox, cfg.mqtt.max_inflight)
                self.publisher.start()
            self.transport.start()
        self.sinks = [make_sink(s, topic=cfg.topic("results"), outbox=self.outbox, publisher=self.publisher)
                      for s in cfg.sinks]

    def _start_updater_after_model(self) -> None:
        """The updater starts once the active model was looked for: started before, the retained
        desired message could find no model yet and start an update to the version already running
        (downloaded, self-tested and swapped in again on every restart)."""
        if self.transport is not None:
            self._start_updater()

    def _start_updater(self) -> None:
        self.updater, self.updates_note = None, None
        if not self.config.update.enabled:
            self.updates_note = "updates disabled in [update]"
            return

        # here: updates come over MQTT, and a board without a broker is spared the update machinery's ~1 MiB
        from edgeopt.agent.update.updater import Updater

        try:
            self.updater = Updater(self, self.config, self.transport, self.config.device_id)
        except EdgeoptError as exc:
            self.updates_note = f"updates off: {exc}"
            log.warning("%s", self.updates_note)
            return
        self.updater.start()

    def _close_io(self, deadline: float) -> None:
        if self.updater is not None:  # stopped, but kept: the last state message still reports it
            self.updater.stop(timeout=max(0.1, min(1.0, deadline - time.monotonic() - 1)))
        for sink in self.sinks:
            sink.close()
        if self.publisher is not None:
            if not self.publisher.drain(max(0.0, deadline - time.monotonic() - 0.3)):
                log.warning("stopping with %d result message(s) not yet acknowledged; they stay in the outbox "
                            "and are sent on the next start", self.outbox.pending)
            self.publisher.stop()
        if self.outbox is not None:
            self.outbox.close()
        self.write_status()
        if self.transport is not None:
            if self.transport.connected.is_set():
                info = self.transport.client.publish(self.config.topic("state"), self._state_payload(online=False),
                                                     qos=1, retain=True)
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(max(0.05, min(0.5, deadline - time.monotonic())))
            self.transport.stop(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
        self.transport = self.publisher = self.outbox = None
        self.sinks = []

    # -- model ------------------------------------------------------------------------------------------
    def _model_identity(self) -> tuple:
        slot = self.state.active_slot()
        if slot is None:
            return (None,)
        manifest = self.state.slot_path(slot) / "manifest.json"
        try:
            return (slot, manifest.stat().st_mtime_ns)
        except FileNotFoundError:
            return (slot, None)
        except OSError as exc:  # unreadable: looked at again when that changes
            return (slot, "unreadable", exc.errno)

    def _look_for_model(self, force: bool = False) -> None:
        """(Re)load the model when the active slot changed (or ``force``); build its pipeline."""
        now = time.monotonic()
        if not force and now < self._next_model_look:
            return
        self._next_model_look = now + self.config.model.poll_interval_s
        try:
            key = self._model_identity()
        except EdgeoptError as exc:
            key = ("broken", str(exc))
        if not force and key == self._model_key:
            return
        self._model_key = key
        self._teardown_pipeline()
        m = self.config.model
        try:
            model = load_active_model(self.state, m.runtime, m.threads, self.config.preprocessing.window,
                                      self.config.preprocessing.hop)
        except NoModel as exc:
            self.model = None
            self._set_status("no model", str(exc))
            return
        except EdgeoptError as exc:
            slot = key[0] if key[0] in SLOTS else None
            problem = self.state.slot_problem(slot) if slot else None
            if problem is not None:  # unreadable or damaged, not merely unable to run here
                self.set_slot_error(slot, problem)
                if self._fall_back(slot, problem):
                    self._look_for_model(force=True)
                    return
            self.model = None
            self._set_status("error", f"model in slot {key[0]} cannot run: {exc}")
            return
        self.set_slot_error(model.slot, None)
        self._start_pipeline(model)

    def _start_pipeline(self, model: LoadedModel) -> None:
        self.model = model
        self.pipeline = Pipeline(self.config, model, self.sinks, self.config.device_id, self.stats, self.transport)
        self.pipeline.observers = self.batch_observers
        self.pipeline.start()
        log.info("running model %s version %s (slot %s, %s)", model.name, model.version, model.slot,
                 model.runtime.name)
        self._set_status("running", None)

    def _fall_back(self, broken: str, problem: str) -> bool:
        """The active slot cannot be read or fails its hashes (disk corruption, tampering, permissions):
        switch to the other slot if it holds a model that passed its checks before (a committed
        update, or an installed model) and still verifies."""
        other = "b" if broken == "a" else "a"
        if not self.state.is_good(other):
            return False
        if (other_problem := self.state.slot_problem(other)) is not None:
            self.set_slot_error(other, other_problem)
            return False
        try:
            self._set_active(other)
        except EdgeoptError as exc:
            log.error("cannot fall back to slot %s: %s", other, exc)
            return False
        log.error("slot %s cannot be used (%s); falling back to slot %s", broken, problem, other)
        self.fallback_note = reason_text(f"slot {broken} failed verification ({problem}",
                                         tail=f"); fell back to slot {other}")
        return True

    def _set_active(self, slot: str | None) -> None:
        """The one route by which the running agent changes its active slot (None: no model), on the main
        loop's thread: the updater's swaps (``request_swap`` → ``_apply_swap``) and the fall-back from a
        damaged slot both come here. A slot that cannot be activated gets its problem recorded."""
        if slot is None:
            self.state.deactivate()
            return
        try:
            self.state.activate(slot)
        except EdgeoptError:
            self.set_slot_error(slot, self.state.slot_problem(slot))
            raise

    def set_slot_error(self, slot: str | None, problem: str | None) -> None:
        """Record (or, with None, clear) why ``slot`` cannot be used; it goes out in the state."""
        if slot not in SLOTS:
            return
        before = self.slot_errors.get(slot)
        if problem is None:
            self.slot_errors.pop(slot, None)
        else:
            self.slot_errors[slot] = reason_text(problem)
        if self.slot_errors.get(slot) != before:
            if problem is not None:
                log.error("slot %s: %s", slot, problem)
            self.publish_state()

    # -- the updater's view of the agent (agent.update.updater.Host) -------------------------------------
    def current_model(self) -> dict[str, Any] | None:
        return self.model.describe() if self.model else None

    def add_batch_observer(self, fn) -> None:
        self.batch_observers.append(fn)

    def remove_batch_observer(self, fn) -> None:
        with contextlib.suppress(ValueError):
            self.batch_observers.remove(fn)

    def request_swap(self, slot: str | None, model: LoadedModel | None, timeout: float = 60.0) -> bool:
        """Ask the inference loop to activate ``slot`` and run ``model`` from its next batch on (None:
        load whatever the slot holds; slot None: no model). Returns once done (False on timeout, or
        when the slot could not be activated)."""
        done = threading.Event()
        outcome: list[bool] = []
        with self._swap_lock:
            self._swap = (slot, model, done, outcome)
        p = self.pipeline
        if p is not None:
            p.queue.interrupt()
        return done.wait(timeout) and outcome == [True]

    def _apply_swap(self) -> None:
        with self._swap_lock:
            slot, model, done, outcome = self._swap
            self._swap = None
        try:
            self._set_active(slot)
            if model is None:
                self._look_for_model(force=True)
            elif self.pipeline is not None and self.pipeline.can_swap_to(model):
                self.pipeline.swap_model(model)
                self.model = model
                log.info("switched to model %s version %s (slot %s) between two batches", model.name,
                         model.version, slot)
                self._set_status("running", None)
            else:  # different windowing: the pipeline is rebuilt (its queue is flushed first)
                self._teardown_pipeline()
                self._start_pipeline(model)
            if model is not None:
                self.set_slot_error(slot, None)
            self._model_key = self._model_identity()
            outcome.append(True)
        except EdgeoptError as exc:
            log.error("switching to slot %s failed: %s", slot, exc)
        finally:
            done.set()
            self.publish_state()

    def _teardown_pipeline(self, deadline: float | None = None) -> None:
        if self.pipeline is None:
            return
        p = self.pipeline
        p.stop_sources(timeout=0.5 if deadline is None else max(0.05, min(1.0, deadline - time.monotonic() - 1)))
        flushed = p.flush(timeout=5.0 if deadline is None else max(0.1, deadline - time.monotonic() - 0.5))
        if flushed:
            log.info("flushed %d queued window(s)", flushed)
        self.totals.update(p.counters())
        self._inference_history = p.inference()  # (its worker is stopped)
        self._source_history = p.source_stats()
        self._profile_history = p.profile.snapshot()
        self.pipeline = None

    # -- state, telemetry, status ------------------------------------------------------------------------
    def _set_status(self, status: str, error: str | None) -> None:
        changed = (status, error) != (self.status, self.error)
        self.status, self.error = status, error
        if changed:
            if error:
                log.warning("%s: %s", status, error)
            self.notifier.status(f"{status}{': ' + error if error else ''}"[:200])
            self.publish_state()
            self.write_status()

    def _state_payload(self, online: bool = True) -> bytes:
        try:
            return encode_state(self.device_state(online))
        except ProtocolError as exc:  # a bug or a value the protocol refuses: still tell the fleet we are here
            log.error("the state message breaks the protocol (%s); sending a minimal one", exc)
            return encode_state(DeviceState(self.config.device_id, online, status="error",
                                            error=f"state message refused by the protocol: {exc}"))

    def state_message(self, online: bool = True) -> dict[str, Any]:
        """The retained state exactly as published (``edgeopt.protocol.encode_state``)."""
        return json.loads(self._state_payload(online))

    def device_state(self, online: bool = True) -> DeviceState:
        p = self.pipeline
        sources = p.source_stats() if p else getattr(self, "_source_history", {})
        u = self.updater
        update = u.protocol_status() if u else UpdateStatus("IDLE", reason=self.updates_note)
        health = u.health() if u else None
        model = self.model
        error = self.error
        ref = ModelRef(model.name, model.version) if model else None
        if ref is not None and not (is_name(ref.name) and is_name(ref.version)):
            error, ref = f"the model in slot {model.slot} names itself {clean_text(str(ref), 100)}, which the " \
                         f"protocol refuses; reported without a model", None
        return DeviceState(
            self.config.device_id, online, agent_version=__version__, profile=self.config.agent.profile or None,
            labels=self.config.labels, model=ref, update=update, health=None if health is None else Health(**health),
            ts=time.time(), model_slot=model.slot if ref else None, model_runtime=model.runtime.name if ref else None,
            status=self.status if online else "stopped", error=error, config_error=self.config_error,
            fallback=self.fallback_note,
            sources={n: SourceStatus(s["type"], s["status"], s["error"])
                     for n, s in list(sources.items())[:MAX_SOURCES]},  # the protocol's bound
            rejected_messages=self.rejected.snapshot(), slot_errors=dict(self.slot_errors) or None)

    def _on_unmatched(self, topic: str) -> None:
        """A message on a topic this agent did not subscribe to (a broker handing out another
        device's retained message): refused and counted."""
        try:
            device, kind = parse_device_topic(self.config.mqtt.prefix, topic)
        except ProtocolError:
            self.rejected.add("other", "bad_topic")
            return
        self.rejected.add(kind, "wrong_device" if device != self.config.device_id else "unexpected")

    def publish_state(self) -> None:
        t = self.transport
        if t is not None and t.connected.is_set():
            t.publish(self.config.topic("state"), self._state_payload(), qos=1, retain=True)

    def telemetry(self, mark: bool = False) -> dict[str, Any]:
        """The telemetry snapshot; ``mark`` (the periodic message) starts a new windows_per_s interval."""
        c = self.totals.copy()
        p = self.pipeline  # the main thread may tear it down meanwhile
        if p is not None:
            c.update(p.counters())
        inference = p.inference() if p is not None else dict(self._inference_history)
        self._worker_peak = max(self._worker_peak, inference["worker_peak_private_bytes"])
        inference["worker_peak_private_bytes"] = self._worker_peak
        rss, peak = rss_bytes(inference["worker_private_bytes"], self._worker_peak)
        out: dict[str, Any] = {
            "device": self.config.device_id, "time": time.time(), "uptime_s": self.uptime.seconds(),
            "status": self.status, "error": self.error,
            "model": self.model.describe() if self.model else None,
            "samples_in": c["samples_in"], "windows_in": c["windows_in"], "windows_out": self.stats.windows_out,
            "dropped": {"queue_overflow": c["queue_overflow"], "nan_windows": c["nan_windows"],
                        "malformed_rows": c["malformed_rows"], "inference_errors": c["inference_errors"],
                        "sink_errors": c["sink_errors"],
                        "stopped_mid_window": c["stopped_mid_window"],
                        "outbox_overflow": self.outbox.dropped if self.outbox else 0},
            "state_resets": c["state_resets"],  # a stateful model's source state set back to zeros (a gap)
            "windows_per_s": self.stats.rate(mark), "batches": self.stats.batches,
            "batch_size_histogram": self.stats.histogram(),
            "latency_ms": self.stats.latency(),
            "queue_depth": len(p.queue) if p else 0,
            "rss_bytes": rss, "peak_rss_bytes": peak,
            "inference": inference,
            "first_inference": self.stats.first_inference, "last_inference": self.stats.last_inference,
            "sources": p.source_stats() if p else getattr(self, "_source_history", {}),
            "profile": p.profile.snapshot() if p else getattr(self, "_profile_history", {}),
            "outbox": self.publisher.stats() if self.publisher else None,
            "rejected_messages": self.rejected.snapshot(),
            "update_downloads": self.updater.downloads() if self.updater is not None else None,
        }
        if self.transport is not None:
            out["mqtt"] = {"connected": self.transport.connected.is_set(), "connects": self.transport.connects,
                           "disconnects": self.transport.disconnects, "last_error": self.transport.last_error}
        return out

    def write_status(self, telemetry: dict[str, Any] | None = None) -> None:
        with self._state_lock:
            try:
                atomic_write_json(self.config.status_file, {"state": self.state_message(not self._stop.is_set()),
                                                            "telemetry": telemetry or self.telemetry()})
            except EdgeoptError as exc:
                log.warning("cannot write the status file: %s", exc)

    def _telemetry_loop(self) -> None:
        interval = self.config.telemetry.interval_s
        while not self._stop.wait(interval):
            try:
                snapshot = self.telemetry(mark=True)
                self.write_status(snapshot)
                t = self.transport
                if t is not None and t.connected.is_set():
                    t.publish(self.config.topic("telemetry"), encode_telemetry(self.config.device_id, snapshot))
                    changes = self.rejected.changes
                    if changes != self._rejected_published:  # new refusals reach the retained state too
                        self._rejected_published = changes
                        self.publish_state()
            except Exception:  # telemetry must never take the agent down
                log.exception("telemetry failed")

    # -- reload -----------------------------------------------------------------------------------------
    def _do_reload(self) -> None:
        self._reload.clear()
        self.notifier.reloading()
        path = self.config.path
        try:
            new = load_config(path)
        except EdgeoptError as exc:
            self.config_error = f"reload ignored, keeping the running configuration: {exc}"
            log.error("%s", self.config_error)
            self.publish_state()
            self.write_status()
            self.notifier.notify("READY=1", f"STATUS={self.status} (config reload failed)")
            return
        log.info("reloading with %s", path)
        deadline = time.monotonic() + self.config.agent.shutdown_timeout_s
        self._teardown_pipeline(deadline)
        self._close_io(deadline)
        self.config, self.config_error = new, None
        self._open_io()
        self._look_for_model(force=True)
        self._start_updater_after_model()
        self.notifier.notify("READY=1", f"STATUS={self.status}")

    # -- main loop --------------------------------------------------------------------------------------
    def run(self) -> int:
        self._open_io()
        self._look_for_model(force=True)
        self._start_updater_after_model()
        self.notifier.ready(self.status if not self.error else f"{self.status}: {self.error}"[:200])
        self.write_status()
        telemetry = threading.Thread(target=self._telemetry_loop, name="telemetry", daemon=True)
        telemetry.start()
        code = EXIT_OK
        while not self._stop.is_set():
            self.notifier.watchdog()
            if self._swap is not None:
                self._apply_swap()
                continue
            if self._reload.is_set():
                self._do_reload()
                continue
            if self.pipeline is None:
                if self._batch_run_cannot_start():
                    code = EXIT_SOURCE_FAILED
                    break
                self._stop.wait(0.1)
                self._look_for_model()
                continue
            handled = self.pipeline.step()
            self._look_for_model()  # a new active slot: flush with the old model, switch (rate-limited)
            if not handled and self.pipeline is not None and self._sources_done():
                failed = [n for n, s in self.pipeline.source_stats().items() if s["status"] == "error"]
                code = EXIT_SOURCE_FAILED if failed else EXIT_OK
                log.info("every source has ended%s", f" ({', '.join(failed)} failed)" if failed else "")
                self._finish_batch_run()
                break
        self._shutdown()
        return code

    def _batch_run_cannot_start(self) -> bool:
        """exit_when_sources_end (a replay that should end) with no model that can run, and no signed
        update that could bring one: the sources would never start, so the run ends, saying why,
        instead of waiting for ever."""
        if not self.config.agent.exit_when_sources_end or self.updater is not None or \
                self.status not in ("no model", "error"):
            return False
        log.error("exit_when_sources_end: %s, and no update can bring another model: exiting", self.error)
        return True

    def _sources_done(self) -> bool:
        p = self.pipeline
        return self.config.agent.exit_when_sources_end and p is not None and p.sources_finished and not len(p.queue)

    def _finish_batch_run(self) -> None:
        """exit_when_sources_end: give the broker time to take every result (up to a minute)."""
        if self.publisher is not None and self.transport is not None:
            deadline = time.monotonic() + 60
            while self.outbox.pending and time.monotonic() < deadline and (
                    self.transport.connected.is_set() or time.monotonic() < deadline - 50):
                self.notifier.watchdog()
                self.publisher.drain(0.2)
        self._stop.set()

    def _shutdown(self) -> None:
        deadline = time.monotonic() + self.config.agent.shutdown_timeout_s
        self.notifier.stopping("stopping: flushing the last batch")
        log.info("stopping")
        self._teardown_pipeline(deadline)
        self.status = "stopped"
        self._close_io(deadline)
        self.notifier.close()
        log.info("stopped after %d window(s) in %d batch(es)", self.stats.windows_out, self.stats.batches)

