"""`edgeopt fleet` from the command line: devices, rollout create/start/pause/resume/abort/status,
config files, and bad input as one-line errors. Also the fleet service on its embedded broker."""

from __future__ import annotations

import time

import pytest

from edgeopt.fleet.db import open_database
from edgeopt.fleet.registry import Registry
from edgeopt.fleet.repository import Repository
from edgeopt.fleet.store import FleetStore
from edgeopt.protocol import ModelRef, UpdateStatus, state_message

from conftest import run_cli
from repo_helpers import fake_artifact


@pytest.fixture
def fleet(tmp_path):
    """A repository with kws@1 and kws@2 and a registry that knows 6 devices (no broker needed)."""
    repo = Repository.init(tmp_path / "repo")
    for v in ("1", "2"):
        repo.publish(fake_artifact(tmp_path / f"art{v}", "kws", v, 2000, seed=int(v)), "kws", v)
    _, conn = open_database(f"sqlite:///{repo.root.resolve() / 'fleet.db'}")
    registry = Registry(FleetStore(conn))
    for i in range(6):
        labels = {"site": "lab" if i < 4 else "field", "ring": "canary" if i == 0 else "main"}
        registry.on_message(f"edgeopt/devices/dev-{i}/state", state_message(
            f"dev-{i}", labels=labels, model=ModelRef("kws", "1"), update=UpdateStatus("IDLE"), profile="raspberry-pi-4"))
    registry.flush()
    conn.close()
    return repo.root


def one_line_error(res, *needles):
    assert res.code == 2, (res.code, res.out, res.err)
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeopt: error: "), res.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_devices_table_json_and_selector(fleet):
    res = run_cli("fleet", "devices", "--repo", fleet)
    assert res.code == 0 and "6 device(s)" in res.out and "dev-5" in res.out and "kws@1" in res.out
    res = run_cli("fleet", "devices", "--repo", fleet, "--selector", "site=lab", "--selector", "ring=main", "--json")
    devices = res.json()
    assert [d["device_id"] for d in devices] == ["dev-1", "dev-2", "dev-3"]
    assert devices[0]["model"] == {"name": "kws", "version": "1"} and devices[0]["update"]["state"] == "IDLE"
    assert devices[0]["labels"] == {"site": "lab", "ring": "main"} and devices[0]["online"] is True
    res = run_cli("fleet", "devices", "--repo", fleet, "--selector", "site=mars")
    assert res.code == 0 and "no device matches site=mars (6 device(s) known)" in res.err


def test_rollout_lifecycle_from_the_command_line(fleet):
    res = run_cli("fleet", "rollout", "create", "--model", "kws@2", "--repo", fleet, "--selector", "site=lab",
                  "--waves", "25%,100%", "--bake", "30s", "--id", "r-cli", "--json")
    assert res.code == 0, res.err
    assert res.json() == {"rollout_id": "r-cli", "devices": 4, "waves": [1, 3], "started": False}
    status = run_cli("fleet", "rollout", "status", "r-cli", "--repo", fleet, "--json").json()
    assert status["state"] == "CREATED" and status["selector"] == "site=lab" and status["spec"]["bake_s"] == 30
    assert [w["size"] for w in status["waves"]] == [1, 3]
    one_line_error(run_cli("fleet", "rollout", "pause", "r-cli", "--repo", fleet), "is CREATED; only a RUNNING")
    for cmd, state in (("start", "RUNNING"), ("pause", "PAUSED"), ("resume", "RUNNING")):
        res = run_cli("fleet", "rollout", cmd, "r-cli", "--repo", fleet)
        assert res.code == 0 and f"rollout r-cli: {state}" in res.out, res.err
    one_line_error(run_cli("fleet", "rollout", "create", "--model", "kws@2", "--repo", fleet, "--selector",
                           "site=lab"), "device dev-0 is already in rollout r-cli (RUNNING)")
    res = run_cli("fleet", "rollout", "abort", "r-cli", "--repo", fleet, "--reason", "wrong model")
    assert res.code == 0 and "ABORTED" in res.out
    info = run_cli("fleet", "rollout", "status", "r-cli", "--repo", fleet, "--json", "--events").json()
    assert info["state"] == "ABORTED" and info["reason"] == "aborted by the operator: wrong model"
    assert [e["kind"] for e in info["events"]] == ["created", "started", "paused", "resumed", "aborted"]
    res = run_cli("fleet", "rollout", "status", "r-cli", "--repo", fleet)
    assert res.code == 0 and "ABORTED" in res.out and "aborted by the operator" in res.out
    res = run_cli("fleet", "rollout", "status", "--repo", fleet)
    assert res.code == 0 and "r-cli" in res.out and "1 rollout(s)" in res.out
    one_line_error(run_cli("fleet", "rollout", "resume", "r-cli", "--repo", fleet), "is ABORTED")
    one_line_error(run_cli("fleet", "rollout", "start", "r-nope", "--repo", fleet), "no rollout 'r-nope'", "r-cli")


