"""The agent's side of signed updates: follows the retained ``desired`` message and drives the
update state machine (agent/update/machine.py) with the steps below, while inference goes on.

    DOWNLOADING   refresh the signed metadata (TUF), look NAME@VERSION up in the signed targets (the
                  allow-list), download it over MQTT (resumable; verified length + sha256)
    VERIFYING     re-hash the downloaded file against the signed length and sha256
    STAGED        unpack into the inactive slot (safe extraction, every file's hash checked) and
                  check the manifest names the version asked for
    SELF_TEST     in a child process: load with its runtime, golden vectors, NaN/Inf, latency budget
    SHADOW        (optional) run the candidate beside the current model on live windows; top-1
                  agreement must reach the threshold
    PROBATION     switch (the main loop activates the slot by one atomic rename and swaps the model
                  between two batches, so no window is lost), then watch the candidate's error rate,
                  NaN outputs, latency p95 and confidence on live windows
    COMMITTED     the candidate stays; downloads are cleaned up
    ROLLING_BACK  the previous slot is activated and its model swapped back in
    ROLLED_BACK   the version is remembered as refused, with its fault class (machine.py): a
                  transport refusal is tried again after a backoff, a behaviour refusal only when a
                  new rollout asks for it; a retained ``desired`` never loops. The reason says which.

Every transition goes out on the retained ``state`` topic with the reason. A ``desired`` that is
not in the signed targets is refused in DOWNLOADING, before anything is written to a slot.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgeopt.agent.model import load_model
from edgeopt.agent.statedir import GOOD
from edgeopt.agent.update.machine import (
    MANIFEST_MISMATCH,
    Backoff,
    Event,
    Health,
    RecordStore,
    State,
    UpdateMachine,
    UpdateRecord,
    probation_verdict,
    reason_text,
    shadow_verdict,
    top1_confidence,
    wanted,
    windows_agreeing,
)
from edgeopt.agent.update.selftest import run_in_child
from edgeopt.artifact import pack_artifact, unpack_artifact
from edgeopt.errors import EdgeoptError, RemoteError
from edgeopt.fsutil import sha256_file
from edgeopt.protocol import (
    ROLLOUT_ID_RE,
    ModelRef,
    ProtocolError,
    UpdateStatus,
    clean_text,
    is_name,
    matches,
    parse_desired,
)

log = logging.getLogger("edgeopt.agent.update")


class Host(Protocol):
    """What the updater needs from the running agent."""

    state: Any  # agent.statedir.StateDir
    rejected: Any  # agent.telemetry.RejectedMessages: refused network messages by topic kind and reason

    def current_model(self) -> dict[str, Any] | None: ...

    def add_batch_observer(self, fn: Callable) -> None: ...

    def remove_batch_observer(self, fn: Callable) -> None: ...

    def request_swap(self, slot: str, model: Any, timeout: float = 60.0) -> bool: ...

    def set_slot_error(self, slot: str, problem: str | None) -> None: ...

    def publish_state(self) -> None: ...


class Watch:
    """Live-window statistics of one model during SHADOW / PROBATION (fed from the inference loop)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.windows = 0
        self.failed = 0          # windows whose inference raised or gave NaN/Inf
        self.nan_outputs = 0
        self.latencies_ms: list[float] = []
        self.confidence: list[float] = []
        self.agree = 0
        self.compared = 0

    def add(self, n: int, outputs: dict[str, np.ndarray] | None, seconds: float) -> None:
        with self.lock:
            self.windows += n
            if outputs is None:
                self.failed += n
                return
            finite = np.ones(n, dtype=bool)
            for v in outputs.values():
                finite &= np.isfinite(np.asarray(v, dtype=np.float64).reshape(n, -1)).all(1)
            bad = int((~finite).sum())
            self.nan_outputs += bad
            self.failed += bad
            self.latencies_ms.append(seconds * 1000.0)
            _, conf = top1_confidence(outputs)
            if conf is not None:
                self.confidence.extend(conf[finite].tolist())

    def p95_ms(self) -> float | None:
        with self.lock:
            return float(np.percentile(self.latencies_ms, 95)) if self.latencies_ms else None

    def mean_confidence(self) -> float | None:
        with self.lock:
            return float(np.mean(self.confidence)) if self.confidence else None

    def error_rate(self) -> float:
        with self.lock:
            return self.failed / self.windows if self.windows else 0.0

    def agreement(self) -> float | None:
        with self.lock:
            return self.agree / self.compared if self.compared else None

    def summary(self) -> Health:
        """What the probation verdict is decided on."""
        with self.lock:
            windows, nan, latencies, confidences = self.windows, self.nan_outputs, len(self.latencies_ms), \
                len(self.confidence)
        return Health(windows, nan, self.error_rate(), self.p95_ms(), latencies, self.mean_confidence(), confidences)


