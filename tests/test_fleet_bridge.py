"""Devices spread over two Mosquitto brokers bridged to each other (``edgeopt fleet broker-bridge``,
``fleet.security.bridge_stanza``): the generated TLS bridge between two generated brokers carries a
site device's retained state to the fleet service on the central broker and its desired back; and a
rollout over devices on both brokers, the service on one, completes."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from edgeopt.fleet.rollout import Phase
from edgeopt.fleet.rollout_spec import parse_waves
from edgeopt.fleet.security import BRIDGE_LAYOUT, BROKER_TUNING, bridge_stanza
from edgeopt.fleet.simulator import SimConfig, Simulator
from edgeopt.mqtt import connect, make_client, subscribe
from edgeopt.protocol import ModelRef

from brokers import GeneratedMosquitto, Mosquitto, free_port, reachable_workdir, remove_workdir
from conftest import run_cli
from fleet_helpers import FleetRig

ENDED = (Phase.COMPLETED, Phase.ABORTED)
V2 = ModelRef("kws", "2")


@pytest.fixture
def workdir(tmp_path):
    d = reachable_workdir(tmp_path)
    yield d
    remove_workdir(tmp_path)


def test_broker_bridge_writes_the_account_the_ca_and_the_stanza(workdir):
    for name, port in (("central", 18883), ("site", 18884)):
        assert run_cli("fleet", "broker-config", workdir / name, "--host", "localhost", "--port", port).code == 0
    res = run_cli("fleet", "broker-bridge", workdir / "site", workdir / "central", "--address", "localhost:18883")
    assert res.code == 0, res.err
    site, central = workdir / "site", workdir / "central"
    bridge = (site / "conf.d" / "bridge.conf").read_text()
    assert "address localhost:18883" in bridge and "topic edgeopt/# both 1" in bridge
    assert f"bridge_cafile {(site / 'bridge-ca.pem').resolve()}" in bridge
    assert (site / "bridge-ca.pem").read_bytes() == (central / "ca.pem").read_bytes()
    assert f"include_dir {(site / 'conf.d').resolve()}" in (site / "mosquitto.conf").read_text()
    user = next(line.split()[1] for line in bridge.splitlines() if line.startswith("remote_username"))
    assert any(line.startswith(f"{user}:$7$") for line in (central / "passwd").read_text().splitlines())
    assert f"user {user}\ntopic readwrite edgeopt/#" in (central / "acl").read_text()
    for rel, mode in (("conf.d", BRIDGE_LAYOUT["conf.d"]), ("bridge-ca.pem", BRIDGE_LAYOUT["bridge-ca.pem"]),
                      ("conf.d/bridge.conf", BRIDGE_LAYOUT["bridge.conf"])):
        assert (site / rel).stat().st_mode & 0o777 == mode, rel
    again = run_cli("fleet", "broker-bridge", workdir / "site", workdir / "central", "--address", "localhost:18883")
    assert again.code == 2 and "bridged already" in again.err


def test_a_device_on_the_site_broker_reaches_the_service_on_the_central_one_over_the_tls_bridge(workdir):
    ports = {"central": free_port(), "site": free_port()}
    for name, port in ports.items():
        assert run_cli("fleet", "broker-config", workdir / name, "--host", "localhost", "--port", port,
                       "--bind", "127.0.0.1").code == 0
    assert run_cli("keys", "init", workdir / "repo").code == 0
    assert run_cli("fleet", "broker-bridge", workdir / "site", workdir / "central", "--address",
                   f"localhost:{ports['central']}").code == 0
    res = run_cli("fleet", "provision", "dev-site", "--broker-config", workdir / "site", "--repo", workdir / "repo",
                  "-o", workdir / "bundles", "--json")
    assert res.code == 0, res.err
    central = GeneratedMosquitto(workdir / "central", ports["central"]).start()
    site = GeneratedMosquitto(workdir / "site", ports["site"]).start()
    try:
        service = make_client("edgeopt-fleet", _service_url(workdir / "central"))
        connect(service)
        states, desired = [], []
        got_state, got_desired = threading.Event(), threading.Event()
        subscribe(service, "edgeopt/devices/+/state", 1, lambda c, u, m: (states.append(m.topic), got_state.set()))
        bundle = workdir / "bundles" / "dev-site"
        device = make_client("dev-site", f"mqtts://dev-site@localhost:{ports['site']}?ca={bundle / 'ca.pem'}"
                                         f"&password_file={bundle / 'mqtt.password'}")
        connect(device)
        subscribe(device, "edgeopt/devices/dev-site/desired", 1,
                  lambda c, u, m: (desired.append(json.loads(m.payload)), got_desired.set()))
        deadline = time.monotonic() + 20  # the bridge connects within its restart_timeout
        while not got_state.is_set() and time.monotonic() < deadline:
            device.publish("edgeopt/devices/dev-site/state", b'{"probe": 1}', qos=1, retain=True)
            got_state.wait(0.5)
        assert states == ["edgeopt/devices/dev-site/state"] * len(states) and states, site.log.read_text()[-2000:]
        service.publish("edgeopt/devices/dev-site/desired", json.dumps({"model": None}).encode(), qos=1, retain=True)
        assert got_desired.wait(10), site.log.read_text()[-2000:]
        for c in (device, service):
            c.disconnect()
            c.loop_stop()
    finally:
        site.stop()
        central.stop()


def _service_url(central: Path) -> str:
    import tomllib

    return tomllib.loads((central / "fleet.toml").read_text())["broker"]


def test_a_rollout_over_devices_on_two_bridged_brokers_completes(tmp_path):
    """The service and 30 devices on the central broker, 30 more on a site broker bridged to it
    (the generated stanza, without TLS here: the TLS bridge is the test above)."""
    central = Mosquitto(tmp_path / "central", extra_config=BROKER_TUNING).start()
    site = Mosquitto(tmp_path / "site", extra_config=BROKER_TUNING + bridge_stanza(
        "edgeopt-bridge-site", f"127.0.0.1:{central.port}")).start()
    rig = FleetRig(tmp_path, central, f"sqlite:///{tmp_path / 'fleet.db'}", 30)
    far = Simulator(SimConfig(broker=site.url, devices=30, id_prefix="far-", initial_model=ModelRef("kws", "1"),
                              root=rig.repo.metadata_dir / "1.root.json", workdir=tmp_path / "sim-far", workers=8,
                              request_timeout=2.0)).start()
    try:
        deadline = time.monotonic() + 60
        while rig.store.count_devices() < 60:
            assert time.monotonic() < deadline, f"{rig.store.count_devices()} of 60 devices registered"
            time.sleep(0.1)
        rig.create(waves=parse_waves("10%,50%,100%"), bake_s=0.3)
        status, after = rig.wait("r-1", lambda s, a: s.state in ENDED, 120, "the rollout to end")
        assert status.state is Phase.COMPLETED, status.reason
        assert {d for d in after if d.startswith("far-")} and len(after) == 60
        deadline = time.monotonic() + 30
        while not all(d.model == V2 for d in far.devices):
            assert time.monotonic() < deadline, "the site's devices did not all commit kws@2"
            time.sleep(0.1)
    finally:
        far.stop()
        rig.close()
        site.stop()
        central.stop()
