"""The broker 'edgeopt fleet serve' starts when it is given none (fleet/broker.py), and broker URLs
that keep their password out of command lines, outputs and logs (edgeopt.mqtt)."""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgeopt.errors import EnvironmentFault, UserInputError
from edgeopt.fleet.broker import IotcoreBroker, available, choose, start_local_broker
from edgeopt.fleet.repository import Repository
from edgeopt.mqtt import BrokerURL, connect, make_client, redact_url

from repo_helpers import fake_artifact

EDGEOPT = str(Path(sys.executable).parent / "edgeopt")


def needs(kind: str) -> None:
    if not available()[kind]:
        pytest.skip(f"the {kind} broker is not installed here")


# -- which broker ----------------------------------------------------------------------------------
def test_auto_prefers_mosquitto_then_iotcore_then_amqtt():
    assert choose("auto", {"mosquitto": True, "iotcore": True, "amqtt": True}) == "mosquitto"
    assert choose("auto", {"mosquitto": False, "iotcore": True, "amqtt": True}) == "iotcore"
    assert choose("auto", {"mosquitto": False, "iotcore": False, "amqtt": True}) == "amqtt"
    assert choose("iotcore", {"mosquitto": True, "iotcore": True, "amqtt": True}) == "iotcore"
    with pytest.raises(EnvironmentFault, match="install mosquitto .* or pass --broker URL"):
        choose("auto", {"mosquitto": False, "iotcore": False, "amqtt": False})
    with pytest.raises(UserInputError, match="--local-broker 'hivemq'"):
        choose("hivemq")


def test_amqtt_is_started_only_with_a_warning_that_says_why(caplog):
    needs("amqtt")
    with caplog.at_level(logging.WARNING, logger="edgeopt.fleet"):
        broker = start_local_broker("127.0.0.1:0", "amqtt")
        broker.stop()
    assert "amqtt is the last-resort broker" in caplog.text and "drops clients" in caplog.text


def test_a_local_broker_beyond_loopback_is_started_with_a_warning(caplog):
    """The local broker has no authentication: listening on every interface is allowed, and said."""
    kind = next(k for k, have in available().items() if have)
    with caplog.at_level(logging.WARNING, logger="edgeopt.fleet"):
        start_local_broker("127.0.0.1:0", kind).stop()
        assert "without authentication" not in caplog.text
        start_local_broker("0.0.0.0:0", kind).stop()
    assert re.search(r"listens on 0\.0\.0\.0:\d+ without authentication or TLS", caplog.text)


