"""Signed updates over MQTT: the device fetches TUF metadata and artifacts through the repository
server, resumes downloads, and refuses every attack (python-tuf's checks, end to end). Each check runs
over an in-process bus (tests/memory_bus.py: the trust logic alone, in milliseconds) and over a real
Mosquitto; what needs a broker (one dying mid-transfer, garbage from another client, `fleet serve`)
runs over Mosquitto only."""

from __future__ import annotations

import json
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from web_servers import FleetRepoWeb, Nginx

from edgeopt.artifact import unpack_artifact
from edgeopt.fleet.repository import Repository, _write
from edgeopt.repo_client import UpdateRefused
from edgeopt.signing import load_signer

from brokers import Mosquitto
from memory_bus import MemoryBus
from repo_helpers import RepoPair, fake_artifact


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def repo(tmp_path):
    return Repository.init(tmp_path / "repo", root_keys=3, root_threshold=2)


@pytest.fixture(params=["memory", "mosquitto", "http", "nginx"])
def pair(request, tmp_path, repo):
    """The device and the repository server over an in-process bus (milliseconds: the trust checks
    themselves), over a real Mosquitto (the integration), and over HTTP with range requests from the
    fleet service's static files (fleet serve --http-repo) and from nginx (edgeopt.repo_http)."""
    if request.param in ("http", "nginx"):
        web = FleetRepoWeb(repo.root) if request.param == "http" else Nginx(repo.root, tmp_path / "nginx")
        p = RepoPair(tmp_path, None, repo, repo_url=web.url)
        yield p
        web.stop()
    elif request.param == "memory":
        bus = MemoryBus()
        p = RepoPair(tmp_path, None, repo, bus=bus)
        yield p
        bus.close()
    else:
        p = RepoPair(tmp_path, request.getfixturevalue("broker"), repo)
        yield p
        p.close()


@pytest.fixture
def mqtt_pair(tmp_path, broker, repo):
    p = RepoPair(tmp_path, broker, repo)
    yield p
    p.close()


def _publish(repo, tmp_path, version="1", size=4096, name="kws"):
    return repo.publish(fake_artifact(tmp_path / f"art-{name}-{version}", name, version, size, seed=int(version)),
                        name, version)


def test_happy_path_download_and_unpack(pair, repo, tmp_path):
    _publish(repo, tmp_path, "1", size=200_000)
    pair.trust.refresh()
    target = pair.trust.lookup("kws", "1")
    assert target.custom["format"] == "onnx" and target.length > 200_000
    path = pair.trust.download(target)
    art = unpack_artifact(path, tmp_path / "slot")
    assert art.manifest["version"] == "1"
    assert pair.fetcher.stats["bytes_network"] >= target.length
    assert not list((pair.device_dir / "partial").glob("*.part"))  # cleaned after verification


def test_revoked_or_unpublished_version_is_not_allowed(pair, repo, tmp_path):
    _publish(repo, tmp_path, "1")
    _publish(repo, tmp_path, "2")
    repo.revoke("kws", "2")
    pair.trust.refresh()
    pair.trust.lookup("kws", "1")
    for version in ("2", "3"):
        with pytest.raises(UpdateRefused) as exc:
            pair.trust.lookup("kws", version)
        assert exc.value.reason == "not_allowed"


def test_target_name_with_path_traversal_is_refused(pair, repo, tmp_path):
    pair.trust.refresh()
    with pytest.raises(UpdateRefused) as exc:
        pair.trust.lookup("../../keys/root-1", "1")
    assert exc.value.reason == "bad_name"


def test_tampered_artifact_bytes_are_refused(pair, repo, tmp_path):
    entry = _publish(repo, tmp_path, "1", size=100_000)
    stored = repo.targets_dir / f"{entry['sha256']}.kws-1.tar"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    pair.trust.refresh()
    with pytest.raises(UpdateRefused) as exc:
        pair.trust.download(pair.trust.lookup("kws", "1"))
    assert exc.value.reason == "hash_mismatch"
    assert not list((pair.device_dir / "partial").glob("*.part"))  # poisoned bytes are not kept


def test_oversized_artifact_is_cut_at_its_signed_length(pair, repo, tmp_path):
    entry = _publish(repo, tmp_path, "1", size=50_000)
    stored = repo.targets_dir / f"{entry['sha256']}.kws-1.tar"
    stored.write_bytes(stored.read_bytes() + b"\0" * 5_000_000)  # an endless-looking download
    pair.trust.refresh()
    with pytest.raises(UpdateRefused) as exc:
        pair.trust.download(pair.trust.lookup("kws", "1"))
    assert exc.value.reason == "oversized"
    assert pair.fetcher.stats["bytes_network"] < entry["length"] + 2 * 64 * 1024


