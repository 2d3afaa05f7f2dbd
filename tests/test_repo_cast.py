"""Artifact chunks cast over MQTT (fleet/repo_server.py, edgeopt.repo_client.MqttRepoLink), over a real
Mosquitto: many devices downloading one artifact cost the repository server each chunk about once; a
poisoned chunk on the broker costs a download from the server, never an install; casts leave the
broker when their time is up, whoever cast them; a server that does not cast still serves."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from edgeopt.fleet.repo_server import RepoServer
from edgeopt.fleet.repository import Repository
from edgeopt.mqtt import PahoTopics, connect, make_client
from edgeopt.protocol import CAST_CHUNK, CAST_ID, cast_grid, cast_index_topic, cast_topic
from edgeopt.repo_frames import ChunkResponse

from brokers import Mosquitto
from repo_helpers import RepoPair, fake_artifact

SIZE = 1 << 20  # 16 chunks


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def repo(tmp_path):
    repo = Repository.init(tmp_path / "repo")
    repo.publish(fake_artifact(tmp_path / "art", "kws", "2", SIZE, seed=2), "kws", "2")
    return repo


class Probe:
    """A client that records what the broker holds or sends under the cast topics."""

    def __init__(self, broker, name="probe"):
        self.got: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.client = make_client(f"{name}-{time.monotonic_ns()}", broker.url)
        self.client.on_message = self._on_message
        connect(self.client)

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.got[msg.topic] = bytes(msg.payload)

    def retained(self, topic_filter="edgeopt/repo/#", settle=0.5) -> dict[str, bytes]:
        """What a new subscriber is handed (retained messages), by topic."""
        self.got.clear()
        self.client.subscribe(topic_filter, qos=1)
        time.sleep(settle)
        self.client.unsubscribe(topic_filter)
        time.sleep(0.1)
        with self.lock:
            return {t: p for t, p in self.got.items() if p}

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def _devices(tmp_path, broker, repo, n, serve=True, **server):
    first = RepoPair(tmp_path, broker, repo, device_id="dev-0", serve=False)
    if serve:
        first.server = RepoServer(repo, first._topics("repo-server"), **server)
        first.server.start()
    return [first] + [RepoPair(tmp_path, broker, repo, device_id=f"dev-{i}", serve=False) for i in range(1, n)]


def _download_all(pairs) -> list[bytes]:
    out: list[bytes | BaseException] = [b""] * len(pairs)

    def one(i, p):
        try:
            p.trust.refresh()
            out[i] = Path(p.trust.download(p.trust.lookup("kws", "2"))).read_bytes()
        except BaseException as exc:  # reported below, with the device
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(pairs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, r in enumerate(out):
        assert isinstance(r, bytes), f"dev-{i}: {r!r}"
    return out  # type: ignore[return-value]


def _assert_cleared(server, probe) -> None:
    """``server`` clears the one file it cast, and the broker then holds nothing under the prefix."""
    assert server.clear_all() == 1
    time.sleep(0.3)
    assert probe.retained() == {}


def _close(pairs):
    for p in pairs:
        p.close()


def test_twelve_devices_cost_the_server_each_chunk_about_once_not_twelve_times(tmp_path, broker, repo):
    devices = 12
    pairs = _devices(tmp_path, broker, repo, devices)
    try:
        got = _download_all(pairs)
        signed = pairs[0].trust.lookup("kws", "2")
        assert {len(b) for b in got} == {signed.length}
        assert all(p.link.cast_chunks == SIZE // CAST_CHUNK + 1 for p in pairs[:1])  # the tar is a little over 1 MiB
        stats = pairs[0].server.snapshot_stats()
        # every device's chunks came by cast; what the server sent for the artifact is a small multiple
        # of one artifact (a chunk goes out again at most once a second), not twelve artifacts
        assert sum(p.link.cast_chunks for p in pairs) == devices * (signed.length // CAST_CHUNK + 1)
        assert stats["bytes_sent"] < 3 * signed.length, stats
        assert stats["payload_bytes"] < 0.25 * devices * signed.length, stats
    finally:
        _close(pairs)


def test_a_device_that_comes_later_takes_every_chunk_from_the_broker_without_asking(tmp_path, broker, repo):
    pairs = _devices(tmp_path, broker, repo, 3)
    try:
        for p in pairs:  # one after the other: the first has everything cast
            _download_all([p])
        chunks = pairs[0].trust.lookup("kws", "2").length // CAST_CHUNK + 1
        assert [p.link.cast_chunks for p in pairs] == [chunks] * 3
        stats = pairs[0].server.snapshot_stats()
        # the first device asked for chunk 0 (cast with the next 15) and chunk 16; the others asked nothing
        assert stats["cast_requests"] < chunks, stats
        assert stats["casts"] == chunks, stats
    finally:
        _close(pairs)


def test_devices_with_other_chunk_sizes_meet_on_their_own_grids_and_all_are_cleared(tmp_path, broker, repo):
    """A device asking 256 KiB and one asking 100,000 bytes (cast on the 64 KiB grid below it, taken
    in 64 KiB pieces); the server casts on both grids, and clearing removes both."""
    pairs = _devices(tmp_path, broker, repo, 2, max_chunk=1 << 20)
    probe = Probe(broker)
    try:
        for p, chunk in zip(pairs, (1 << 18, 100_000), strict=True):
            p.link.grid, p.fetcher.chunk_size = cast_grid(chunk), chunk
        got = _download_all(pairs)
        assert got[0] == got[1]
        length = pairs[0].trust.lookup("kws", "2").length
        assert [p.link.cast_chunks for p in pairs] == [-(-length // (1 << 18)), -(-length // CAST_CHUNK)]
        sha = pairs[0].trust.lookup("kws", "2").sha256
        held = probe.retained()
        assert json.loads(held[cast_index_topic("edgeopt", sha)])["grids"] == [CAST_CHUNK, 1 << 18]
        assert cast_topic("edgeopt", sha, 1 << 18, 1 << 18) in held and cast_topic("edgeopt", sha, CAST_CHUNK, CAST_CHUNK) in held
        _assert_cleared(pairs[0].server, probe)
    finally:
        probe.close()
        _close(pairs)


def test_without_casting_the_same_downloads_cost_the_server_every_byte(tmp_path, broker, repo):
    """The control of the test above: a server that does not cast answers each device alone (and a
    casting device still gets its chunks from it: an older server)."""
    pairs = _devices(tmp_path, broker, repo, 4, cast=False)
    try:
        _download_all(pairs)
        signed = pairs[0].trust.lookup("kws", "2")
        assert all(p.link.cast_chunks == 0 for p in pairs)
        assert all(p.link.distrust_cast(f"targets/{signed.sha256}.kws-2.tar") is False for p in pairs)
        assert pairs[0].server.snapshot_stats()["bytes_sent"] >= 4 * signed.length
    finally:
        _close(pairs)


def test_a_poisoned_chunk_on_the_broker_costs_a_download_from_the_server_not_an_install(tmp_path, broker, repo):
    (pair,) = _devices(tmp_path, broker, repo, 1)
    probe = Probe(broker)
    try:
        pair.trust.refresh()
        signed = pair.trust.lookup("kws", "2")
        sha = signed.sha256
        # someone who may publish on the broker (no ACL) leaves a well-formed chunk of wrong bytes
        bad = ChunkResponse(CAST_ID, f"targets/{sha}.kws-2.tar", 0, signed.length, b"\0" * CAST_CHUNK).encode()
        probe.client.publish(cast_topic("edgeopt", sha, CAST_CHUNK, 0), bad, qos=1, retain=True).wait_for_publish(5)
        data = Path(pair.trust.download(signed)).read_bytes()
        assert len(data) == signed.length
        assert pair.fetcher.stats["cast_refused"] == 1
        assert pair.link.distrust_cast(f"targets/{sha}.kws-2.tar")  # it had come by cast, and is off now
    finally:
        probe.close()
        pair.close()


def test_casts_leave_the_broker_when_their_time_is_up_even_after_the_caster_died(tmp_path, broker, repo):
    pairs = _devices(tmp_path, broker, repo, 2, keep_s=60.0)
    probe = Probe(broker)
    try:
        _download_all(pairs)
        sha = pairs[0].trust.lookup("kws", "2").sha256
        held = probe.retained()
        assert cast_index_topic("edgeopt", sha) in held
        assert cast_topic("edgeopt", sha, CAST_CHUNK, 0) in held and len(held) == 1 + 17, sorted(held)
        # the caster "crashed" (never cleared); a new server learns the cast from the broker
        later = RepoServer(repo, PahoTopics(pairs[1].clients[0]))
        later.start()
        time.sleep(0.5)
        assert later.sweep(time.time()) == 0  # not yet due: it stays for the devices still downloading
        assert probe.retained() != {}
        assert later.sweep(time.time() + 61) == 1
        time.sleep(0.3)
        assert probe.retained() == {}
    finally:
        probe.close()
        _close(pairs)


def test_a_service_alone_clears_its_casts_when_it_stops(tmp_path, broker, repo):
    pairs = _devices(tmp_path, broker, repo, 1)
    probe = Probe(broker)
    try:
        _download_all(pairs)
        assert probe.retained() != {}
        _assert_cleared(pairs[0].server, probe)
    finally:
        probe.close()
        _close(pairs)


def test_a_malformed_cast_index_is_counted_and_clears_nothing(tmp_path, broker, repo):
    probe = Probe(broker)
    try:
        sha = "ab" * 32
        for i, payload in enumerate((
                b"{not json", b'{"path": "targets/x.tar", "total": 5, "chunk": 65536, "until": 0}',
                b'{"path": "targets/' + sha.encode() + b'.kws-2.tar", "total": 99999999999999, '
                b'"grids": [65536], "until": 0}',
                b'{"path": "targets/' + sha.encode() + b'.kws-2.tar", "total": 5, "grids": [1000], "until": 0}')):
            probe.client.publish(cast_index_topic("edgeopt", sha), payload, qos=1, retain=True).wait_for_publish(5)
            client = make_client(f"server-{i}", broker.url)
            connect(client)
            server = RepoServer(repo, PahoTopics(client))
            server.start()
            time.sleep(0.3)
            assert server.snapshot_stats().get("rejected") == 1, payload
            assert server.sweep(time.time() + 10**6) == 0
            client.disconnect()
            client.loop_stop()
    finally:
        probe.close()
