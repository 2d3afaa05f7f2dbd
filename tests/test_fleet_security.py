"""The generated Mosquitto configuration, run by a real Mosquitto: TLS only, a password per device, and
an ACL that keeps each device to its own topics. Provisioning writes what a device needs."""

from __future__ import annotations

import os
import stat
import threading
import time
import tomllib

import pytest

from edgeopt.errors import RemoteError, UserInputError
from edgeopt.fleet.repository import Repository
from edgeopt.fleet.security import SERVICE_USER, BrokerSecurity, password_line
from edgeopt.mqtt import connect, make_client

from brokers import GeneratedMosquitto, free_port, reachable_workdir, remove_workdir
from conftest import run_cli

QUIET = 1.0  # how long a message that the ACL drops is given to (not) arrive
CAST = f"edgeopt/repo/cast/{'0' * 64}"  # an artifact chunk's cast topic


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """broker-config + provision dev-a and dev-b (through the CLI), and Mosquitto running that config
    as generated (as root here when the tests run as root: it drops to its own user)."""
    base = tmp_path_factory.mktemp("secured")
    tmp = reachable_workdir(base)
    repo = Repository.init(tmp / "repo")
    port = free_port()
    res = run_cli("fleet", "broker-config", tmp / "broker", "--port", port, "--bind", "127.0.0.1", "--host", "localhost")
    assert res.code == 0, res.err
    for device in ("dev-a", "dev-b"):
        res = run_cli("fleet", "provision", device, "--broker-config", tmp / "broker", "--repo", tmp / "repo",
                      "-o", tmp / "devices", "--json")
        assert res.code == 0, res.err
    broker = GeneratedMosquitto(tmp / "broker", port).start()
    yield {"tmp": tmp, "port": port, "repo": repo, "broker": broker, "security": BrokerSecurity(tmp / "broker")}
    broker.stop()
    remove_workdir(base)


def device_url(secured, device: str, password: str | None = None) -> str:
    bundle = secured["tmp"] / "devices" / device
    pw = (bundle / "mqtt.password").read_text().strip() if password is None else password
    ca = secured["tmp"] / "broker" / "ca.pem"
    return f"mqtts://{device}:{pw}@localhost:{secured['port']}?ca={ca}"