@pytest.mark.parametrize("args,needles", [
    (["--selector", "site=nowhere"], ["selector site=nowhere matches no device", "6 device(s) known"]),
    (["--waves", "1%,10%,50%"], ["--waves '1%,10%,50%'", "sum to 100%"]),
    (["--waves", "10%,x"], ["neither a percentage"]),
    (["--waves", "2,20,100%", "--selector", "site=field"], ["wave 2 (20) asks for 20 devices but the selector matches 2"]),
    (["--model", "kws@9"], ["kws@9 is not in the repository", "kws@1, kws@2"]),
    (["--model", "kws"], ["--model", "NAME@VERSION"]),
    (["--bake", "soon"], ["--bake 'soon'"]),
    (["--success-threshold", "120%"], ["--success-threshold"]),
    (["--failure-threshold", "lots"], ["--failure-threshold"]),
    (["--max-error-rate", "3"], ["--max-error-rate 3.0: must be in [0.0, 1.0]"]),
    (["--id", "bad id"], ["--id 'bad id'"]),
    (["--db", "postgresql://fleet:s3cret@127.0.0.1:1/fleet"], ["database postgresql://fleet:***@127.0.0.1:1/fleet "
                                                               "cannot be reached"]),
    (["--db", "mysql://x/y"], ["expected sqlite:///PATH"]),
])
def test_bad_rollout_input_is_one_line(fleet, args, needles):
    base = {"--model": "kws@2"}
    flags = [a for i, a in enumerate(args) if i % 2 == 0]
    cmd = ["fleet", "rollout", "create", "--repo", fleet, *args]
    for flag, value in base.items():
        if flag not in flags:
            cmd += [flag, value]
    res = run_cli(*cmd)
    one_line_error(res, *needles)
    assert "s3cret" not in res.err


def test_unreachable_database_for_every_command(tmp_path, fleet):
    url = "postgresql://nobody@127.0.0.1:1/fleet"
    for args in (["devices"], ["rollout", "status"], ["rollout", "abort", "r-1"],
                 ["serve", "--repo", fleet, "--broker", "mqtt://127.0.0.1:1"]):
        res = run_cli("fleet", *args, "--db", url)
        one_line_error(res, "cannot be reached")
    one_line_error(run_cli("fleet", "devices"), "no fleet database")
    one_line_error(run_cli("fleet", "devices", "--repo", tmp_path / "nope"), "does not exist")


def test_config_file_supplies_defaults(fleet, tmp_path):
    cfg = tmp_path / "fleet.toml"
    cfg.write_text(f'repo = "{fleet}"\n[devices]\nselector = ["ring=canary"]\n')
    res = run_cli("fleet", "--config", cfg, "devices", "--json")
    assert res.code == 0 and [d["device_id"] for d in res.json()] == ["dev-0"]
    res = run_cli("fleet", "--config", cfg, "devices", "--json", "--selector", "site=field")  # flags win
    assert [d["device_id"] for d in res.json()] == ["dev-4", "dev-5"]
    cfg.write_text(f'repo = "{fleet}"\n[rollout.create]\nwaves = "50%,100%"\nbake = "1s"\n')
    res = run_cli("fleet", "--config", cfg, "rollout", "create", "--model", "kws@2", "--json")
    assert res.code == 0 and res.json()["waves"] == [3, 3]
    for text, needle in (('colour = "blue"\n', "unknown key 'colour'"), ("[serve]\nspeed = 3\n", "unknown key 'speed'"),
                         ("[nonsense]\na = 1\n", "unknown table [nonsense]"), ("repo = \n", "not valid TOML")):
        cfg.write_text(text)
        one_line_error(run_cli("fleet", "--config", cfg, "devices"), "--config", needle)


def test_service_on_the_embedded_broker_rolls_out_to_simulated_devices(tmp_path):
    """No broker URL: the service starts the embedded (pure-Python) broker; simulated devices connect
    to it, register, and take a rollout to the end."""
    from edgeopt.fleet.rollout import Phase, apply_command, new_rollout
    from edgeopt.fleet.rollout_spec import RolloutSpec, parse_waves
    from edgeopt.fleet.service import FleetService, ServiceConfig
    from edgeopt.fleet.simulator import SimConfig, Simulator

    repo = Repository.init(tmp_path / "repo")
    for v in ("1", "2"):
        repo.publish(fake_artifact(tmp_path / f"art{v}", "kws", v, 100_000, seed=int(v)), "kws", v)
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    service = FleetService(ServiceConfig(repo=repo.root, db=db, broker=None, listen="127.0.0.1:0", tick=0.2,
                                         flush_interval=0.1)).start()
    sim = None
    try:
        assert service.local_broker is not None and service.broker_url.startswith("mqtt://127.0.0.1:")
        sim = Simulator(SimConfig(broker=service.broker_url, devices=5, initial_model=ModelRef("kws", "1"),
                                  root=repo.metadata_dir / "1.root.json", verify="full")).start()
        store = service.store
        deadline = time.monotonic() + 30
        while store.count_devices() < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        spec = RolloutSpec(ModelRef("kws", "2"), {}, parse_waves("20%,100%"), bake_s=0.2, device_timeout_s=30)
        status, assignments = new_rollout("r-emb", spec, [d.device_id for d in store.list_devices()], time.time())
        store.create_rollout(status, assignments)
        status, assignments = store.load_rollout("r-emb")
        store.save_decision(apply_command(status, assignments, "start", time.time()), status.revision)
        while store.load_rollout("r-emb")[0].state not in (Phase.COMPLETED, Phase.ABORTED):
            assert time.monotonic() < deadline + 30, "rollout on the embedded broker did not end"
            time.sleep(0.2)
        assert store.load_rollout("r-emb")[0].state is Phase.COMPLETED
        assert all(d.model == ModelRef("kws", "2") for d in sim.devices)
        # verify="full": each device ran its own python-tuf client against its pinned root
        assert all((sim.workdir / d.device_id / "metadata" / "timestamp.json").is_file() for d in sim.devices)
    finally:
        if sim is not None:
            sim.stop()
        service.stop()


