"""``edgeopt fleet serve``: one long-running process with the repository server, the device registry
and the rollout controller (and a local broker when no broker URL is given: fleet/broker.py).

Everything it knows lives in the database (``fleet.db``) and the repository directory, so it is
restart-safe: kill it at any moment, start it again, and rollouts continue where the last
persisted decision left them. Operator commands (``edgeopt fleet rollout ...``) write to the same
database and take effect at the next tick.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeopt.fleet.broker import HEADER_ROOM, MIB, start_local_broker
from edgeopt.fleet.controller import LOOKBACK_S, Controller, DesiredPublisher, Leadership
from edgeopt.fleet.dashboard.auth import read_token
from edgeopt.fleet.dashboard.server import Dashboard, DashboardConfig  # starlette and uvicorn load on start()
from edgeopt.fleet.db import open_database
from edgeopt.fleet.registry import Registry
from edgeopt.fleet.repo_server import RepoServer
from edgeopt.fleet.repo_web import RepoWeb
from edgeopt.fleet.repository import Repository
from edgeopt.fleet.serve_options import SERVE
from edgeopt.fleet.store import FleetStore
from edgeopt.mqtt import PahoTopics, connect, make_client, redact_url, subscribe

log = logging.getLogger("edgeopt.fleet")
SHARE_GROUP = "edgeopt-fleet"  # the replicas' shared subscription to repository requests


@dataclass
class ServiceConfig:
    repo: Path
    db: str
    # the operator's settings: defaults and meanings in their declarations (SERVE_PARAMS)
    broker: str | None = SERVE["broker"].default          # None: start a local broker on ``listen``
    listen: str = SERVE["listen"].default
    local_broker: str = SERVE["local_broker"].default
    prefix: str = "edgeopt"
    chunk_size: int = SERVE["chunk_size"].default
    tick: float = SERVE["tick"].default
    timestamp_refresh: float = SERVE["timestamp_refresh"].default
    http: str | None = SERVE["http"].default                 # the dashboard's HOST:PORT, or None: no dashboard
    http_token_file: Path | None = SERVE["http_token_file"].default  # the token other machines must give
    http_cert: Path | None = SERVE["http_cert"].default              # TLS for the dashboard
    http_key: Path | None = SERVE["http_key"].default
    http_repo: str | None = SERVE["http_repo"].default  # HOST:PORT for the repository's static files, or None
    replicas: bool = SERVE["replicas"].default  # one of several: repository requests by shared subscription
    unicast: bool = SERVE["unicast"].default    # artifact chunks to each device alone, never cast
    lease_ttl: float | None = None        # seconds a leader's lease lasts unrenewed (None: max(5, 3 × tick))
    telemetry_sample_s: float = 60.0      # at most one telemetry sample per device this often (charts)
    telemetry_keep_s: float = 86400.0     # samples older than this are deleted
    history_keep_s: float = 30 * 86400.0  # a device's changes of state older than this are deleted
    flush_interval: float = 0.25          # seconds between registry writes
    heartbeat: float = 2.0


class FleetService:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.local_broker = None
        self.clients: list = []
        self.connections: list = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.broker_url: str | None = config.broker
        self.dashboard = None
        self.repo_web = None
        self.leadership = None
        self.replica_id = f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def start(self) -> FleetService:
        cfg = self.config
        self.repository = Repository(cfg.repo)
        db, control_conn = open_database(cfg.db)  # fails early, before anything is started
        self.db = db
        self.connections = [control_conn, db.connect(), db.connect()]
        self.store = FleetStore(control_conn)
        if self.broker_url is None:
            self.local_broker = start_local_broker(cfg.listen, cfg.local_broker,
                                                   max_payload=max(cfg.chunk_size, MIB) + HEADER_ROOM)
            self.broker_url = self.local_broker.url
        # One connection for the repository server, the registry and the desired messages: a broker
        # that binds client ids to user names (the generated Mosquitto config does) allows one
        # connection per account, and a second one would knock the first off.
        client = make_client(f"edgeopt-fleet-{socket.gethostname()[:20]}-{os.getpid()}", self.broker_url)
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        self.clients = [client]
        try:
            connect(client)
        except Exception:
            self._stop_local_broker()
            raise

        self.repo_server = RepoServer(self.repository, PahoTopics(client), cfg.prefix, cfg.chunk_size,
                                      share=SHARE_GROUP if cfg.replicas else None, cast=not cfg.unicast)
        self.repo_server.start()
        self.registry = Registry(FleetStore(self.connections[1]), cfg.prefix, cfg.flush_interval,
                                 sample_s=cfg.telemetry_sample_s)
        self.registry.subscribe(lambda topic, qos, handler: subscribe(
            client, topic, qos, lambda c, u, m: handler(m.topic, m.payload)))
        self.publisher = DesiredPublisher(FleetStore(self.connections[2]),
                                          lambda t, p, q, r: client.publish(t, p, qos=q, retain=r), cfg.prefix)
        self.controller = Controller(self.store, self.publisher, lookback=LOOKBACK_S if cfg.replicas else 0.0)
        self.leadership = Leadership(self.store, self.replica_id, cfg.lease_ttl or max(5.0, 3 * cfg.tick))
        self.leadership.renew()  # known before the ready line; the control loop renews it every tick
        resubscribe = client.on_connect

        def on_connect(c, userdata, flags, reason_code, properties):
            if resubscribe is not None:
                resubscribe(c, userdata, flags, reason_code, properties)
            if not reason_code.is_failure:
                self.publisher.request_republish()  # the broker may have lost retained messages

        client.on_connect = on_connect
        self.publisher.request_republish()
        self.registry.start()
        self.started_at = time.time()
        if cfg.http:
            try:
                token = read_token(cfg.http_token_file) if cfg.http_token_file else None
                self.dashboard = Dashboard(DashboardConfig(cfg.http, token, cfg.http_cert, cfg.http_key),
                                           db, self.repository, self.status).start()
            except BaseException:
                self.stop()
                raise
        if cfg.http_repo:
            try:
                self.repo_web = RepoWeb(self.repository.root, cfg.http_repo, cfg.http_cert, cfg.http_key).start()
            except BaseException:
                self.stop()
                raise
        self._spawn(self._control_loop, "edgeopt-controller")
        self._spawn(self._housekeeping_loop, "edgeopt-housekeeping")
        log.info("fleet service: repository %s, database %s, broker %s", cfg.repo, db, self.broker_text())
        return self

    def broker_text(self) -> str:
        """Which broker, for the ready line and logs (never with a password)."""
        url = redact_url(self.broker_url or "")
        if self.local_broker is None:
            return url
        return f"{url} ({self.local_broker.describe()}, started by the service)"

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _control_loop(self) -> None:
        self.controller.run(self._stop, self.config.tick, self.leadership)

    def _housekeeping_loop(self) -> None:
        store = FleetStore(self.connections[0])
        next_refresh = time.monotonic() + self.config.timestamp_refresh
        next_prune = time.monotonic()
        while not self._stop.wait(self.config.heartbeat):
            try:
                store.heartbeat("service", self.status())
                self.repo_server.sweep()  # casts whose time is up, whoever cast them
                if time.monotonic() >= next_prune:
                    store.prune_samples(time.time() - self.config.telemetry_keep_s)
                    store.prune_history(time.time() - self.config.history_keep_s)
                    next_prune = time.monotonic() + 600
                if not self.leadership.leading:  # the leader does the repository's and database's chores
                    continue
                if time.monotonic() >= next_refresh:
                    self.repository.refresh_timestamp()
                    next_refresh = time.monotonic() + self.config.timestamp_refresh
            except Exception:
                log.exception("housekeeping failed")

    def status(self) -> dict[str, Any]:
        local = self.local_broker
        return {"pid": os.getpid(), "broker": self.broker_text(), "started_at": self.started_at,
                "broker_kind": local.kind if local else "external", "broker_version": local.version if local else None,
                "registry": self.registry.snapshot_stats(),
                "repo_server": self.repo_server.snapshot_stats(), "controller": self.controller.snapshot_stats(),
                "replica": self.replica_id, "leading": self.leadership.leading if self.leadership else False,
                "dashboard": self.dashboard.url if self.dashboard else None,
                "repo_url": self.repo_web.url if self.repo_web else None}

    def wait(self, timeout: float | None = None) -> bool:
        return self._stop.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self.dashboard is not None:
            self.dashboard.stop()
        if self.repo_web is not None:
            self.repo_web.stop()
        for t in self._threads:
            t.join(10)
        if self.leadership is not None:  # a standby takes over at its next tick, not after the lease runs out
            with contextlib.suppress(Exception):
                self.leadership.release()
        try:
            self.registry.stop()
            FleetStore(self.connections[0]).heartbeat("service", self.status() | {"stopped_at": time.time()})
        except Exception:
            log.exception("final registry flush failed")
        if not self.config.replicas:  # alone: nobody else will clear what this service cast
            with contextlib.suppress(Exception):
                self.repo_server.clear_all()
        for c in self.clients:
            c.disconnect()
            c.loop_stop()
        self._stop_local_broker()
        for conn in self.connections:
            conn.close()

    def _stop_local_broker(self) -> None:
        if self.local_broker is not None:
            self.local_broker.stop()