def _resign(repo, name, signer_files=None, signers=None, mutate=None):
    md = repo._load(name)
    if mutate:
        mutate(md.signed)
    md.signatures.clear()
    for s in signers or [load_signer(f) for f in signer_files]:
        md.sign(s, append=True)
    _write(repo.metadata_dir / name, md)


def test_metadata_signed_by_a_wrong_key_is_refused(pair, repo, tmp_path):
    from securesystemslib.signer import CryptoSigner

    _publish(repo, tmp_path, "1")
    ts = repo._load("timestamp.json").signed
    _resign(repo, f"{ts.snapshot_meta.version}.snapshot.json", signers=[CryptoSigner.generate_ed25519()])
    with pytest.raises(UpdateRefused) as exc:
        pair.trust.refresh()
    assert exc.value.reason == "bad_signature"


def test_root_below_threshold_is_refused(pair, repo):
    new_root = repo.root_metadata()
    new_root.signed.version = 2
    new_root.signatures.clear()
    new_root.sign(load_signer(repo.keys_dir / "root-1.pem"))  # 1 of the required 2
    _write(repo.metadata_dir / "2.root.json", new_root)
    with pytest.raises(UpdateRefused) as exc:
        pair.trust.refresh()
    assert exc.value.reason == "bad_signature"


def test_root_rotation_is_followed(pair, repo, tmp_path):
    pair.trust.refresh()
    repo.rotate_root(new_root_keys=2, threshold=2, rotate_online=("timestamp",))
    _publish(repo, tmp_path, "1")
    pair.trust.refresh()
    pair.trust.lookup("kws", "1")
    trusted = json.loads((pair.device_dir / "metadata" / "root.json").read_text())
    assert trusted["signed"]["version"] == 2


def test_expired_timestamp_is_refused(pair, repo):
    _resign(repo, "timestamp.json", [repo.keys_dir / "timestamp.pem"],
            mutate=lambda s: setattr(s, "expires", datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)))
    with pytest.raises(UpdateRefused) as exc:
        pair.trust.refresh()
    assert exc.value.reason == "expired"


def test_replayed_older_metadata_is_refused(pair, repo, tmp_path):
    _publish(repo, tmp_path, "1")
    old_timestamp = (repo.metadata_dir / "timestamp.json").read_bytes()
    _publish(repo, tmp_path, "2")
    pair.trust.refresh()  # the device now trusts timestamp v3
    (repo.metadata_dir / "timestamp.json").write_bytes(old_timestamp)  # a freeze/replay attacker
    with pytest.raises(UpdateRefused) as exc:
        pair.trust.refresh()
    assert exc.value.reason == "rollback"


def test_replayed_older_targets_is_refused(pair, repo, tmp_path):
    _publish(repo, tmp_path, "1")
    pair.trust.refresh()  # trusts targets v2
    # the attacker serves a snapshot that points at the older targets v1, freshly (validly) signed
    _publish(repo, tmp_path, "2")
    ts = repo._load("timestamp.json").signed
    _resign(repo, f"{ts.snapshot_meta.version}.snapshot.json", [repo.keys_dir / "snapshot.pem"],
            mutate=lambda s: setattr(s.meta["targets.json"], "version", 1))
    with pytest.raises(UpdateRefused) as exc:
        pair.trust.refresh()
    assert exc.value.reason in ("rollback", "repository_invalid")


def test_mix_and_match_of_snapshot_and_targets_is_refused(pair, repo, tmp_path):
    _publish(repo, tmp_path, "1")
    _publish(repo, tmp_path, "2")
    ts = repo._load("timestamp.json").signed
    snap = repo._load(f"{ts.snapshot_meta.version}.snapshot.json").signed
    v = snap.meta["targets.json"].version
    # serve the previous targets metadata under the name the snapshot asks for
    shutil.copy(repo.metadata_dir / f"{v - 1}.targets.json", repo.metadata_dir / f"{v}.targets.json")
    with pytest.raises(UpdateRefused) as exc:
        pair.trust.refresh()
    assert exc.value.reason in ("rollback", "repository_invalid")