def _failing_safely(state: State, step):
    """A step before COMMITTED that raises something unexpected (a bug, a full disk) fails the update
    instead of stalling it: the device goes back to the model that passed its checks."""

    def run(record: UpdateRecord) -> Event:
        try:
            return step(record)
        except Exception as exc:
            log.exception("update step %s failed unexpectedly", state)
            record.reason = f"{str(state).lower()}: {type(exc).__name__}: {exc}"[:200]
            return Event.FAILED

    return run


class _TopicsOver:
    """The agent's transport (handlers get the payload) as the link's Topics (handlers get topic and
    payload); the device subscribes to exact topics only, so the topic is known."""

    def __init__(self, transport):
        self.transport = transport

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False):
        return self.transport.publish(topic, payload, qos=qos, retain=retain)

    def subscribe(self, topic: str, handler) -> None:
        self.transport.subscribe(topic, lambda payload: handler(topic, payload))

    def unsubscribe(self, topic: str) -> None:
        self.transport.unsubscribe(topic)


class Updater:
    def __init__(self, host: Host, config, transport, device_id: str):
        # lazy (as below): python-tuf and cryptography load only when updates are on
        from edgeopt.repo_client import DeviceTrust, MqttFetcher, MqttRepoLink

        self.host, self.cfg, self.transport, self.device_id = host, config.update, transport, device_id
        self.model_cfg = config.model
        self.root = host.state.root
        self.prefix = config.mqtt.prefix
        self.desired_topic = config.topic("desired")
        trust_dir = self.root / "trust"
        trust_dir.mkdir(parents=True, exist_ok=True)
        pinned = trust_dir / "root.json"
        if not pinned.is_file():
            if not self.cfg.root or not Path(self.cfg.root).is_file():
                raise EdgeoptError(f"updates need a pinned root: set [update] root (provisioned metadata/root.json) "
                                   f"or place it at {pinned}")
            shutil.copyfile(self.cfg.root, pinned)
        if self.cfg.repo_url:  # the repository over HTTP(S) (edgeopt.repo_http); desired still over MQTT
            from edgeopt.repo_http import HttpRepoLink

            link = HttpRepoLink(self.cfg.repo_url, self.cfg.repo_ca_file)
        else:
            link = MqttRepoLink(_TopicsOver(transport), device_id, self.prefix,
                                on_rejected=lambda exc: host.rejected.add("repo", exc.code),
                                cast=callable(getattr(transport, "unsubscribe", None)), cast_chunk=self.cfg.chunk_bytes)
        self.fetcher = MqttFetcher(link, chunk_size=self.cfg.chunk_bytes, timeout=self.cfg.request_timeout_s,
                                   retries=self.cfg.request_retries, max_total=self.cfg.max_download_bytes,
                                   partial_dir=self.root / "downloads" / "partial")
        self.trust = DeviceTrust(trust_dir, self.fetcher, self.root / "downloads")
        self.store = RecordStore(self.root / "update.json")
        checked = {State.DOWNLOADING: self._downloading, State.VERIFYING: self._verifying,
                   State.STAGED: self._staged, State.SELF_TEST: self._self_test, State.SHADOW: self._shadow,
                   State.PROBATION: self._probation}
        steps = {state: _failing_safely(state, step) for state, step in checked.items()}
        steps.update({State.COMMITTED: self._committed, State.ROLLING_BACK: self._rolling_back,
                      State.ROLLED_BACK: self._rolled_back})
        self.machine = UpdateMachine(self.store, steps, on_transition=self._on_transition,
                                     max_retries=self.cfg.max_retries,
                                     backoff=Backoff(self.cfg.refused_retry_s, self.cfg.refused_retry_max_s))
        self._desired: dict[str, Any] | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.watch: Watch | None = None
        self.record = self.store.load()
        # the last download: its target, the bytes fetched over the network for it (not those resumed from
        # disk), the full artifact's length, and whether a delta made it (telemetry; the fleet sums it per rollout)
        self.last_download: dict[str, Any] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self.record = self.machine.recover()
        self.transport.subscribe(self.desired_topic, self._on_desired)
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _on_desired(self, payload: bytes) -> None:
        try:
            desired = parse_desired(payload)
        except ProtocolError as exc:
            self.host.rejected.add("desired", exc.code)
            log.warning("ignored a malformed desired message: %s", exc)
            return
        m = desired.model
        self._desired = None if m is None else {"name": m.name, "version": m.version, "rollout": desired.rollout}
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.record.state is not State.IDLE:
                    self.record = self.machine.step()
                    continue
                target = self._wanted()
                if target is not None:
                    previous = self.host.current_model()
                    self.record = self.machine.begin(target, previous)
                    continue
            except Exception:  # a bug must not take inference down; the state file says where we are
                log.exception("update step failed unexpectedly")
                self._stop.wait(5.0)
                continue
            self._wake.wait(1.0)
            self._wake.clear()

    def _wanted(self) -> dict[str, Any] | None:
        """The desired version to start now (machine.wanted: refused versions wait for their backoff
        or for a new rollout)."""
        return wanted(self._desired, self.host.current_model(), self.record.refusals, time.time()).target

    # -- reporting ---------------------------------------------------------------------------------
    def _on_transition(self, record: UpdateRecord) -> None:
        self.record = record
        t = record.target
        log.info("update %s: %s%s", t.key if t else None,
                 record.state, f" ({record.reason})" if record.reason and record.state is State.ROLLING_BACK else "")
        self._run_hook(record)
        self.host.publish_state()

    def _run_hook(self, record: UpdateRecord) -> None:
        """[update] state_hook: an executable run on entering each state (like Mender's state
        scripts), with the state, model name and version as arguments. It runs before the step."""
        if not self.cfg.state_hook:
            return
        import subprocess  # here: 0.6 MiB of the agent's memory until a hook runs

        t = record.target
        try:
            subprocess.run([self.cfg.state_hook, str(record.state), t.name if t else "", t.version if t else ""],
                           timeout=self.cfg.state_hook_timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("state hook %s failed: %s", self.cfg.state_hook, exc)

    def status(self) -> dict[str, Any]:
        """The ``update`` field of the state message."""
        r = self.record
        t = r.target
        state = r.outcome if r.state is State.IDLE and r.outcome else str(r.state)
        return {"state": state, "target": {"name": t.name, "version": t.version} if t and t.name else None,
                "rollout": t.rollout if t else None, "reason": reason_text(r.reason), "since": r.entered_at}

    def protocol_status(self) -> UpdateStatus:
        """``status()`` as the state message's ``update`` (``edgeopt.protocol.UpdateStatus``)."""
        u = self.status()
        t = u.get("target")
        target = ModelRef(t["name"], t["version"]) if t else None
        reason = u.get("reason")
        if target is not None and not (is_name(target.name) and is_name(target.version)):
            # a record written before names were matched whole (a version ending in a newline): report the
            # update without its target rather than send a state the fleet drops
            reason, target = f"target {clean_text(str(target), 80)} refused by the protocol; {reason or ''}", None
        rollout = u.get("rollout") if matches(ROLLOUT_ID_RE, u.get("rollout")) else None
        return UpdateStatus(u["state"], target, rollout, reason, u.get("since") or 0.0)

    def downloads(self) -> dict[str, int]:
        """For telemetry: bytes fetched from the repository, and the deltas applied (with the bytes they
        carried and saved against full downloads) or refused (fallen back to the full artifact)."""
        d = self.trust.delta_stats
        return {"bytes_network": self.fetcher.stats["bytes_network"], "deltas_applied": d["applied"],
                "delta_bytes": d["bytes"], "bytes_saved": d["bytes_saved"], "deltas_refused": d["refused"],
                "cast_chunks": getattr(self.fetcher.link, "cast_chunks", 0),
                "cast_refused": self.fetcher.stats["cast_refused"], "last": self.last_download}

    def health(self) -> dict[str, Any] | None:
        w = self.watch
        if w is None:
            return None
        p95 = w.p95_ms()
        return {"error_rate": round(w.error_rate(), 6), "latency_p95_ms": None if p95 is None else round(p95, 4),
                "agreement": w.agreement(), "nan_outputs": w.nan_outputs}

    # -- steps -------------------------------------------------------------------------------------
    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _downloading(self, r: UpdateRecord) -> Event:
        from edgeopt.repo_client import UpdateRefused

        t = r.target
        try:
            self.trust.refresh()
            signed = self.trust.lookup(t.name, t.version)
            before, deltas = self.fetcher.stats["bytes_network"], self.trust.delta_stats["applied"]
            path = self.trust.download(signed, base=self._active_archive)
            self.last_download = {"target": {"name": t.name, "version": t.version},
                                  "bytes": self.fetcher.stats["bytes_network"] - before, "full_bytes": signed.length,
                                  "delta": self.trust.delta_stats["applied"] > deltas}
        except UpdateRefused as exc:
            r.reason = f"{exc.reason}: {exc}"
            return Event.FAILED
        except RemoteError as exc:
            r.reason = f"repository unreachable: {exc}"
            self._sleep(self.cfg.retry_interval_s)
            return Event.RETRY
        r.reason = None
        t.path, t.sha256, t.length, t.format = str(path), signed.sha256, signed.length, signed.custom.get("format")
        return Event.OK

    def _active_archive(self) -> bytes | None:
        """The running artifact packed as the repository packed it (a delta's base), or None."""
        slot = self.host.state.active_artifact()
        if slot is None or not (slot / "manifest.json").is_file():
            return None
        tmp = self.root / "base.tar.partial"
        try:
            pack_artifact(slot, tmp, exclude=frozenset({GOOD}))
            return tmp.read_bytes()
        except (OSError, EdgeoptError) as exc:
            log.warning("cannot pack the running artifact for a delta (%s): full download", exc)
            return None
        finally:
            tmp.unlink(missing_ok=True)

    def _verifying(self, r: UpdateRecord) -> Event:
        path = Path(r.target.path)
        if not path.is_file() or path.stat().st_size != r.target.length or sha256_file(path) != r.target.sha256:
            r.reason = "hash_mismatch: the downloaded file does not match its signed length and sha256"
            return Event.FAILED
        return Event.OK

    def _staged(self, r: UpdateRecord) -> Event:
        t = r.target
        state = self.host.state
        slot = state.inactive_slot()
        work = self.root / "staging"
        shutil.rmtree(work, ignore_errors=True)
        try:
            artifact = unpack_artifact(Path(t.path), work / "artifact")
            m = artifact.manifest
            if (str(m.get("name")), str(m.get("version"))) != (t.name, t.version):
                r.reason = (f"staged: {MANIFEST_MISMATCH}: the artifact's manifest says "
                            f"{m.get('name')}@{m.get('version')}, not {t.key}")
                return Event.FAILED
            state.stage(artifact.root, slot)
        except EdgeoptError as exc:
            r.reason = f"staged: {exc}"
            return Event.FAILED
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.host.set_slot_error(slot, None)  # whatever was wrong with the slot, it holds a new artifact now
        t.slot = slot
        if r.previous is not None:
            r.previous.setdefault("slot", state.active_slot())
        return Event.OK

    def _self_test(self, r: UpdateRecord) -> Event:
        budget = self.cfg.latency_budget_ms or None
        res = run_in_child(self.host.state.slot_path(r.target.slot), self.model_cfg.runtime, self.model_cfg.threads,
                           budget, self.cfg.self_test_timeout_s)
        r.target.self_test = {"ok": res.ok, **res.details}
        if not res.ok:
            r.reason = f"self-test: {res.reason}"
            return Event.FAILED
        return Event.OK

    def _load_slot(self, slot: str):
        m = self.model_cfg
        return load_model(self.host.state.slot_path(slot), slot, m.runtime, m.threads)

    def _shadow(self, r: UpdateRecord) -> Event:
        n = self.cfg.shadow_windows
        if n <= 0 or self.host.current_model() is None:  # nothing runs yet: nothing to compare with
            return Event.OK
        try:
            candidate = self._load_slot(r.target.slot)
        except EdgeoptError as exc:
            r.reason = f"shadow: candidate does not load: {exc}"
            return Event.FAILED
        batches: queue.Queue = queue.Queue(maxsize=64)

        def observe(windows, outputs, seconds, model):
            if outputs is not None and model is not candidate:
                # when the shadow cannot keep up it samples: inference never waits for it
                with contextlib.suppress(queue.Full):
                    batches.put_nowait((windows, outputs))

        watch = self.watch = Watch()
        self.host.add_batch_observer(observe)
        deadline = time.monotonic() + self.cfg.shadow_timeout_s
        try:
            while watch.compared < n and not self._stop.is_set():
                if time.monotonic() > deadline:
                    r.reason = f"shadow: {shadow_verdict(watch.compared, watch.agree, n, self.cfg, timed_out=True)}"
                    return Event.FAILED
                try:
                    windows, current = batches.get(timeout=0.5)
                except queue.Empty:
                    continue
                try:
                    mine, seconds = candidate.infer(windows)
                except EdgeoptError:
                    mine, seconds = None, 0.0
                watch.add(len(windows), mine, seconds)
                agreed = windows_agreeing(current, mine)
                with watch.lock:
                    watch.compared += len(windows)
                    watch.agree += agreed
            if self._stop.is_set():
                return Event.RETRY
            r.target.shadow = {"windows": watch.compared, "agreement": round(watch.agreement() or 0.0, 4),
                               "error_rate": round(watch.error_rate(), 4)}
            if (verdict := shadow_verdict(watch.compared, watch.agree, n, self.cfg)) is not None:
                r.reason = f"shadow: {verdict}"
                return Event.FAILED
            return Event.OK
        finally:
            self.host.remove_batch_observer(observe)
            self.watch = None

    def _probation(self, r: UpdateRecord) -> Event:
        cfg = self.cfg
        baseline = Watch()

        def observe_baseline(windows, outputs, seconds, model):
            if model is not None and model.slot != r.target.slot:
                baseline.add(len(windows), outputs, seconds)

        # a short look at the current model first: the latency / confidence the candidate is held to
        if self.host.current_model() is not None and self.host.state.active_slot() != r.target.slot:
            self.host.add_batch_observer(observe_baseline)
            end = time.monotonic() + cfg.baseline_s
            while baseline.windows < cfg.probation_windows and time.monotonic() < end and not self._stop.is_set():
                self._sleep(0.1)
            self.host.remove_batch_observer(observe_baseline)
        try:
            candidate = self._load_slot(r.target.slot)
        except EdgeoptError as exc:
            r.reason = f"probation: candidate does not load: {exc}"
            return Event.FAILED
        watch = self.watch = Watch()

        def observe(windows, outputs, seconds, model):
            if model is candidate:
                watch.add(len(windows), outputs, seconds)

        self.host.add_batch_observer(observe)
        try:
            if not self.host.request_swap(r.target.slot, candidate):
                r.reason = "probation: the inference loop did not switch to the new model"
                return Event.FAILED
            started = time.monotonic()
            while not self._stop.is_set():
                elapsed = time.monotonic() - started
                verdict = probation_verdict(watch.summary(), baseline.summary(), cfg)
                if verdict is not None:
                    r.reason = f"probation: {verdict} over {watch.windows} live windows"
                    return Event.FAILED
                if (elapsed >= cfg.probation_s and watch.windows >= cfg.probation_windows) or \
                        elapsed >= cfg.probation_timeout_s:
                    break
                self._sleep(0.1)
                self.host.publish_state()
            if self._stop.is_set():
                return Event.RETRY  # the agent is stopping; recover() counts it as a failure on restart
            r.target.probation = {"windows": watch.windows, **(self.health() or {})}
            return Event.OK
        finally:
            self.host.remove_batch_observer(observe)
            self.watch = None

    def _committed(self, r: UpdateRecord) -> Event:
        self.host.state.mark_good(r.target.slot)  # a fallback target from now on
        self._clean_downloads(r)
        return Event.OK

    def _rolling_back(self, r: UpdateRecord) -> Event:
        state = self.host.state
        prev_slot = (r.previous or {}).get("slot")
        if prev_slot is None and state.active_slot() == (r.target.slot if r.target else None):
            self.host.request_swap(None, None)  # a first install failed: back to no model
        elif prev_slot and state.active_slot() != prev_slot:
            if (problem := state.slot_problem(prev_slot)) is not None:
                # the previous model passed its checks once, but its slot is unreadable or damaged now:
                # no model rather than the candidate that just failed its own
                log.error("rolling back: slot %s cannot be used: %s", prev_slot, problem)
                self.host.set_slot_error(prev_slot, problem)
                self.host.request_swap(None, None)
            else:
                try:
                    model = self._load_slot(prev_slot)
                except EdgeoptError as exc:  # say so loudly; the agent retries loading it
                    log.error("rolling back: the previous model in slot %s does not load: %s", prev_slot, exc)
                    model = None
                self.host.request_swap(prev_slot, model)
        self._clean_downloads(r)
        return Event.OK

    def _rolled_back(self, r: UpdateRecord) -> Event:
        return Event.OK

    def _clean_downloads(self, r: UpdateRecord) -> None:
        path = r.target.path if r.target else None
        if path:
            Path(path).unlink(missing_ok=True)
        shutil.rmtree(self.root / "downloads" / "partial", ignore_errors=True)
