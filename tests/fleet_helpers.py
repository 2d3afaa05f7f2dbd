"""Fixtures for the fleet tests: a throw-away PostgreSQL database (skipped with a reason when no server
answers), database URLs for both backends, and small artifacts/repositories."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# The server the PostgreSQL tests use (trust auth on this machine); override with EDGEOPT_TEST_PG.
PG_ADMIN_URL = os.environ.get("EDGEOPT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin():
    import psycopg

    return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)


def postgres_available() -> str | None:
    """None when the server answers, else why not (for the skip reason)."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'edgeopt[fleet]')"
    try:
        _admin().close()
    except psycopg.Error as exc:
        return f"no PostgreSQL server answers at {PG_ADMIN_URL} ({str(exc).strip().splitlines()[0]})"
    return None


def throwaway_postgres() -> Iterator[str]:
    """Create a new database, yield its URL, drop it afterwards."""
    reason = postgres_available()
    if reason:
        pytest.skip(reason)
    name = f"edgeopt_test_{uuid.uuid4().hex[:12]}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with _admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> Iterator[str]:
    """A fresh fleet database URL, once per backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
    else:
        yield from throwaway_postgres()


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


# -- a fleet over a real Mosquitto ------------------------------------------------------------------
V1_TEXT, V2_TEXT = "kws@1", "kws@2"


def tuned_mosquitto(workdir: Path):
    """The tests' Mosquitto with the tuning the generated broker config carries (TCP_NODELAY...)."""
    from edgeopt.fleet.security import BROKER_TUNING

    from brokers import Mosquitto

    return Mosquitto(workdir, extra_config=BROKER_TUNING).start()