def test_malformed_messages_on_every_topic_are_counted_not_fatal(mqtt_pair, repo, tmp_path, broker):
    pair = mqtt_pair
    from edgeopt.mqtt import connect, make_client

    _publish(repo, tmp_path, "1", size=150_000)
    attacker = make_client("attacker", broker.url)
    connect(attacker)
    garbage = [b"", b"{", b"[1,2]", json.dumps({"id": "x", "path": "metadata/../keys/root-1.pem", "offset": 0,
                                                  "length": 10}).encode(), b"\xff" * 300_000,
               json.dumps({"id": "x", "path": "metadata/timestamp.json", "offset": -1, "length": 10}).encode()]
    for payload in garbage:
        attacker.publish("edgeopt/repo/req/dev-1", payload, qos=1).wait_for_publish(5)
        attacker.publish("edgeopt/repo/resp/dev-1", payload, qos=1).wait_for_publish(5)
    deadline = time.monotonic() + 5
    while pair.server.snapshot_stats().get("rejected", 0) < len(garbage) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pair.server.snapshot_stats()["rejected"] == len(garbage)
    pair.trust.refresh()  # both sides still work
    pair.trust.download(pair.trust.lookup("kws", "1"))
    assert pair.link.dropped >= len(garbage)
    attacker.loop_stop()
    attacker.disconnect()


class _ShiftedOffsets:
    """A link whose chunks come back at the wrong offset (a broken or malicious server)."""

    def __init__(self, link):
        self.link = link

    def request(self, path, offset, length, timeout):
        resp = self.link.request(path, offset, length, timeout)
        if resp is not None and path.startswith("targets/") and offset > 0:
            from dataclasses import replace
            return replace(resp, offset=offset + 1)
        return resp


def test_chunk_with_a_wrong_offset_is_refused(pair, repo, tmp_path):
    _publish(repo, tmp_path, "1", size=200_000)
    pair.trust.refresh()
    target = pair.trust.lookup("kws", "1")
    pair.fetcher.link = _ShiftedOffsets(pair.link)
    with pytest.raises(Exception, match="offset"):
        pair.trust.download(target)


def test_download_resumes_after_the_broker_dies_mid_transfer(tmp_path, broker, repo):
    entry = _publish(repo, tmp_path, "1", size=5 * 2**20)
    pair = RepoPair(tmp_path, broker, repo, timeout=1.0, retries=30)
    try:
        pair.trust.refresh()
        target = pair.trust.lookup("kws", "1")
        before = pair.fetcher.stats["bytes_network"]  # metadata so far
        killed = threading.Event()

        def killer():
            while pair.fetcher.stats["bytes_network"] < before + 2 * 2**20:
                time.sleep(0.005)
            broker.kill()
            killed.set()
            time.sleep(1.5)
            broker.start()

        t = threading.Thread(target=killer)
        t.start()
        pair.trust.download(target)
        t.join()
        assert killed.is_set()
        assert pair.fetcher.stats["retries"] > 0  # it really lost the broker
        # every byte crossed the wire once (plus at most one chunk lost with the dying broker)
        assert entry["length"] <= pair.fetcher.stats["bytes_network"] - before <= entry["length"] + 64 * 1024
    finally:
        pair.close()


class _DiesAfter:
    """A link that raises as a killed agent would once the download reaches ``at`` bytes."""

    def __init__(self, link, at: int = 2**20):
        self.link, self.at = link, at

    def request(self, path, offset, length, timeout):
        if offset >= self.at:
            raise KeyboardInterrupt("killed")
        return self.link.request(path, offset, length, timeout)


def test_download_resumes_from_disk_after_an_agent_restart(tmp_path, broker, repo):
    entry = _publish(repo, tmp_path, "1", size=3 * 2**20)
    first = RepoPair(tmp_path, broker, repo, timeout=0.5, retries=1)
    first.trust.refresh()
    target = first.trust.lookup("kws", "1")

    first.fetcher.link = _DiesAfter(first.link)  # the agent is killed after 1 MiB
    with pytest.raises(KeyboardInterrupt):
        first.trust.download(target)
    first.close()
    part = next((tmp_path / "dev-1" / "partial").glob("*.part"))
    assert part.stat().st_size == 2**20
    second = RepoPair(tmp_path, broker, repo)  # same device directory: a restarted agent
    try:
        second.trust.refresh()
        target = second.trust.lookup("kws", "1")
        before = second.fetcher.stats["bytes_network"]  # metadata so far
        path = second.trust.download(target)
        assert path.stat().st_size == entry["length"]
        assert second.fetcher.stats["bytes_resumed"] == 2**20
        assert second.fetcher.stats["bytes_network"] - before == entry["length"] - 2**20
    finally:
        second.close()


def test_fleet_serve_subprocess_serves_devices_and_stops_on_sigterm(tmp_path, broker, repo):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    _publish(repo, tmp_path, "1", size=100_000)
    exe = Path(sys.executable).parent / "edgeopt"
    proc = subprocess.Popen([str(exe), "fleet", "serve", "--repo", str(repo.root), "--broker", broker.url,
                             "--timestamp-refresh", "0.5"], stderr=subprocess.PIPE, text=True)
    pair = RepoPair(tmp_path, broker, repo, serve=False, timeout=2.0, retries=10)
    try:
        pair.trust.refresh()
        pair.trust.download(pair.trust.lookup("kws", "1"))
        time.sleep(1.2)
        assert repo.current()[0].signed.version > 2  # the service re-signed the timestamp
        pair.trust.refresh()  # and devices accept the re-signed one
    finally:
        pair.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert '"requests"' in err