def test_serve_without_a_broker_starts_the_system_mosquitto_and_stops_it(tmp_path):
    """The ready line and the final status say which broker runs; the broker's own output stays out
    of the service's; stopping the service stops the broker."""
    needs("mosquitto")
    Repository.init(tmp_path / "repo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    service = subprocess.Popen([EDGEOPT, "fleet", "serve", "--repo", tmp_path / "repo", "--listen", f"127.0.0.1:{port}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready = b""
        deadline = time.monotonic() + 30
        while b"fleet service ready" not in ready:
            assert time.monotonic() < deadline and service.poll() is None, "the service did not get ready"
            ready = service.stderr.readline()
        client = make_client("probe", f"mqtt://127.0.0.1:{port}")
        connect(client)
        client.disconnect()
        client.loop_stop()
    finally:
        service.send_signal(signal.SIGTERM)
        out, err = service.communicate(timeout=30)
    assert f"broker mqtt://127.0.0.1:{port} (mosquitto " in ready.decode(), ready
    assert "started by the service" in ready.decode()
    final = json.loads(err.decode().strip().splitlines()[-1])
    assert final["broker_kind"] == "mosquitto" and final["broker_version"]
    assert "mosquitto version" not in (out + err).decode()  # its log went to its private directory
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


@pytest.mark.parametrize("kind", ["mosquitto", "iotcore"])
def test_a_killed_service_takes_its_broker_with_it(tmp_path, kind):
    """SIGKILL leaves the service no time to stop its broker: the broker notices by itself, so a
    restarted service finds the port free."""
    needs(kind)
    Repository.init(tmp_path / "repo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    service = subprocess.Popen([EDGEOPT, "fleet", "serve", "--repo", tmp_path / "repo", "--listen", f"127.0.0.1:{port}",
                                "--local-broker", kind], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while b"fleet service ready" not in service.stderr.readline():
        assert time.monotonic() < deadline and service.poll() is None, "the service did not get ready"
    service.kill()
    service.wait(10)
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            break
        assert time.monotonic() < deadline + 10, f"the {kind} broker outlived its service"
        time.sleep(0.1)


def test_service_on_iotcore_moves_chunks_above_its_default_payload_limit(tmp_path):
    """rumqttd's default payload cap (20 KiB) is below the chunk size: the service raises it, so a
    rollout of a 600 KB artifact in 256 KiB chunks goes through."""
    needs("iotcore")
    from edgeopt.fleet.rollout import Phase, apply_command, new_rollout
    from edgeopt.fleet.rollout_spec import RolloutSpec, parse_waves
    from edgeopt.fleet.service import FleetService, ServiceConfig
    from edgeopt.fleet.simulator import SimConfig, Simulator
    from edgeopt.protocol import ModelRef

    repo = Repository.init(tmp_path / "repo")
    for v in ("1", "2"):
        repo.publish(fake_artifact(tmp_path / f"art{v}", "kws", v, 600_000, seed=int(v)), "kws", v)
    service = FleetService(ServiceConfig(repo=repo.root, db=f"sqlite:///{tmp_path / 'fleet.db'}", listen="127.0.0.1:0",
                                         local_broker="iotcore", chunk_size=256 * 1024, tick=0.2,
                                         flush_interval=0.1)).start()
    sim = None
    try:
        assert service.status()["broker_kind"] == "iotcore"
        sim = Simulator(SimConfig(broker=service.broker_url, devices=3, initial_model=ModelRef("kws", "1"),
                                  root=repo.metadata_dir / "1.root.json", chunk_size=256 * 1024)).start()
        store = service.store
        deadline = time.monotonic() + 60
        while store.count_devices() < 3:
            assert time.monotonic() < deadline, "the simulated devices did not register"
            time.sleep(0.1)
        spec = RolloutSpec(ModelRef("kws", "2"), {}, parse_waves("100%"), bake_s=0.2, device_timeout_s=60)
        status, assignments = new_rollout("r-iot", spec, [d.device_id for d in store.list_devices()], time.time())
        store.create_rollout(status, assignments)
        status, assignments = store.load_rollout("r-iot")
        store.save_decision(apply_command(status, assignments, "start", time.time()), status.revision)
        while store.load_rollout("r-iot")[0].state not in (Phase.COMPLETED, Phase.ABORTED):
            assert time.monotonic() < deadline, "the rollout on iotcore did not end"
            time.sleep(0.2)
        assert store.load_rollout("r-iot")[0].state is Phase.COMPLETED
        assert all(d.model == ModelRef("kws", "2") for d in sim.devices)
    finally:
        if sim is not None:
            sim.stop()
        service.stop()
    assert service.local_broker.proc is None  # stopped with the service


def test_iotcores_own_default_payload_limit_would_cut_a_chunk():
    """The control for the test above: at rumqttd's default cap a 64 KiB chunk does not get through."""
    needs("iotcore")
    broker = IotcoreBroker("127.0.0.1", 0, max_payload=20_480).start()
    try:
        got = []
        sub = make_client("sub", broker.url)
        sub.on_message = lambda c, u, m: got.append(len(m.payload))
        connect(sub)
        subscribed = threading.Event()
        sub.on_subscribe = lambda *a: subscribed.set()
        sub.subscribe("t", qos=1)
        assert subscribed.wait(5)
        pub = make_client("pub", broker.url)
        connect(pub)
        pub.publish("t", b"x" * 1000, qos=1).wait_for_publish(5)
        pub.publish("t", b"x" * 65536, qos=1)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # time for the big one, which must not come
        for c in (sub, pub):
            c.disconnect()
            c.loop_stop()
    finally:
        broker.stop()
    assert got == [1000]


# -- broker URLs without secrets -------------------------------------------------------------------
def test_password_file_in_the_url(tmp_path):
    pw = tmp_path / "service.password"
    pw.write_text("s3cret-token\n")
    url = BrokerURL.parse(f"mqtts://edgeopt-fleet@broker.example.com:8883?ca=/etc/ca.pem&password_file={pw}")
    assert (url.username, url.password, url.password_file, url.ca) == ("edgeopt-fleet", None, str(pw), "/etc/ca.pem")
    assert url.secret() == "s3cret-token"
    assert BrokerURL.parse("mqtt://u:inline%2Fpw@h").secret() == "inline/pw"
    missing = BrokerURL.parse(f"mqtt://u@h?password_file={tmp_path / 'nope'}")
    with pytest.raises(UserInputError, match=r"password_file .*nope: No such file"):
        missing.secret()
    for bad, needle in ((f"mqtt://u:pw@h?password_file={pw}", "inline or as password_file, not both"),
                        (f"mqtt://h?password_file={pw}", "needs a user name"),
                        ("mqtt://u:pw@h?passwd=x", "unknown parameter 'passwd'"),
                        ("mqtt://u:pw@h:99999", "bad port"),
                        ("http://u:pw@h", "expected mqtt://")):
        with pytest.raises(UserInputError, match=needle) as err:
            BrokerURL.parse(bad)
        assert ":pw@" not in str(err.value)  # the message shows the URL redacted


def test_redact_url():
    assert redact_url("mqtts://fleet:s3cret@broker:8883?ca=/x.pem") == "mqtts://fleet:***@broker:8883?ca=/x.pem"
    assert redact_url("mqtt://broker:1883") == "mqtt://broker:1883"
    assert redact_url("mqtt://u@broker?password_file=/p") == "mqtt://u@broker?password_file=/p"
    assert "s3cret" not in redact_url("mqtt://u:s3cret@[::1]:1883")
    assert "s3cret" not in redact_url("mqtt://u:s3cret@h:notaport")
