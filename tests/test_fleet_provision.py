"""Provisioning as written: the generated Mosquitto config run as generated (as root it drops to its
own user), devices provisioned while it runs, client ids bound to user names, and a provisioned
agent -- started with exactly its bundle's agent.toml -- joining the fleet over TLS and committing a
signed update. No password shows in a command line, an output or a log on the way."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgeopt.agent.config import load_config
from edgeopt.cli.fleet import open_store
from edgeopt.errors import RemoteError
from edgeopt.mqtt import connect, make_client

from agent_harness import AGENT
from brokers import GeneratedMosquitto, free_port, process_uid, reachable_workdir, remove_workdir
from conftest import run_cli

EDGEOPT = str(Path(sys.executable).parent / "edgeopt")


@pytest.fixture
def workdir(tmp_path):
    d = reachable_workdir(tmp_path)
    yield d
    remove_workdir(tmp_path)


def broker_config(workdir: Path, port: int) -> Path:
    res = run_cli("fleet", "broker-config", workdir / "broker", "--host", "localhost", "--port", port,
                  "--bind", "127.0.0.1")
    assert res.code == 0, res.err
    return workdir / "broker"


def provision(workdir: Path, device: str, *extra) -> dict:
    res = run_cli("fleet", "provision", device, "--broker-config", workdir / "broker", "--repo", workdir / "repo",
                  "-o", workdir / "bundles", "--json", *extra)
    assert res.code == 0, res.err
    return res.json()


def device_url(workdir: Path, device: str, port: int) -> str:
    bundle = workdir / "bundles" / device
    return f"mqtts://{device}@localhost:{port}?ca={bundle / 'ca.pem'}&password_file={bundle / 'mqtt.password'}"


def test_provisioned_config_is_complete_and_says_what_to_edit(tmp_path):
    """The agent accepts the provisioned agent.toml as it is, with updates on (a pinned root), TLS with
    the CA and the credentials file, a state dir, a sensor source and a results sink."""
    assert run_cli("keys", "init", tmp_path / "repo").code == 0
    broker_config(tmp_path, 8883)
    provision(tmp_path, "dev-7", "--install-dir", "/opt/edgeopt")
    text = (tmp_path / "bundles" / "dev-7" / "agent.toml").read_text()
    cfg = load_config(tmp_path / "bundles" / "dev-7" / "agent.toml")
    assert cfg.update.enabled and cfg.update.root == "/opt/edgeopt/metadata/root.json"
    assert str(cfg.state_dir) == "/var/lib/edgeopt-agent" and cfg.device_id == "dev-7"
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.tls, cfg.mqtt.username) == ("localhost", 8883, True, "dev-7")
    assert (cfg.mqtt.ca_file, cfg.mqtt.password_file) == ("/opt/edgeopt/ca.pem", "/opt/edgeopt/mqtt.password")
    assert [(s.type, s.path) for s in cfg.sources] == [("unix-stream", "/run/edgeopt-agent/sensor.sock")]
    assert [s.type for s in cfg.sinks] == ["mqtt"]
    assert text.count("# EDIT:") == 2  # the source and the sink say they are the user's to change


def test_provision_options_for_paths_labels_and_profile():
    from edgeopt.fleet.provision import agent_toml

    text = agent_toml("dev-8", "broker.example.com", 8884, "site-eu", install_dir="/srv/edgeopt",
                      state_dir="/srv/state", sensor_socket="/run/sensors/imu.sock", labels=("site=lab", "ring=a"),
                      profile="raspberry-pi-4")
    from edgeopt.agent.config import parse_config

    cfg = parse_config(__import__("tomllib").loads(text))
    assert (str(cfg.state_dir), cfg.sources[0].path, cfg.update.root) == (
        "/srv/state", "/run/sensors/imu.sock", "/srv/edgeopt/metadata/root.json")
    assert cfg.labels == {"site": "lab", "ring": "a"} and cfg.agent.profile == "raspberry-pi-4"
    assert cfg.topic("results") == "site-eu/devices/dev-8/results"
    trial = parse_config(__import__("tomllib").loads(agent_toml("dev-9", "localhost", 8883, "edgeopt",
                                                                source="synthetic")))
    assert [s.type for s in trial.sources] == ["synthetic"]  # to try the fleet before a sensor is wired


def test_mosquitto_started_as_root_reads_devices_provisioned_after_it_started(workdir):
    if os.geteuid() != 0:
        pytest.skip("needs root: Mosquitto drops privileges only when started as root")
    try:
        broker_user = pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("needs the 'mosquitto' user (apt-get install mosquitto creates it)")
    from edgeopt.fleet.security import LAYOUT

    run_cli("keys", "init", workdir / "repo")
    port = free_port()
    d = broker_config(workdir, port)
    broker = GeneratedMosquitto(d, port).start()
    try:
        assert process_uid(broker.proc.pid) == broker_user.pw_uid  # it dropped to its own user
        assert int(broker.pid_file.read_text()) == broker.proc.pid
        info = provision(workdir, "dev-late")
        for name, (mode, who) in LAYOUT.items():
            st = (d / name).stat()
            assert stat.S_IMODE(st.st_mode) == mode, name
            want_gid = broker_user.pw_gid if who in ("group", "broker") else 0
            want_uid = broker_user.pw_uid if who == "broker" else 0
            assert (st.st_uid, st.st_gid) == (want_uid, want_gid), (name, grp.getgrgid(st.st_gid).gr_name)
        late = make_client("dev-late", device_url(workdir, "dev-late", port))
        with pytest.raises(RemoteError):  # not yet: the broker has not re-read its password file
            connect(late, timeout=3)
        broker.reload(info["reload_command"])
        assert info["reload_command"] == f'kill -HUP "$(cat {broker.pid_file})"'
        assert broker.proc.poll() is None, broker.log.read_text()[-2000:]
        late = make_client("dev-late", device_url(workdir, "dev-late", port))
        connect(late, timeout=5)
        late.disconnect()
        late.loop_stop()
    finally:
        broker.stop()


def test_a_device_cannot_knock_another_off_with_its_client_id(workdir):
    run_cli("keys", "init", workdir / "repo")
    port = free_port()
    d = broker_config(workdir, port)
    provision(workdir, "dev-a")
    provision(workdir, "dev-b")
    broker = GeneratedMosquitto(d, port).start()
    try:
        b = make_client("dev-b", device_url(workdir, "dev-b", port))
        drops = []
        b.on_disconnect = lambda c, u, flags, reason, props: drops.append(str(reason))
        connect(b)
        for _ in range(4):  # dev-a's credentials, dev-b's client id
            a = make_client("dev-b", device_url(workdir, "dev-a", port))
            connect(a)
            time.sleep(0.3)
            a.disconnect()
            a.loop_stop()
        time.sleep(0.3)
        assert drops == [] and b.is_connected()
        b.disconnect()
        b.loop_stop()
    finally:
        broker.stop()


class SensorFeed:
    """Writes IMU-like samples ("ax,ay,az" lines) into the agent's sensor socket until stopped."""

    def __init__(self, path: Path):
        self.path, self.stop = path, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        rng = np.random.default_rng(0)
        while not self.stop.is_set():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(str(self.path))
                    while not self.stop.is_set():
                        rows = rng.normal(0, 1, (64, 3))
                        s.sendall("".join(f"{a:.4f},{b:.4f},{c:.4f}\n" for a, b, c in rows).encode())
                        time.sleep(0.05)
            except OSError:
                time.sleep(0.1)