@pytest.mark.parametrize("server", ["http", "nginx"])
def test_an_http_download_resumes_from_disk_by_range_after_an_agent_restart(tmp_path, repo, server):
    entry = _publish(repo, tmp_path, "1", size=3 * 2**20)
    web = FleetRepoWeb(repo.root) if server == "http" else Nginx(repo.root, tmp_path / "nginx")
    try:
        first = RepoPair(tmp_path, None, repo, repo_url=web.url, chunk_size=256 * 1024)
        first.trust.refresh()
        target = first.trust.lookup("kws", "1")

        first.fetcher.link = _DiesAfter(first.link)  # the agent is killed after 1 MiB
        with pytest.raises(KeyboardInterrupt):
            first.trust.download(target)
        part = next((tmp_path / "dev-1" / "partial").glob("*.part"))
        assert part.stat().st_size == 2**20
        second = RepoPair(tmp_path, None, repo, repo_url=web.url, chunk_size=256 * 1024)  # a restarted agent
        second.trust.refresh()
        before = second.fetcher.stats["bytes_network"]  # metadata so far
        path = second.trust.download(second.trust.lookup("kws", "1"))
        assert path.stat().st_size == entry["length"]
        assert second.fetcher.stats["bytes_resumed"] == 2**20
        assert second.fetcher.stats["bytes_network"] - before == entry["length"] - 2**20  # by range, the rest only
        assert not second.link.ignores_ranges.is_set()
    finally:
        web.stop()


def test_a_web_server_that_ignores_ranges_still_serves_a_verified_download(tmp_path, repo):
    """Python's http.server answers every GET with the whole file (200): each chunk is cut out of it."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    _publish(repo, tmp_path, "1", size=300_000)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(repo.root))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        pair = RepoPair(tmp_path, None, repo, repo_url=f"http://127.0.0.1:{server.server_address[1]}/")
        pair.trust.refresh()
        path = pair.trust.download(pair.trust.lookup("kws", "1"))
        assert unpack_artifact(path, tmp_path / "slot").manifest["version"] == "1"
        assert pair.link.ignores_ranges.is_set()
    finally:
        server.shutdown()


def test_an_http_repository_that_is_down_is_retried_and_one_that_answers_garbage_is_refused(tmp_path, repo):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from web_servers import free_port

    from edgeopt.errors import RemoteError

    pair = RepoPair(tmp_path, None, repo, repo_url=f"http://127.0.0.1:{free_port()}/", timeout=0.2, retries=1)
    with pytest.raises(RemoteError, match="repository unreachable"):  # the updater tries again later
        pair.trust.refresh()
    assert pair.fetcher.stats["retries"] == 2

    class Garbage(BaseHTTPRequestHandler):  # a captive portal: 200 and a page, whatever is asked
        def do_GET(self):
            body = b"<html>please log in</html>" * 100
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        pair = RepoPair(tmp_path, None, repo, repo_url=f"http://127.0.0.1:{server.server_address[1]}/")
        with pytest.raises(UpdateRefused) as exc:
            pair.trust.refresh()
        assert exc.value.reason in ("repository_invalid", "bad_signature"), exc.value.reason
    finally:
        server.shutdown()


def test_an_https_repository_is_trusted_through_the_given_ca_only(tmp_path, repo):
    from web_servers import self_signed

    from edgeopt.errors import RemoteError
    from edgeopt.fleet.repo_web import RepoWeb
    from edgeopt.repo_http import HttpRepoLink

    _publish(repo, tmp_path, "1", size=100_000)
    cert, key = self_signed(tmp_path)
    web = RepoWeb(repo.root, "127.0.0.1:0", cert, key).start()
    try:
        assert web.url.startswith("https://")
        pair = RepoPair(tmp_path, None, repo, repo_url=web.url, timeout=0.5, retries=0)
        with pytest.raises(RemoteError, match="repository unreachable.*CERTIFICATE_VERIFY_FAILED"):
            pair.trust.refresh()  # the system's CAs do not know it: the message says so
        pair.fetcher.link = HttpRepoLink(web.url, ca_file=str(cert))
        pair.trust.refresh()
        path = pair.trust.download(pair.trust.lookup("kws", "1"))
        assert unpack_artifact(path, tmp_path / "slot").manifest["version"] == "1"
    finally:
        web.stop()