def test_embedded_broker_port_in_use_is_one_line(tmp_path, fleet):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = run_cli("fleet", "serve", "--repo", fleet, "--listen", f"127.0.0.1:{port}")
    one_line_error(res, f"cannot listen on 127.0.0.1:{port}", "--broker URL")


@pytest.mark.parametrize("args, needles", [
    (["--http", "0.0.0.0:8080"], ["--http 0.0.0.0:8080: other machines could reach", "--http-token-file"]),
    (["--http", "dashboard"], ["--http 'dashboard': expected HOST:PORT"]),
    (["--http-cert", "CERT"], ["--http-cert needs --http"]),
    (["--http", "127.0.0.1:0", "--http-cert", "CERT"], ["--http-cert and --http-key go together"]),
    (["--http", "0.0.0.0:0", "--http-token-file", "SHORT"], ["--http-token-file", "at least 16"]),
    (["--http-repo", "repo-files"], ["--http-repo 'repo-files': expected HOST:PORT"]),
    (["--http-repo", "127.0.0.1:0", "--http-token-file", "SHORT"], ["--http-token-file needs --http"]),
])
def test_dashboard_flags_are_checked_before_anything_starts(fleet, tmp_path, args, needles):
    (tmp_path / "cert.pem").write_text("not read before the checks")
    (tmp_path / "short").write_text("abc\n")
    args = [{"CERT": str(tmp_path / "cert.pem"), "SHORT": str(tmp_path / "short")}.get(a, a) for a in args]
    one_line_error(run_cli("fleet", "serve", "--repo", fleet, "--broker", "mqtt://127.0.0.1:1", *args), *needles)


def test_fleet_serve_with_http_serves_the_dashboard_and_the_repository_files_until_sigterm(fleet, tmp_path):
    import json
    import re
    import signal
    import subprocess
    import sys
    import urllib.error
    import urllib.request
    from pathlib import Path

    pytest.importorskip("uvicorn", reason="the dashboard needs the fleet extra (pip install 'edgeopt[fleet]')")
    from fleet_helpers import tuned_mosquitto

    broker = tuned_mosquitto(tmp_path / "broker")
    token = tmp_path / "token"
    token.write_text("a-token-of-24-characters\n")
    log = tmp_path / "serve.log"
    exe = Path(sys.executable).parent / "edgeopt"
    with open(log, "wb") as err:
        proc = subprocess.Popen([str(exe), "fleet", "serve", "--repo", str(fleet), "--broker", broker.url,
                                 "--http", "127.0.0.1:0", "--http-token-file", str(token),
                                 "--http-repo", "127.0.0.1:0"], stderr=err)
    try:
        deadline = time.monotonic() + 60
        while not (m := re.search(r"dashboard (http://127\.0\.0\.1:\d+/), repository files (http://127\.0\.0\.1:\d+/)",
                                  log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        files = m.group(2)  # the repository's files, by range, without a token; never its keys
        ask = urllib.request.Request(files + "metadata/1.root.json", headers={"Range": "bytes=0-9"})
        with urllib.request.urlopen(ask, timeout=10) as r:
            assert r.status == 206 and r.read() == (fleet / "metadata" / "1.root.json").read_bytes()[:10]
        for secret in ("keys/timestamp.pem", "metadata/../keys/timestamp.pem", "fleet.db"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(files + secret, timeout=10)
            assert refused.value.code == 404, secret
        with urllib.request.urlopen(m.group(1) + "api/summary", timeout=10) as r:
            summary = json.loads(r.read())
        assert summary["devices"] == 6 and summary["service"]["dashboard"] == m.group(1)
        with urllib.request.urlopen(m.group(1), timeout=10) as r:
            assert b"edgeopt fleet" in r.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        broker.stop()
    assert "Traceback" not in log.read_text()
