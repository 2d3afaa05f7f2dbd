"""Simulated devices for demos, tests and scale runs: many lightweight devices in one process, each
with its own MQTT connection speaking the real protocol.

A simulated device publishes the ``edgeopt.state/1`` contract (retained, last will), follows its
retained ``desired`` and walks the agent's update states (``agent/update/machine.py``):
DOWNLOADING → VERIFYING → STAGED → SELF_TEST → SHADOW → PROBATION → COMMITTED → IDLE, or
ROLLING_BACK → ROLLED_BACK → IDLE. The artifact comes from the repository server over the MQTT
repository protocol (``MqttFetcher``, chunked, resumable) and is checked against the length and
sha256 that python-tuf verified in the signed targets metadata:

    verify="shared"  one python-tuf client per simulator process refreshes the signed metadata
                     (from a pinned root); every device downloads the artifact itself and checks
                     its length and hash against it (scale runs)
    verify="full"    every device runs its own python-tuf client (``DeviceTrust``) with its own
                     pinned root and trusted-metadata directory (what a real agent does)

``self_test="golden"`` unpacks the artifact and runs the golden-vector check a real agent runs
(``edgeopt.golden_vectors``, with the real runtime), so a broken model fails on the simulated devices as it would on real ones; the default only simulates
the outcome (``FailurePlan``). Network I/O runs on one thread (``ClientLoop``); the blocking parts
of an update (metadata, download, hashing, self-test) run in a small worker pool.
"""

from __future__ import annotations

import hashlib
import logging
import random
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeopt.artifact import unpack_artifact
from edgeopt.errors import EdgeoptError, RemoteError, UserInputError
from edgeopt.fleet.client_loop import ClientLoop
from edgeopt.golden_vectors import check_artifact
from edgeopt.mqtt import PahoTopics, connect, make_client
from edgeopt.protocol import (
    DEFAULT_CHUNK,
    Desired,
    Health,
    ModelRef,
    ProtocolError,
    UpdateStatus,
    device_topic,
    encode_telemetry,
    offline_will,
    parse_desired,
    response_topic,
    state_message,
)
from edgeopt.repo_client import DeviceTrust, MqttFetcher, MqttRepoLink, UpdateRefused, url_for
from edgeopt.repo_http import HttpRepoLink

log = logging.getLogger("edgeopt.fleet.sim")
FAIL_MODES = ("self-test", "probation", "health", "silent")
VERIFY_MODES = ("shared", "full")
SELF_TESTS = ("simulated", "golden")


class UpdateFailed(Exception):
    """The candidate failed on the device; ``reason`` goes to the state topic."""


@dataclass
class FailurePlan:
    """Which updates fail on which simulated devices, and how.

    ``rate``: share of devices (drawn reproducibly from ``seed``, device and version) whose update
    fails; ``devices``: these always fail; ``versions``: only updates to these versions may fail.
    Modes: self-test (rolls back at SELF_TEST), probation (reports a bad error rate and rolls back
    at PROBATION), health (commits, then reports a bad error rate: only fleet health gates see it),
    silent (stops reporting after DOWNLOADING: the fleet's device timeout sees it).
    """

    rate: float = 0.0
    mode: str = "self-test"
    versions: frozenset[str] | None = None
    devices: frozenset[str] = frozenset()
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise UserInputError(f"--fail-rate {self.rate}: must be between 0 and 1")
        if self.mode not in FAIL_MODES:
            raise UserInputError(f"--fail-mode {self.mode!r}: use one of {', '.join(FAIL_MODES)}")

    def fails(self, device_id: str, target: ModelRef) -> bool:
        if device_id in self.devices:
            return True
        if self.versions is not None and target.version not in self.versions:
            return False
        draw = hashlib.sha256(f"{self.seed}/{device_id}/{target}".encode()).digest()
        return int.from_bytes(draw[:8], "big") / 2**64 < self.rate


