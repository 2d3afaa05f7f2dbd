"""A real Mosquitto broker for tests, on a free loopback port with a generated config, and a paho
subscriber that records what arrives.

    with Mosquitto(tmp_path) as broker:          # plain listener, persistence on
        broker.kill(); broker.start()            # fault injection: SIGKILL, then restart on the same port

TLS, a password file or an ACL are extra config lines (``extra_conf``) plus files the test writes;
the system broker on 1883 is never used.

The configuration 'edgeopt fleet broker-config' generates is run exactly as written by
``GeneratedMosquitto``: as root when the tests run as root (Mosquitto then drops to its ``user`` and
must read what it needs as that user), else as the current user.

    workdir = reachable_workdir(tmp_path)          # a directory the broker's user can enter
    broker = GeneratedMosquitto(workdir / "broker", port).start()
    broker.reload(command)                          # the reload command broker-config prints
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_mosquitto() -> None:
    if not os.access(MOSQUITTO, os.X_OK):
        pytest.skip("needs the Mosquitto broker: apt-get install mosquitto (or run `make setup` as root)")


class Mosquitto:
    def __init__(self, workdir: Path, port: int | None = None, persistence: bool = True,
                 extra_conf: list[str] | tuple[str, ...] = (), extra_config: str = ""):
        require_mosquitto()
        self.dir = Path(workdir) / f"mosquitto-{id(self):x}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.conf = self.dir / "mosquitto.conf"
        # as root, mosquitto would switch to user "mosquitto", which cannot write the test's directory
        self.log = self.dir / "mosquitto.log"
        # set_tcp_nodelay: request/response round trips must not wait for Nagle + delayed ACK (~40 ms)
        lines = [f"user {getpass.getuser()}", f"listener {self.port} {self.host}", "allow_anonymous true",
                 f"log_dest file {self.log}", "log_type error", "log_type warning",
                 "log_type notice", "max_queued_messages 0", "queue_qos0_messages true", "set_tcp_nodelay true"]
        if persistence:  # sessions and queued messages survive a restart (saved every second)
            lines += ["persistence true", f"persistence_location {self.dir}/", "autosave_interval 1"]
        self.conf.write_text("\n".join([*lines, *extra_conf]) + "\n" + extra_config)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def start(self, timeout: float = 10.0) -> Mosquitto:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited {self.proc.returncode}: {self.proc.stderr.read().decode()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s")

    def _end(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Die at once, as on a crash or power loss (only what was autosaved survives)."""
        self._end(signal.SIGKILL)

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Subscriber:
    """A paho client recording (topic, payload, retain, dup) per message; a persistent session by
    default, so a broker restart does not lose what arrives while it reconnects. ``dup`` marks the
    broker's redelivery of a message it had sent this subscriber before (QoS 1 at-least-once)."""

    def __init__(self, broker: Mosquitto, *topics: str, client_id: str | None = None, clean_session: bool = False,
                 qos: int = 1):
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool, bool]] = []
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"test-sub-{id(self):x}",
                                  clean_session=clean_session, protocol=mqtt.MQTTv311)
        self.client.reconnect_delay_set(0.05, 0.2)
        self.topics = topics
        self.qos = qos

        def on_connect(client, userdata, flags, rc, props=None):
            for t in self.topics:
                client.subscribe(t, qos=self.qos)

        def on_subscribe(client, userdata, mid, rcs, props=None):
            self.subscribed.set()

        def on_message(client, userdata, msg):
            with self._lock:
                self.messages.append((msg.topic, msg.payload, bool(msg.retain), bool(msg.dup)))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect(broker.host, broker.port, keepalive=5)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("subscription not acknowledged")

    def payloads(self, topic_suffix: str, redeliveries: bool = True) -> list[dict]:
        with self._lock:
            return [json.loads(p) for t, p, _, dup in self.messages
                    if t.endswith(topic_suffix) and (redeliveries or not dup)]

    def wait_for(self, predicate, timeout: float = 20.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# -- the generated broker configuration ----------------------------------------------------------
def reachable_workdir(tmp_path: Path) -> Path:
    """pytest's temporary directories are 0700: as root, the generated config goes under a fresh
    0755 directory in /tmp instead, so that the ``mosquitto`` user can reach it."""
    if os.geteuid() != 0:
        return tmp_path
    d = Path(tempfile.mkdtemp(prefix="edgeopt-broker-test-", dir="/tmp"))
    d.chmod(0o755)
    (tmp_path / "reachable-workdir").write_text(str(d))  # for the clean-up
    return d


def remove_workdir(tmp_path: Path) -> None:
    marker = tmp_path / "reachable-workdir"
    if marker.exists():
        shutil.rmtree(marker.read_text(), ignore_errors=True)


def process_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for process {pid}")


class GeneratedMosquitto:
    def __init__(self, config_dir: Path, port: int):
        require_mosquitto()
        self.dir, self.port = Path(config_dir), port
        self.log = self.dir.parent / f"mosquitto-{port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> GeneratedMosquitto:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.dir / "mosquitto.conf")],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s")

    @property
    def pid_file(self) -> Path:
        return self.dir / "run" / "mosquitto.pid"

    def reload(self, command: str) -> None:
        """Run the reload command as printed (a shell line), then wait until the broker logged it."""
        before = self.log.read_text().count("Reloading config")
        subprocess.run(command, shell=True, check=True)
        deadline = time.monotonic() + 10
        while self.log.read_text().count("Reloading config") == before:
            assert time.monotonic() < deadline, f"mosquitto did not reload: {self.log.read_text()[-2000:]}"
            time.sleep(0.05)
        time.sleep(0.2)  # it logs before it re-reads the files

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self.proc = None
