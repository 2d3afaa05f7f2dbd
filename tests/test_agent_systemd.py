"""systemd integration with real processes: the unit passes `systemd-analyze verify`, the agent
speaks sd_notify (READY=1, then WATCHDOG=1 from its loop), SIGTERM flushes the partial batch and
exits 0, SIGHUP reloads the configuration (and keeps the old one when the new one is broken)."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time

import pytest

from edgeopt.agent.config import load_config
from edgeopt.agent.statedir import StateDir

from agent_harness import AgentProcess, base_config, results_from_jsonl
from brokers import Mosquitto, Subscriber
from conftest import run_cli

WINDOW, HOP = 64, 32


@pytest.fixture
def state(tmp_path, imu_model):
    StateDir(tmp_path / "state").install(imu_model["artifact"])
    return tmp_path / "state"


class NotifySocket:
    """The test plays systemd: an AF_UNIX datagram socket that records what the agent sends."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def collect(self, until, timeout: float = 20.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not until(self.messages):
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.sock.recv(4096).decode())
        return self.messages


def feed_lines(path, rows: int, offset: int = 0) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for _ in range(100):
        try:
            conn.connect(str(path))
            break
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.05)
    lines = "".join(f"{0.01 * i:.3f},{-0.01 * i:.3f},1.0\n" for i in range(offset, offset + rows))
    conn.sendall(lines.encode())
    return conn