@dataclass
class SimConfig:
    broker: str
    devices: int = 10
    prefix: str = "edgeopt"
    id_prefix: str = "sim-"
    first_index: int = 0
    labels: dict[str, str] = field(default_factory=lambda: {"fleet": "sim"})
    profile: str | None = "raspberry-pi-4"
    initial_model: ModelRef | None = None
    root: Path | None = None            # the repository's root metadata to pin (needed to update)
    verify: str = "shared"
    self_test: str = "simulated"
    workdir: Path | None = None         # per-device directories for verify="full" / golden self-tests
    workers: int = 32
    chunk_size: int = DEFAULT_CHUNK
    request_timeout: float = 5.0
    retries: int = 8
    step_delay: float = 0.0             # seconds spent in each update state (to watch a demo)
    probation: float = 0.0              # seconds in PROBATION
    telemetry_interval: float = 0.0     # 0: no telemetry
    failures: FailurePlan = field(default_factory=FailurePlan)
    keepalive: int = 60
    repo_url: str = ""                  # the repository over HTTP(S) (edgeopt.repo_http) instead of MQTT

    def __post_init__(self) -> None:
        if self.verify not in VERIFY_MODES:
            raise UserInputError(f"--verify {self.verify!r}: use one of {', '.join(VERIFY_MODES)}")
        if self.self_test not in SELF_TESTS:
            raise UserInputError(f"--self-test {self.self_test!r}: use one of {', '.join(SELF_TESTS)}")
        if self.devices < 1:
            raise UserInputError(f"--devices {self.devices}: must be at least 1")


def golden_self_test(archive: bytes, workdir: Path) -> str | None:
    """Unpack a packed artifact and run a device's golden-vector check on it (golden vectors within
    the manifest's tolerances, no NaN/Inf, latency within its budget); the reason it fails, or None."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tar = Path(tmp) / "artifact.tar"
        tar.write_bytes(archive)
        result = check_artifact(unpack_artifact(tar, Path(tmp) / "artifact").root)
    return None if result.ok else f"self-test: {result.reason}"


class SharedTrust:
    """One python-tuf client for every device of this process: the signed metadata is the same for
    all of them, so it is verified once (and refreshed when a device asks for a version it does not
    list yet, at most every ``min_refresh`` seconds)."""

    def __init__(self, sim: Simulator, root: Path, workdir: Path, min_refresh: float = 1.0):
        cfg = sim.config
        (workdir / "metadata").mkdir(parents=True, exist_ok=True)
        (workdir / "metadata" / "root.json").write_bytes(Path(root).read_bytes())
        self.client = make_client(f"{cfg.id_prefix}verifier-{id(self):x}", cfg.broker)
        connect(self.client)
        link = sim.http_link or MqttRepoLink(PahoTopics(self.client), f"{cfg.id_prefix}verifier", cfg.prefix,
                                             cast_chunk=cfg.chunk_size)
        fetcher = MqttFetcher(link, chunk_size=cfg.chunk_size, timeout=cfg.request_timeout, retries=cfg.retries)
        self.trust = DeviceTrust(workdir / "metadata", fetcher, workdir / "downloads")
        self.min_refresh, self._last = min_refresh, 0.0
        self._lock = threading.Lock()

    def lookup(self, target: ModelRef):
        with self._lock:
            if time.monotonic() - self._last >= self.min_refresh:
                self.trust.refresh()
                self._last = time.monotonic()
                return self.trust.lookup(target.name, target.version)
            try:
                return self.trust.lookup(target.name, target.version)
            except UpdateRefused:
                if time.monotonic() - self._last < self.min_refresh:
                    raise
                self.trust.refresh()
                self._last = time.monotonic()
                return self.trust.lookup(target.name, target.version)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class _DeviceTopics:
    """The ``Topics`` interface of ``MqttRepoLink`` over a simulated device's connection."""

    def __init__(self, device: SimDevice):
        self.device = device

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False):
        return self.device.publish(topic, payload, qos, retain)

    def subscribe(self, topic: str, handler) -> None:
        if topic == self.device.response_topic:  # subscribed on every (re)connect
            self.device.repo_handler = handler
        else:  # a chunk's cast topic, for the time of one request
            self.device.cast_handler = handler
            self.device.client.subscribe(topic, 1)

    def unsubscribe(self, topic: str) -> None:
        self.device.client.unsubscribe(topic)