def secrets_in(text: str, secrets: dict[str, str]) -> list[str]:
    return [name for name, value in secrets.items() if value in text]


@pytest.mark.slow
def test_provisioned_agent_joins_over_tls_and_commits_a_signed_update_without_showing_a_password(
        workdir, imu_model):
    """The documented sequence (docs/fleet.md): keys init, broker-config, Mosquitto, provision, reload,
    install the bundle, the fleet service from fleet.toml, the agent from the installed agent.toml,
    publish, rollout -- and the rollout completes with the agent on the new version."""
    assert run_cli("keys", "init", workdir / "repo").code == 0
    port = free_port()
    d = broker_config(workdir, port)
    broker = GeneratedMosquitto(d, port).start()
    device_root = workdir / "device"
    install_dir, state_dir, sensor = device_root / "etc", device_root / "state", device_root / "sensor.sock"
    info = provision(workdir, "pi-0001", "--install-dir", install_dir, "--state-dir", state_dir,
                     "--sensor-socket", sensor, "--label", "site=lab")
    broker.reload(info["reload_command"])
    shutil.copytree(workdir / "bundles" / "pi-0001", install_dir)      # "copy the bundle to the device"
    assert run_cli("fleet", "publish", imu_model["artifact"], "--repo", workdir / "repo").code == 0
    secrets = {"service password": (d / "service.password").read_text().strip(),
               "device password": (install_dir / "mqtt.password").read_text().strip()}
    service = subprocess.Popen([EDGEOPT, "fleet", "--config", d / "fleet.toml", "serve", "--repo", workdir / "repo",
                                "--tick", "0.2", "--log-level", "debug"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    agent = subprocess.Popen([AGENT, "--config", install_dir / "agent.toml"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    feed = SensorFeed(sensor)
    try:
        command_lines = {p.pid: Path(f"/proc/{p.pid}/cmdline").read_bytes().decode() for p in (service, agent)}
        deadline = time.monotonic() + 60
        while True:
            res = run_cli("fleet", "devices", "--repo", workdir / "repo", "--json")
            devices = res.json() if res.code == 0 and res.out.strip() else []
            if any(dev["device_id"] == "pi-0001" and dev["online"] for dev in devices):
                break
            assert service.poll() is None and agent.poll() is None, "the service or the agent exited"
            assert time.monotonic() < deadline, f"pi-0001 did not reach the fleet: {devices}"
            time.sleep(0.3)
        assert devices[0]["labels"] == {"site": "lab"}
        res = run_cli("fleet", "rollout", "create", "--repo", workdir / "repo", "--model", "imu-cnn@3",
                      "--selector", "site=lab", "--waves", "100%", "--bake", "1s", "--device-timeout", "120s",
                      "--id", "first", "--start")
        assert res.code == 0, res.err
        watch = subprocess.run([EDGEOPT, "fleet", "rollout", "status", "first", "--repo", workdir / "repo", "--watch"],
                               capture_output=True, text=True, timeout=180)
        assert watch.returncode == 0, watch.stdout[-3000:] + watch.stderr[-2000:]
        res = run_cli("fleet", "devices", "--repo", workdir / "repo", "--json")
        device = res.json()[0]
        assert device["model"] == {"name": "imu-cnn", "version": "3"} and device["update"]["state"] == "COMMITTED"
    finally:
        feed.stop.set()
        for proc in (agent, service):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        outputs = {}
        for name, proc in (("agent", agent), ("service", service)):
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            outputs[name] = out.decode() + err.decode()
        broker.stop()
    assert "fleet service ready: broker mqtts://edgeopt-fleet@localhost" in outputs["service"], outputs["service"]
    assert "updates off" not in outputs["agent"], outputs["agent"][-2000:]
    for where, text in [*(("command line", c) for c in command_lines.values()), *outputs.items(),
                        ("broker log", broker.log.read_text()), ("agent status", (state_dir / "status.json").read_text())]:
        assert secrets_in(text, secrets) == [], f"a password shows in the {where}"


def test_ready_line_and_status_never_show_an_inline_password(workdir):
    """An operator who still puts the password in the URL (here through $EDGEOPT_BROKER, so that it is
    not in the command line either) does not see it echoed in the ready line, the log or the status."""
    assert run_cli("keys", "init", workdir / "repo").code == 0
    port = free_port()
    d = broker_config(workdir, port)
    broker = GeneratedMosquitto(d, port).start()
    password = (d / "service.password").read_text().strip()
    url = f"mqtts://edgeopt-fleet:{password}@localhost:{port}?ca={d / 'ca.pem'}"
    service = subprocess.Popen([EDGEOPT, "fleet", "serve", "--repo", workdir / "repo", "--log-level", "debug"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "EDGEOPT_BROKER": url})
    try:
        deadline = time.monotonic() + 30
        line = b""
        while b"fleet service ready" not in line:
            assert time.monotonic() < deadline and service.poll() is None, "the service did not get ready"
            line = service.stderr.readline()
        store = open_store(None, workdir / "repo")
        while not store.service_status():  # the first heartbeat
            assert time.monotonic() < deadline, "no heartbeat from the service"
            time.sleep(0.2)
        status = json.dumps(store.service_status())
    finally:
        service.send_signal(signal.SIGTERM)
        out, err = service.communicate(timeout=30)
        broker.stop()
    assert "edgeopt-fleet:***@localhost" in line.decode() and "edgeopt-fleet:***@localhost" in status
    assert password not in line.decode() + out.decode() + err.decode() + status


def test_who_the_broker_runs_as(monkeypatch):
    """Root: the broker's user (default mosquitto) must exist. Anyone else: the broker can only be
    that user (Mosquitto switches users only when started as root)."""
    from edgeopt.errors import UserInputError
    from edgeopt.fleet.security import Owners

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(UserInputError, match="--broker-user no-such-user: no such user"):
        Owners.resolve("no-such-user")
    root_owned = Owners.resolve("root")
    assert root_owned.broker == (0, 0) and root_owned.ids("group") == (0, 0)
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    monkeypatch.setattr(os, "getegid", lambda: 4343)
    monkeypatch.setattr("getpass.getuser", lambda: "alice")
    alone = Owners.resolve(None)
    assert alone.broker_user == "alice" and alone.ids("broker") == alone.ids("group") == (4242, 4343)
    with pytest.raises(UserInputError, match="only root can give the broker's files to another user"):
        Owners.resolve("mosquitto")


def test_a_directory_the_broker_cannot_enter_is_named():
    import tempfile

    from edgeopt.fleet.security import blocked_ancestor

    base = Path(tempfile.mkdtemp(prefix="edgeopt-blocked-", dir="/tmp"))  # /tmp: everyone may enter
    try:
        inner = base / "a" / "b"
        inner.mkdir(parents=True)
        for d in (base, base / "a", inner):
            d.chmod(0o755)
        outsider = 54321
        assert blocked_ancestor(inner, outsider, {outsider}) is None
        (base / "a").chmod(0o750)
        assert blocked_ancestor(inner, outsider, {outsider}) == base / "a"
        assert blocked_ancestor(inner, outsider, {(base / "a").stat().st_gid}) is None  # its group may
        assert blocked_ancestor(inner, 0, set()) is None  # root enters everything
    finally:
        shutil.rmtree(base)