def test_install_service_writes_a_unit_that_systemd_analyze_verifies(tmp_path):
    res = run_cli("agent", "install-service", "--unit-dir", tmp_path, "--config", tmp_path / "agent.toml",
                  "--device-id", "pi-7")
    assert res.code == 0, res.err
    unit = (tmp_path / "edgeopt-agent.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StateDirectory=edgeopt-agent",
                 "DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes",
                 "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in unit, line
    assert f"--config {tmp_path / 'agent.toml'}" in unit
    config = load_config(tmp_path / "agent.toml")  # the default config is valid
    assert config.device_id == "pi-7" and config.sources[0].type == "unix-stream"
    assert run_cli("agent", "install-service", "--unit-dir", tmp_path, "--config", tmp_path / "agent.toml").code == 2
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not found: apt-get install systemd (or run `make setup` as root)")
    proc = subprocess.run([analyze, "verify", str(tmp_path / "edgeopt-agent.service")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "edgeopt-agent.service" not in proc.stderr, proc.stderr  # no warning about our unit


def test_notify_ready_then_watchdog_and_sigterm_flushes_the_partial_batch(tmp_path, state):
    notify = NotifySocket(tmp_path / "notify.sock")
    sensor = tmp_path / "sensor.sock"
    with Mosquitto(tmp_path) as broker:
        sub = Subscriber(broker, "edgeopt/devices/dev1/results")
        cfg = base_config(tmp_path, mqtt={"host": broker.host, "port": broker.port},
                          batching={"max_batch": 32, "max_wait_ms": 600000},  # the batch never fills by itself
                          source=[{"type": "unix-stream", "name": "s", "path": str(sensor)}],
                          sink=[{"type": "jsonl", "path": str(tmp_path / "out.jsonl")}, {"type": "mqtt"}])
        agent = AgentProcess(tmp_path, cfg, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"})
        notify.collect(lambda m: sum("WATCHDOG=1" in x for x in m) >= 3)
        ready = [i for i, m in enumerate(notify.messages) if "READY=1" in m]
        pings = [i for i, m in enumerate(notify.messages) if m == "WATCHDOG=1"]
        assert len(ready) == 1 and "STATUS=running" in notify.messages[ready[0]], notify.messages
        assert ready[0] < pings[0] and len(pings) >= 3
        conn = feed_lines(sensor, WINDOW + 4 * HOP)  # exactly 5 windows
        agent.wait_status(lambda s: s["telemetry"]["queue_depth"] == 5, what="5 queued windows")
        assert agent.status()["telemetry"]["windows_out"] == 0
        agent.signal(signal.SIGTERM)
        assert agent.communicate(timeout=5) == 0, agent.err
        conn.close()
        sub.wait_for(lambda: sum(len(m["results"]) for m in sub.payloads("/results")) >= 5, what="published batch")
        sub.close()
    assert [r["id"] for r in results_from_jsonl(tmp_path / "out.jsonl")] == [f"s:{i}" for i in range(5)]
    assert [r["id"] for m in sub.payloads("/results") for r in m["results"]] == [f"s:{i}" for i in range(5)]
    notify.collect(lambda m: any("STOPPING=1" in x for x in m), timeout=1)
    assert any("STOPPING=1" in m for m in notify.messages)
    final = agent.status()
    assert final["state"]["status"] == "stopped" and final["telemetry"]["windows_out"] == 5
    assert final["telemetry"]["batch_size_histogram"] == {"5": 1}


def test_sighup_reloads_the_config_and_keeps_the_old_one_when_it_is_broken(tmp_path, state):
    sensor = tmp_path / "sensor.sock"
    cfg = base_config(tmp_path, batching={"max_batch": 1},
                      source=[{"type": "unix-stream", "name": "s", "path": str(sensor)},
                              {"type": "synthetic", "name": "live", "rate_hz": 500.0}],  # busy all along
                      sink=[{"type": "jsonl", "path": str(tmp_path / "first.jsonl")}])
    agent = AgentProcess(tmp_path, cfg)

    def windows(source):
        return lambda s: s["telemetry"]["sources"].get(source, {}).get("windows", 0)

    agent.wait_status(lambda s: s["state"]["status"] == "running", what="running")
    conn = feed_lines(sensor, WINDOW)
    agent.wait_status(lambda s: windows("s")(s) == 1, what="one window")
    good = agent.config_path.read_text()
    agent.config_path.write_text(good.replace("max_batch", "max_bach"))
    agent.signal(signal.SIGHUP)
    st = agent.wait_status(lambda s: s["state"]["config_error"], what="config error")
    assert "unknown key 'max_bach'" in st["state"]["config_error"] and "did you mean 'max_batch'" in st["state"]["config_error"]
    live_before = windows("live")(st)
    conn.sendall(b"".join(b"0.5,0.5,1.0\n" for _ in range(HOP)))
    st = agent.wait_status(lambda s: windows("s")(s) == 2 and windows("live")(s) >= live_before + 5,
                           what="both sources still running the old config")
    assert st["telemetry"]["sources"]["live"]["status"] == "running"
    conn.close()
    agent.config_path.write_text(good.replace("first.jsonl", "second.jsonl"))
    agent.signal(signal.SIGHUP)
    agent.wait_status(lambda s: s["state"]["config_error"] is None and s["state"]["status"] == "running"
                      and "s" in s["telemetry"]["sources"], what="reloaded")
    conn = feed_lines(sensor, WINDOW)
    agent.wait_status(lambda s: windows("s")(s) == 1, what="a window after the reload (new pipeline)")
    conn.close()
    assert agent.stop() == 0, agent.err
    first = [r["id"] for r in results_from_jsonl(tmp_path / "first.jsonl") if r["source"] == "s"]
    second = [r["id"] for r in results_from_jsonl(tmp_path / "second.jsonl") if r["source"] == "s"]
    assert first == ["s:0", "s:1"] and second == ["s:0"]


def test_a_provisioned_bundle_runs_under_the_units_throw_away_user(tmp_path):
    """The unit's DynamicUser cannot read the bundle's root-only mqtt.password, nor a root-only config:
    install-service hands the password file over as a systemd credential (LoadCredential=), the agent
    reads it from $CREDENTIALS_DIRECTORY, and the config it writes is world-readable (no secret in it)."""
    from edgeopt.agent.transport import password_path

    config = tmp_path / "agent.toml"
    config.write_text('[agent]\ndevice_id = "pi-7"\n\n[mqtt]\nhost = "broker"\nusername = "pi-7"\n'
                      f'password_file = "{tmp_path / "mqtt.password"}"\n')
    res = run_cli("agent", "install-service", "--unit-dir", tmp_path, "--config", config)
    assert res.code == 0, res.err
    unit = (tmp_path / "edgeopt-agent.service").read_text()
    assert f"LoadCredential=mqtt.password:{tmp_path / 'mqtt.password'}" in unit
    creds = tmp_path / "credentials"
    creds.mkdir()
    assert password_path(str(tmp_path / "mqtt.password"), {}) == tmp_path / "mqtt.password"
    assert password_path(str(tmp_path / "mqtt.password"), {"CREDENTIALS_DIRECTORY": str(creds)}) == \
        tmp_path / "mqtt.password"  # no such credential: the file itself
    (creds / "mqtt.password").write_text("s3cret\n")
    assert password_path(str(tmp_path / "mqtt.password"), {"CREDENTIALS_DIRECTORY": str(creds)}) == \
        creds / "mqtt.password"

    plain = tmp_path / "plain"
    plain.mkdir()
    res = run_cli("agent", "install-service", "--unit-dir", plain, "--config", plain / "agent.toml")
    assert res.code == 0, res.err
    assert "LoadCredential" not in (plain / "edgeopt-agent.service").read_text()  # no password: none to load
    assert (plain / "agent.toml").stat().st_mode & 0o044 == 0o044  # readable by the unit's user