class SimDevice:
    def __init__(self, sim: Simulator, index: int):
        cfg = sim.config
        self.sim, self.index = sim, index
        self.device_id = f"{cfg.id_prefix}{index:05d}"
        self.model: ModelRef | None = cfg.initial_model
        self.slots: dict[ModelRef, str] = {}  # versions on the device (A/B): model → sha256
        if cfg.initial_model is not None:
            self.slots[cfg.initial_model] = "factory"
        self.update = UpdateStatus("IDLE", since=time.time())
        self.health: Health | None = Health(0.0, 2.0, 1.0, 0)
        self.busy = False
        self.queued: Desired | None = None
        self.silenced = False
        self.last_download: dict[str, Any] | None = None  # the last artifact it fetched (telemetry)
        self.stats: Counter[str] = Counter()
        self.repo_handler = None
        self.cast_handler = None
        self.cast_prefix = f"{cfg.prefix}/repo/cast/"
        self.state_topic = device_topic(cfg.prefix, self.device_id, "state")
        self.desired_topic = device_topic(cfg.prefix, self.device_id, "desired")
        self.response_topic = response_topic(cfg.prefix, self.device_id)
        self.client = make_client(self.device_id, cfg.broker,
                                  will=(self.state_topic, offline_will(self.device_id), 1, True))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.user_data_set(self)
        self.link = sim.http_link or MqttRepoLink(_DeviceTopics(self), self.device_id, cfg.prefix,
                                                  max_chunk=max(cfg.chunk_size, 1), cast_chunk=cfg.chunk_size)
        self.connected = threading.Event()
        self._trust = None

    # -- MQTT ----------------------------------------------------------------------------------
    def connect(self) -> None:
        broker = self.client._edgeopt_broker
        self.client.connect(broker.host, broker.port, keepalive=self.sim.config.keepalive)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False):
        self.stats["sent"] += 1
        self.stats["sent_bytes"] += len(payload)
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("%s: broker refused the connection: %s", self.device_id, reason_code)
            return
        client.subscribe([(self.desired_topic, 1), (self.response_topic, 1)])
        self.publish_state()
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self.sim.stopping:
            delay = 1.0 + random.random() * 4.0  # spread the reconnections of many devices
            self.sim.loop.call_later(delay, self._reconnect)

    def _reconnect(self) -> None:
        if self.sim.stopping or self.connected.is_set():
            return
        try:
            self.client.reconnect()
        except OSError:
            self.sim.loop.call_later(2.0 + random.random() * 4.0, self._reconnect)

    def _on_message(self, client, userdata, msg) -> None:
        self.stats["received"] += 1
        self.stats["received_bytes"] += len(msg.payload)
        if msg.topic == self.desired_topic:
            try:
                desired = parse_desired(msg.payload)
            except ProtocolError as exc:
                self.stats[f"rejected_desired_{exc.code}"] += 1
                log.warning("%s: dropped malformed desired: %s", self.device_id, exc)
                return
            self.on_desired(desired)
        elif msg.topic == self.response_topic:
            if self.repo_handler is not None:
                self.repo_handler(msg.topic, msg.payload)
        elif msg.topic.startswith(self.cast_prefix):
            if self.cast_handler is not None:
                self.cast_handler(msg.topic, msg.payload)
        else:  # another device's message (a broker handing out every retained desired): never act on it
            self.stats["wrong_topic"] += 1

    def publish_state(self) -> None:
        if self.silenced:
            return
        self.publish(self.state_topic, state_message(
            self.device_id, online=True, agent_version="sim-0.1", profile=self.sim.config.profile,
            labels=self.sim.config.labels, model=self.model, update=self.update, health=self.health,
            ts=time.time()), qos=1, retain=True)

    def publish_telemetry(self) -> None:
        if self.silenced or not self.connected.is_set():
            return
        h = self.health or Health()
        p95 = h.latency_p95_ms if h.latency_p95_ms is not None else 2.0 + random.random()
        rate = 100.0 * (1 - h.error_rate) * (0.9 + 0.2 * random.random())  # what an agent's counters show
        body = {"model": self.model.to_json() if self.model else None,
                "latency_ms": {"p50_ms": p95 / 2, "p95_ms": p95}, "windows_per_s": rate,
                "dropped": {"inference_errors": round(rate * h.error_rate)},
                "profile": {"inference": {"us_per_window": {"queue_wait": 40.0, "inference": p95 * 400, "handoff": 5.0}},
                            "writer": {"us_per_window": {"wait": 900.0, "encode": 3.0, "sink:mqtt": 12.0}}},
                "error_rate": h.error_rate, "ts": time.time(), "update_downloads": {"last": self.last_download}}
        self.publish(device_topic(self.sim.config.prefix, self.device_id, "telemetry"),
                     encode_telemetry(self.device_id, body), qos=0)

    # -- updates -------------------------------------------------------------------------------
    def on_desired(self, desired: Desired) -> None:
        """On the loop thread: start an update, or queue it behind the one in progress."""
        if desired.model is None:
            return
        if self.busy:
            self.queued = desired
            return
        if desired.model == self.model:
            return
        self.busy = True
        self.sim.pool.submit(self._run_update, desired)

    def _set(self, state: str, target: ModelRef | None, rollout: str | None, reason: str | None = None) -> None:
        self.update = UpdateStatus(state, target, rollout, reason, time.time())
        self.publish_state()
        delay = self.sim.config.step_delay
        if delay and state not in ("IDLE", "ROLLED_BACK"):
            time.sleep(delay)

    def _run_update(self, desired: Desired) -> None:
        target, rollout = desired.model, desired.rollout
        assert target is not None
        plan, cfg = self.sim.config.failures, self.sim.config
        failing = plan.fails(self.device_id, target)
        try:
            self._set("DOWNLOADING", target, rollout)
            if failing and plan.mode == "silent":
                self.silenced = True
                return
            archive = self._fetch(target)
            self._set("VERIFYING", target, rollout)
            self._set("STAGED", target, rollout)
            self._set("SELF_TEST", target, rollout)
            if cfg.self_test == "golden" and archive is not None:
                problem = golden_self_test(archive, self.sim.workdir)
                if problem:
                    raise UpdateFailed(problem)
            if failing and plan.mode == "self-test":
                raise UpdateFailed("self-test failed (simulated)")
            self._set("SHADOW", target, rollout)
            if failing and plan.mode == "probation":
                self.health = Health(0.5, 2.0, 0.5, 0)
                self._set("PROBATION", target, rollout)
                raise UpdateFailed("probation: error rate 0.5 above the device's limit 0.05 (simulated)")
            self._set("PROBATION", target, rollout)
            if cfg.probation:
                time.sleep(cfg.probation)
            previous, self.model = self.model, target
            # A/B: the new slot and the one it replaced stay on the device; older ones are gone
            self.slots = {m: s for m, s in self.slots.items() if m == previous} | {target: "ok"}
            if failing and plan.mode == "health":
                self.health = Health(0.5, 2.0, 0.5, 0)
            else:
                self.health = Health(0.0, 2.0, 1.0, 0)
            self._set("COMMITTED", target, rollout)
            self._set("IDLE", None, None)
            self.stats["committed"] += 1
        except (UpdateFailed, EdgeoptError) as exc:
            reason = getattr(exc, "reason", None) if not isinstance(exc, UpdateFailed) else None
            text = f"{reason}: {exc}" if reason else str(exc)
            self.health = Health(0.0, 2.0, 1.0, 0)
            self._set("ROLLING_BACK", target, rollout, text[:200])
            self._set("ROLLED_BACK", target, rollout, text[:200])
            self.stats["rolled_back"] += 1
        except Exception:
            log.exception("%s: update to %s crashed", self.device_id, target)
            self._set("ROLLED_BACK", target, rollout, "internal error in the simulator")
        finally:
            self.sim.loop.call_soon(self._update_done)

    def _update_done(self) -> None:
        self.busy = False
        if self.update.state == "ROLLED_BACK":
            self.update = UpdateStatus("IDLE", self.update.target, self.update.rollout, self.update.reason, time.time())
            self.publish_state()
        queued, self.queued = self.queued, None
        if queued is not None:
            self.on_desired(queued)

    def _fetch(self, target: ModelRef) -> bytes | None:
        """The verified artifact bytes (None when the version is still in a slot: a switch back)."""
        from tuf.api.exceptions import DownloadError, LengthOrHashMismatchError
        from tuf.api.metadata import TargetFile

        cfg = self.sim.config
        if cfg.verify == "full":
            trust = self._device_trust()
            trust.refresh()
            info = trust.lookup(target.name, target.version)
            if target in self.slots:
                return None
            return Path(trust.download(info)).read_bytes()
        if self.sim.shared_trust is None:
            raise UpdateFailed("no pinned root: start the simulator with the repository's root metadata (--root)")
        info = self.sim.shared_trust.lookup(target)
        if target in self.slots:
            return None
        fetcher = MqttFetcher(self.link, chunk_size=cfg.chunk_size, timeout=cfg.request_timeout,
                              retries=cfg.retries, max_total=info.length, backoff=0.2)
        try:
            data = b"".join(fetcher.fetch(f"{url_for('targets')}{info.sha256}.{info.path}"))
        except DownloadError as exc:
            raise RemoteError(f"download of {info.path} failed: {exc}") from exc
        self.stats["downloaded_bytes"] += len(data)
        # what an agent reports in its telemetry (simulated devices take full artifacts only)
        self.last_download = {"target": target.to_json(), "bytes": len(data), "full_bytes": info.length,
                              "delta": False}
        try:
            TargetFile(info.length, {"sha256": info.sha256}, info.path).verify_length_and_hashes(data)
        except LengthOrHashMismatchError as exc:
            raise UpdateFailed(f"hash_mismatch: {exc}") from exc
        return data

    def _device_trust(self):
        if self._trust is None:
            cfg = self.sim.config
            home = self.sim.workdir / self.device_id
            (home / "metadata").mkdir(parents=True, exist_ok=True)
            if not (home / "metadata" / "root.json").exists():
                (home / "metadata" / "root.json").write_bytes(Path(cfg.root).read_bytes())
            fetcher = MqttFetcher(self.link, chunk_size=cfg.chunk_size, timeout=cfg.request_timeout,
                                  retries=cfg.retries, partial_dir=home / "partial", backoff=0.2)
            self._trust = DeviceTrust(home / "metadata", fetcher, home / "downloads")
        return self._trust


