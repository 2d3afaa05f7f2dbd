"""The broker ``edgeopt fleet serve`` starts when it is given no broker URL: a loopback broker that
lives and dies with the service, for demos, trials and one-host fleets.

Which one, in this order (``--local-broker auto``):

    mosquitto   the system Mosquitto, when installed: a child process with a generated loopback
                config in a private temporary directory (its output goes to a file there)
    iotcore     the ``iotcore`` wheel (rumqttd, Rust): a child process of the service too
    amqtt       pure Python, in a thread of the service -- a last resort: under concurrent connects
                amqtt 0.12 drops clients, loses QoS 1 messages it acknowledged and hands a client
                other clients' retained messages (tests/test_broker_storm.py shows it)

Each listens without authentication or TLS: bind it to loopback (the default). Production fleets
use Mosquitto with ``edgeopt fleet broker-config`` or a clustered broker (docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from edgeopt.errors import EnvironmentFault, MissingDependency, UserInputError
from edgeopt.fleet.security import BROKER_TUNING
from edgeopt.fleet.serve_options import parse_listen

log = logging.getLogger("edgeopt.fleet")

LOCAL_BROKERS = ("mosquitto", "iotcore", "amqtt")
MIB = 1024 * 1024
# Room for a chunk frame's JSON header on top of the largest chunk; brokers cap whole payloads.
HEADER_ROOM = 64 * 1024
AMQTT_WARNING = ("amqtt is the last-resort broker: under concurrent connects it drops clients, loses "
                 "acknowledged QoS 1 messages and sends clients other devices' retained messages; "
                 "install mosquitto (apt-get install mosquitto) or pip install iotcore")


def mosquitto_executable() -> str | None:
    """The system Mosquitto (Debian installs it in /usr/sbin, which a non-root PATH often lacks)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def available() -> dict[str, bool]:
    """Which local brokers this machine can start."""
    return {"mosquitto": mosquitto_executable() is not None, "iotcore": _importable("iotcore"),
            "amqtt": _importable("amqtt")}