class DesiredLog:
    """Every ``desired`` message the broker delivers, seen by an observer subscribed to all of them."""

    def __init__(self, url: str, prefix: str = "edgeopt"):
        import threading

        from edgeopt.mqtt import connect, make_client, subscribe

        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = make_client(f"desired-observer-{uuid.uuid4().hex[:6]}", url)
        connect(self.client)
        subscribe(self.client, f"{prefix}/devices/+/desired", 1, self._on_message)

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic.split("/")[-2], bytes(msg.payload)))

    def told(self, version: str) -> set[str]:
        """Devices that were ever told to run ``version``."""
        from edgeopt.protocol import parse_desired

        with self._lock:
            return {dev for dev, payload in self.messages
                    if payload and parse_desired(payload).model.version == version}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class FleetRig:
    """A repository with kws@1 and kws@2, a fleet database, simulated devices starting on kws@1 and
    (unless ``service=False``) the fleet service in this process, all on one real Mosquitto."""

    def __init__(self, tmp: Path, broker, db: str, devices: int, service: str = "in-process",
                 artifact_bytes: int = 20_000, service_options: dict | None = None, existing_repo: bool = False,
                 **sim_options):
        """``existing_repo``: TMP/repo was initialised already (the caller serves it, say over HTTP)."""
        import time

        from edgeopt.fleet.db import open_database
        from edgeopt.fleet.repository import Repository
        from edgeopt.fleet.simulator import SimConfig, Simulator
        from edgeopt.fleet.store import FleetStore
        from edgeopt.protocol import ModelRef

        from repo_helpers import fake_artifact

        self.tmp, self.broker, self.db = tmp, broker, db
        self.repo = Repository(tmp / "repo") if existing_repo else Repository.init(tmp / "repo")
        for v in ("1", "2"):
            self.repo.publish(fake_artifact(tmp / f"art-{v}", "kws", v, artifact_bytes, seed=int(v)), "kws", v)
        self.service_mode = service
        self.service_options = service_options or {}
        self.service = self.process = None
        self.start_service()
        self.desired = DesiredLog(broker.url)
        options = {"workers": 16, "request_timeout": 2.0} | sim_options
        self.sim = Simulator(SimConfig(broker=broker.url, devices=devices, initial_model=ModelRef("kws", "1"),
                                       root=self.repo.metadata_dir / "1.root.json", workdir=tmp / "sim",
                                       **options)).start()
        _, self.conn = open_database(db)
        self.store = FleetStore(self.conn)
        deadline = time.monotonic() + 60
        while self.store.count_devices() < devices:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.store.count_devices()} of {devices} devices registered")
            time.sleep(0.1)

    def start_service(self) -> None:
        """The fleet service in this process, or the real ``edgeopt fleet serve`` in a subprocess."""
        if self.service_mode == "subprocess":
            import subprocess

            self.service_log = open(self.tmp / "service.log", "ab")  # noqa: SIM115 (closed in close())
            self.process = subprocess.Popen(self.serve_command(), stderr=self.service_log)
            return
        from edgeopt.fleet.service import FleetService, ServiceConfig

        self.service = FleetService(ServiceConfig(repo=self.tmp / "repo", db=self.db, broker=self.broker.url,
                                                  tick=0.2, flush_interval=0.1, heartbeat=0.5,
                                                  **self.service_options)).start()

    def serve_command(self) -> list[str]:
        """``edgeopt fleet serve`` on this rig (``service_options`` as its flags: {"replicas": True})."""
        import sys

        flags = []
        for name, value in self.service_options.items():
            flags += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
        return [str(Path(sys.executable).parent / "edgeopt"), "fleet", "serve", "--repo", str(self.tmp / "repo"),
                "--db", self.db, "--broker", self.broker.url, "--tick", "0.2", *flags]

    def kill_service(self) -> None:
        """SIGKILL: no clean shutdown, no final flush (a crash or power loss of the fleet host)."""
        self.process.kill()
        self.process.wait(10)

    def create(self, rollout_id: str = "r-1", version: str = "2", start: bool = True, **spec_options):
        import time

        from edgeopt.fleet.rollout import new_rollout
        from edgeopt.fleet.rollout_spec import RolloutSpec, parse_waves
        from edgeopt.protocol import ModelRef

        options = {"waves": parse_waves("1%,10%,50%,100%"), "bake_s": 0.3, "device_timeout_s": 30.0,
                   "success_threshold": 1.0, "failure_pct": 0.05} | spec_options
        spec = RolloutSpec(ModelRef("kws", version), {"fleet": "sim"}, **options)
        ids = [d.device_id for d in self.store.list_devices(spec.selector)]
        status, assignments = new_rollout(rollout_id, spec, ids, time.time())
        self.store.create_rollout(status, assignments)
        if start:
            self.command(rollout_id, "start")
        return self.store.load_rollout(rollout_id)

    def command(self, rollout_id: str, command: str) -> None:
        import time

        from edgeopt.fleet.rollout import apply_command

        for _ in range(50):
            status, assignments = self.store.load_rollout(rollout_id)
            if self.store.save_decision(apply_command(status, assignments, command, time.time()), status.revision):
                return
            time.sleep(0.05)
        raise AssertionError(f"could not {command} {rollout_id}")

    def wait(self, rollout_id: str, condition, timeout: float = 60.0, what: str = "condition"):
        import time

        deadline = time.monotonic() + timeout
        while True:
            status, assignments = self.store.load_rollout(rollout_id)
            if condition(status, assignments):
                return status, assignments
            if time.monotonic() > deadline:
                from edgeopt.fleet.rollout import progress

                raise AssertionError(f"timed out waiting for {what}: {status.state} {status.reason} "
                                     f"{progress(status, assignments)}")
            time.sleep(0.1)

    def wait_devices(self, predicate, timeout: float = 60.0, what: str = "devices"):
        import time

        deadline = time.monotonic() + timeout
        while not all(predicate(d) for d in self.sim.devices):
            if time.monotonic() > deadline:
                bad = [d.device_id for d in self.sim.devices if not predicate(d)]
                raise AssertionError(f"timed out waiting for {what}: {len(bad)} device(s) not there, e.g. {bad[:5]}")
            time.sleep(0.1)

    def close(self) -> None:
        self.sim.stop()
        self.desired.close()
        if self.service is not None:
            self.service.stop()
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                self.process.wait(15)
            self.service_log.close()
        self.conn.close()