class Simulator:
    def __init__(self, config: SimConfig):
        self.config = config
        # over HTTP, one client for every device: urllib3's pool, sized to the download workers
        self.http_link = HttpRepoLink(config.repo_url, pool_size=config.workers) if config.repo_url else None
        self.loop = ClientLoop()
        self.pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="edgeopt-sim")
        self.devices: list[SimDevice] = []
        self.stopping = False
        self.shared_trust: SharedTrust | None = None
        self._tmp = None
        if config.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="edgeopt-sim-")
            self.workdir = Path(self._tmp.name)
        else:
            self.workdir = Path(config.workdir)
            self.workdir.mkdir(parents=True, exist_ok=True)

    def start(self, connect_timeout: float = 60.0) -> Simulator:
        cfg = self.config
        if cfg.root is not None and not Path(cfg.root).is_file():
            raise UserInputError(f"--root {cfg.root}: no such file (the repository's metadata/1.root.json)")
        if cfg.root is not None and cfg.verify == "shared":
            self.shared_trust = SharedTrust(self, Path(cfg.root), self.workdir / "shared")
        self.loop.start()
        for i in range(cfg.devices):
            dev = SimDevice(self, cfg.first_index + i)
            self.loop.add(dev.client)
            self.devices.append(dev)
        for dev in self.devices:
            try:
                dev.connect()
            except OSError as exc:
                self.stop()
                raise RemoteError(f"simulated device {dev.device_id} cannot reach the broker: {exc}") from exc
        deadline = time.monotonic() + connect_timeout
        for dev in self.devices:
            if not dev.connected.wait(max(0.0, deadline - time.monotonic())):
                self.stop()
                raise RemoteError(f"simulated device {dev.device_id} got no CONNACK within {connect_timeout:.0f} s")
        if cfg.telemetry_interval > 0:
            self._schedule_telemetry()
        return self

    def _schedule_telemetry(self) -> None:
        interval = self.config.telemetry_interval
        def ticker(dev: SimDevice):
            def tick() -> None:
                if self.stopping:
                    return
                dev.publish_telemetry()
                self.loop.call_later(interval, tick)  # this device's own tick (a closure per device)
            return tick

        for dev in self.devices:
            self.loop.call_later(random.random() * interval, ticker(dev))

    def summary(self) -> dict[str, Any]:
        states: Counter[str] = Counter(d.update.state for d in self.devices)
        models: Counter[str] = Counter(str(d.model) if d.model else "-" for d in self.devices)
        totals: Counter[str] = Counter()
        for d in self.devices:
            totals.update(d.stats)
        return {"devices": len(self.devices), "connected": sum(d.connected.is_set() for d in self.devices),
                "update_states": dict(states), "models": dict(models), "messages": dict(totals)}

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.pool.shutdown(wait=False, cancel_futures=True)
        for dev in self.devices:
            if dev.connected.is_set() and not dev.silenced:
                dev.publish(dev.state_topic, offline_will(dev.device_id), qos=1, retain=True)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(d.client.want_write() for d in self.devices if d.connected.is_set()):
            time.sleep(0.05)
        for dev in self.devices:
            dev.client.disconnect()
        time.sleep(0.2)
        self.loop.stop()
        for dev in self.devices:
            sock = dev.client.socket()
            if sock is not None:
                sock.close()
        if self.shared_trust is not None:
            self.shared_trust.close()
        if self._tmp is not None:
            self._tmp.cleanup()