class Client:
    """A connected paho client that records what it receives."""

    def __init__(self, client_id: str, url: str):
        self.got: list[tuple[str, bytes]] = []
        self.subacks: list = []
        self.lock = threading.Lock()
        self.client = make_client(client_id, url)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.subacks.append([int(x.value) for x in codes])
        connect(self.client)

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.got.append((msg.topic, bytes(msg.payload)))

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def topics(self) -> set[str]:
        with self.lock:
            return {t for t, _ in self.got}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_for(predicate, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_device_a_reads_only_its_own_desired_and_repository_responses(secured):
    fleet = Client("fleet", secured["security"].service_url())
    a = Client("dev-a", device_url(secured, "dev-a"))
    try:
        for topic in ("edgeopt/devices/dev-b/desired", "edgeopt/devices/+/desired", "edgeopt/repo/resp/dev-b",
                      "edgeopt/repo/resp/+", "edgeopt/#", "edgeopt/devices/dev-a/desired", "edgeopt/repo/resp/dev-a",
                      f"{CAST}/0"):
            a.subscribe(topic)
        time.sleep(0.3)
        fleet.publish("edgeopt/devices/dev-b/desired", b'{"name":"kws","version":"9","rollout":null}', retain=True)
        fleet.publish("edgeopt/repo/resp/dev-b", b"chunk for b")
        fleet.publish("edgeopt/devices/dev-a/desired", b'{"name":"kws","version":"2","rollout":null}', retain=True)
        fleet.publish("edgeopt/repo/resp/dev-a", b"chunk for a")
        fleet.publish(f"{CAST}/0", b"a chunk cast to every device")  # (fleet/repo_server.py)
        mine = {"edgeopt/devices/dev-a/desired", "edgeopt/repo/resp/dev-a", f"{CAST}/0"}
        assert wait_for(lambda: mine <= a.topics())
        time.sleep(QUIET)
        assert a.topics() == mine, a.got
        # a retained message for B is not handed to A on a new subscription either
        late = Client("dev-a-late", device_url(secured, "dev-a"))
        late.subscribe("edgeopt/devices/dev-b/desired")
        time.sleep(QUIET)
        assert late.got == []
        late.close()
    finally:
        fleet.close()
        a.close()


def test_device_a_writes_only_its_own_state_telemetry_results_and_requests(secured):
    fleet = Client("fleet-2", secured["security"].service_url())
    a = Client("dev-a", device_url(secured, "dev-a"))
    try:
        fleet.subscribe("edgeopt/#")
        time.sleep(0.3)
        for kind in ("state", "telemetry", "results"):
            a.publish(f"edgeopt/devices/dev-b/{kind}", b"spoofed")
        a.publish("edgeopt/repo/req/dev-b", b"spoofed request")
        a.publish(f"{CAST}/0", b"a poisoned chunk for every device", retain=True)
        a.publish(f"edgeopt/repo/castidx/{'0' * 64}", b"a forged cast index", retain=True)
        a.publish("edgeopt/devices/dev-a/desired", b"desired by itself")   # not its to write
        a.publish("edgeopt/devices/dev-b/desired", b"desired for b")
        own = {f"edgeopt/devices/dev-a/{k}" for k in ("state", "telemetry", "results")} | {"edgeopt/repo/req/dev-a"}
        for topic in sorted(own):
            a.publish(topic, b"own")
        assert wait_for(lambda: own <= fleet.topics())
        time.sleep(QUIET)
        with fleet.lock:
            from_a = {t for t, payload in fleet.got if not payload.startswith(b"{")}  # not the retained desired
        assert from_a == own, fleet.got
    finally:
        fleet.close()
        a.close()


def test_no_connection_without_the_right_password_or_over_plaintext(secured):
    port = secured["port"]
    ca = secured["tmp"] / "broker" / "ca.pem"
    for url in (f"mqtts://localhost:{port}?ca={ca}",                      # anonymous
                device_url(secured, "dev-a", password="wrong"),             # wrong password
                device_url(secured, "dev-c", password="whatever"),          # never provisioned
                f"mqtt://dev-a:{(secured['tmp'] / 'devices' / 'dev-a' / 'mqtt.password').read_text().strip()}"
                f"@127.0.0.1:{port}"):                                        # right password, no TLS
        client = make_client("intruder", url)
        with pytest.raises(RemoteError):
            connect(client, timeout=3)
        client.loop_stop()
    other_ca = secured["tmp"] / "other-ca.pem"
    from cryptography.hazmat.primitives import serialization

    from edgeopt.fleet.security import make_ca

    other_ca.write_bytes(make_ca("someone else")[1].public_bytes(serialization.Encoding.PEM))
    pw = (secured["tmp"] / "devices" / "dev-a" / "mqtt.password").read_text().strip()
    with pytest.raises((RemoteError, OSError)):  # the broker's certificate does not chain to this CA
        connect(make_client("dev-a", f"mqtts://dev-a:{pw}@localhost:{port}?ca={other_ca}"), timeout=3)


def test_provisioned_bundle(secured):
    bundle = secured["tmp"] / "devices" / "dev-a"
    config = tomllib.loads((bundle / "agent.toml").read_text())
    assert config["agent"]["device_id"] == "dev-a"
    assert config["mqtt"] == {"host": "localhost", "port": secured["port"], "prefix": "edgeopt", "client_id": "dev-a",
                              "username": "dev-a", "password_file": "/etc/edgeopt/mqtt.password", "tls": True,
                              "ca_file": "/etc/edgeopt/ca.pem"}
    repo = secured["repo"]
    assert (bundle / "metadata" / "root.json").read_bytes() == (repo.metadata_dir / "1.root.json").read_bytes()
    assert stat.S_IMODE(os.stat(bundle / "mqtt.password").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(secured["tmp"] / "broker" / "passwd").st_mode) == 0o640  # the broker's group reads it
    assert stat.S_IMODE(os.stat(secured["tmp"] / "broker" / "ca.key").st_mode) == 0o600
    assert secured["security"].users() == [SERVICE_USER, "dev-a", "dev-b"]
    res = run_cli("fleet", "provision", "dev-a", "--broker-config", secured["tmp"] / "broker", "--repo", repo.root,
                  "-o", secured["tmp"] / "devices")
    assert res.code == 2 and "already exists; pass --force" in res.err


def test_password_file_format_matches_mosquitto_passwd():
    import base64
    import shutil
    import subprocess

    line = password_line("dev1", "secret", salt=base64.b64decode("dNYqR581KfU5jNVJ"))
    # the line mosquitto_passwd 2.0 wrote for this salt and password
    assert line == ("dev1:$7$101$dNYqR581KfU5jNVJ$hlNYpeZe4begRbCskG7hHrrg8d4sQIiu8V9zRxGrenrkzLVSqDYruU0jU6E5KHUob4"
                    "04AffwUZTu0MhuhbbyQQ==")
    if shutil.which("mosquitto_passwd"):
        subprocess.run(["mosquitto_passwd", "-U", "/dev/null"], capture_output=True)  # the tool exists and runs


def test_bad_device_ids_and_existing_config_are_refused(tmp_path, secured):
    with pytest.raises(UserInputError, match="already holds a broker configuration"):
        BrokerSecurity.init(secured["tmp"] / "broker", ["localhost"])
    for bad in ("a/b", "+", "#", SERVICE_USER, "x" * 70, ""):
        with pytest.raises(UserInputError, match="device id"):
            secured["security"].add_device(bad)
    with pytest.raises(UserInputError, match="no broker configuration"):
        BrokerSecurity(tmp_path)


def test_clients_turn_nagle_off_and_name_a_missing_tls_file(secured, tmp_path):
    import socket

    fleet = Client("fleet-nodelay", secured["security"].service_url())
    try:
        assert fleet.client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        fleet.close()
    with pytest.raises(UserInputError, match="ca file .*missing-ca.pem does not exist"):
        make_client("x", f"mqtts://localhost:{secured['port']}?ca={tmp_path / 'missing-ca.pem'}")