class LocalBroker:
    """A broker on ``host:port`` started for one service. ``start()`` checks the port and waits until
    the broker accepts connections; a backend fills in ``_launch`` and ``_stop``."""

    kind = ""

    def __init__(self, host: str = "127.0.0.1", port: int = 1884, max_payload: int = MIB + HEADER_ROOM):
        self.host, self.port, self.max_payload = host, port, max_payload
        self.version = ""
        self.note: str | None = None       # a warning to show where the broker is reported

    @property
    def url(self) -> str:
        return f"mqtt://{self._connect_host()}:{self.port}"

    def describe(self) -> str:
        return f"{self.kind} {self.version}".strip()

    def _connect_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host

    def start(self, timeout: float = 15.0) -> LocalBroker:
        if self.port == 0:
            with socket.socket() as s:
                s.bind((self.host, 0))
                self.port = s.getsockname()[1]
        with socket.socket() as probe:  # a busy port is one line here, not a log line of the broker
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.host, self.port))
            except OSError as exc:
                raise UserInputError(f"the local broker cannot listen on {self.host}:{self.port} ({exc.strerror}); "
                                     f"pass --listen HOST:PORT, or --broker URL to use a running broker") from None
        self._launch(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            problem = self._failed()
            if problem:
                self.stop()
                raise EnvironmentFault(f"the local {self.kind} broker did not start on {self.host}:{self.port}: "
                                       f"{problem}")
            try:
                with socket.create_connection((self._connect_host(), self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise EnvironmentFault(f"the local {self.kind} broker did not listen on {self.host}:{self.port} "
                               f"within {timeout:.0f} s")

    def _launch(self, timeout: float) -> None:
        raise NotImplementedError

    def _failed(self) -> str | None:
        """Why the broker died while starting, or None while it may still come up."""
        return None

    def stop(self) -> None:
        raise NotImplementedError


# Runs a broker that cannot watch its parent (Mosquitto) and ends it when the service goes away, even
# by SIGKILL: its stdin is a pipe from the service, and reading it returns when the service is gone.
# Its working directory is the broker's private directory: removed once the service is gone (a
# broker that dies by itself leaves it, so that the service can read why).
GUARD = """import os, shutil, signal, subprocess, sys, threading
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)
leaving = threading.Event()
def died_by_itself():
    code = child.wait()
    if not leaving.is_set():
        os._exit(code)
threading.Thread(target=died_by_itself, daemon=True).start()
signal.signal(signal.SIGTERM, lambda *_: child.terminate())
try:
    sys.stdin.buffer.read()
finally:
    leaving.set()
    child.terminate()
    code = child.wait()
    shutil.rmtree(os.getcwd(), ignore_errors=True)
    os._exit(code)
"""


class _ChildBroker(LocalBroker):
    """A broker in a child process whose output goes to a file in its own private directory; the
    child ends when the service closes its stdin or dies."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.proc: subprocess.Popen | None = None
        self.workdir: Path | None = None

    def _spawn(self, argv: list[str]) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"edgeopt-{self.kind}-"))
        self._prepare(self.workdir)
        # its own session: a Ctrl-C meant for the service must not stop the broker before the
        # service has said goodbye to it
        with open(self.workdir / "broker.log", "wb") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=self.workdir, start_new_session=True)

    def _prepare(self, workdir: Path) -> None:
        pass

    def _failed(self) -> str | None:
        if self.proc is None or self.proc.poll() is None:
            return None
        lines = [ln.strip() for ln in self.output().splitlines() if ln.strip()]
        return f"exited {self.proc.returncode}" + (f": {'; '.join(lines[-2:])}" if lines else "")

    def output(self) -> str:
        try:
            return (self.workdir / "broker.log").read_text(errors="replace") if self.workdir else ""
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.stdin.close()  # the child's cue to end
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def run_as_user() -> str:
    """The ``user`` line of a loopback Mosquitto: started as root, Mosquitto drops to this user."""
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("mosquitto")
            return "mosquitto"
        except KeyError:
            pass
    return getpass.getuser()


class MosquittoBroker(_ChildBroker):
    kind = "mosquitto"

    def loopback_conf(self) -> str:
        # Anonymous on purpose: it serves only this host's service, simulators and agents. Logs go to
        # stderr, i.e. the private log file, which stays readable after Mosquitto drops privileges.
        return (f"# written by 'edgeopt fleet serve': a broker for this service only, stopped with it\n"
                f"listener {self.port} {self.host}\n"
                f"allow_anonymous true\n"
                f"persistence false\n"
                f"user {run_as_user()}\n"
                f"log_dest stderr\nlog_type error\nlog_type warning\n"
                f"{BROKER_TUNING}")

    def _prepare(self, workdir: Path) -> None:
        (workdir / "mosquitto.conf").write_text(self.loopback_conf())

    def _launch(self, timeout: float) -> None:
        exe = mosquitto_executable()
        if exe is None:
            raise EnvironmentFault("the local broker 'mosquitto' is not installed (apt-get install mosquitto)")
        try:
            version = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=5).stdout.split()
            self.version = version[2] if len(version) > 2 and version[0] == "mosquitto" else ""
        except (OSError, subprocess.TimeoutExpired):
            self.version = ""
        self._spawn([sys.executable, "-c", GUARD, exe, "-c", "mosquitto.conf"])


class IotcoreBroker(_ChildBroker):
    """rumqttd from the ``iotcore`` wheel. It has no shutdown call, so it runs in a child process
    (``serve_iotcore`` below), which exits when the service closes its stdin or goes away."""

    kind = "iotcore"
    MAX_INFLIGHT = 1024          # per connection; above the fleet service's own QoS 1 window (1000)
    SEGMENT = 16 * MIB           # a topic filter's in-memory log: segments of this size (> one payload) ...
    SEGMENTS = 8                 # ... and this many before the oldest is dropped

    def rumqttd_toml(self) -> str:
        # next_connection_delay_ms = 0: with iotcore's own setting (1 ms between accepts) a storm of
        # 200 clients reconnecting lost 1-3 of every 600 connections right after CONNACK or SUBACK
        # (rumqttd's connection ids are reused while events of the old connection are in flight);
        # without the pause, 0 of 10,200 (tests/test_broker_storm.py).
        return (f"# written by 'edgeopt fleet serve': rumqttd for this service only, stopped with it\n"
                f"id = 0\n\n[router]\nid = 0\nmax_connections = 100000\nmax_outgoing_packet_count = 200\n"
                f"max_segment_size = {max(self.SEGMENT, 2 * self.max_payload)}\nmax_segment_count = {self.SEGMENTS}\n\n"
                f'[v4.1]\nname = "edgeopt"\nlisten = "{self.host}:{self.port}"\nnext_connection_delay_ms = 0\n'
                f"[v4.1.connections]\nconnection_timeout_ms = 60000\nmax_payload_size = {self.max_payload}\n"
                f"max_inflight_count = {self.MAX_INFLIGHT}\ndynamic_filters = true\n")

    def _prepare(self, workdir: Path) -> None:
        (workdir / "rumqttd.toml").write_text(self.rumqttd_toml())

    def _launch(self, timeout: float) -> None:
        if not _importable("iotcore"):
            raise MissingDependency("iotcore", "fleet", "the local iotcore broker")
        from importlib.metadata import version

        self.version = version("iotcore")
        bootstrap = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
                     "from edgeopt.fleet.broker import serve_iotcore; serve_iotcore()")
        self._spawn([sys.executable, "-c", bootstrap, "rumqttd.toml"])


def serve_iotcore() -> None:
    """The iotcore child process: run rumqttd with the config file named in argv until the parent
    closes our stdin (or dies)."""
    from iotcore.iotcore import IotCoreBroker

    logging.basicConfig(level=logging.WARNING)
    # rumqttd reports every routed packet through error-level tracing spans: not for our log
    logging.getLogger("rumqttd").setLevel(logging.CRITICAL)

    def exit_with_parent() -> None:
        try:
            sys.stdin.buffer.read()
        finally:
            shutil.rmtree(os.getcwd(), ignore_errors=True)  # the private directory
            os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    IotCoreBroker(config_path=sys.argv[1]).run_forever()


class AmqttBroker(LocalBroker):
    """amqtt (pure Python) in a thread of this process: the last resort (see the module docstring)."""

    kind = "amqtt"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.note = AMQTT_WARNING
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker = None
        self._thread: threading.Thread | None = None
        self._failure: list[BaseException] = []

    def _launch(self, timeout: float) -> None:
        try:
            from amqtt.broker import Broker
        except ImportError as exc:
            raise MissingDependency("amqtt", "fleet", "the local amqtt broker") from exc
        from importlib.metadata import version

        self.version = version("amqtt")
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        config = {"listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}",
                                            "max_connections": 0}},
                  "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                self._broker = Broker(config, loop=loop)
                loop.run_until_complete(self._broker.start())
            except Exception as exc:
                self._failure.append(exc)
                return
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="edgeopt-amqtt-broker", daemon=True)
        self._thread.start()

    def _failed(self) -> str | None:
        return str(self._failure[0]) if self._failure else None

    def stop(self) -> None:
        loop, broker, self._loop, self._broker = self._loop, self._broker, None, None
        if loop is None or broker is None:
            return
        fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
        try:
            fut.result(10)
        except Exception:  # shutting down anyway
            log.debug("amqtt broker shutdown", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)


BACKENDS: dict[str, type[LocalBroker]] = {"mosquitto": MosquittoBroker, "iotcore": IotcoreBroker,
                                          "amqtt": AmqttBroker}


def choose(preference: str = "auto", have: dict[str, bool] | None = None) -> str:
    """The local broker to start: ``preference`` itself, or for ``auto`` the first installed of
    mosquitto, iotcore, amqtt."""
    have = available() if have is None else have
    if preference != "auto":
        if preference not in BACKENDS:
            raise UserInputError(f"--local-broker {preference!r}: expected auto, {', '.join(LOCAL_BROKERS)}")
        return preference
    for kind in LOCAL_BROKERS:
        if have.get(kind):
            return kind
    raise EnvironmentFault("no local MQTT broker: install mosquitto (apt-get install mosquitto) or "
                           "pip install 'edgeopt[fleet]' (iotcore), or pass --broker URL")


def start_local_broker(listen: str = "127.0.0.1:1884", preference: str = "auto",
                       max_payload: int = MIB + HEADER_ROOM) -> LocalBroker:
    host, port = parse_listen(listen)
    broker = BACKENDS[choose(preference)](host, port, max_payload)
    broker.start()
    if broker.note:
        log.warning("%s", broker.note)
    if not _loopback(host):
        log.warning("the local %s broker listens on %s:%d without authentication or TLS: anyone who reaches it "
                    "can publish to the fleet's topics; for devices on other hosts use 'edgeopt fleet "
                    "broker-config' and --broker", broker.kind, host, broker.port)
    return broker


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
