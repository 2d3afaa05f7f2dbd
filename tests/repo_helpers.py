"""Artifacts, repositories and a device/server pair over a real Mosquitto for the update tests."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from edgeopt.artifact import GOLDEN, MANIFEST_SCHEMA, REPORT, file_hashes
from edgeopt.fleet.repo_server import RepoServer
from edgeopt.fleet.repository import Repository
from edgeopt.mqtt import PahoTopics, connect, make_client
from edgeopt.repo_client import DeviceTrust, MqttFetcher, MqttRepoLink
from edgeopt.repo_http import HttpRepoLink

from brokers import Mosquitto
from memory_bus import MemoryBus


def fake_artifact(root: Path, name: str = "kws", version: str = "1", size: int = 4096, seed: int = 0) -> Path:
    """A structurally valid artifact directory whose model file is ``size`` random bytes (the update
    machinery moves and verifies bytes; it does not run them)."""
    root.mkdir(parents=True)
    (root / "model.onnx").write_bytes(os.urandom(size) if seed is None else
                                      __import__("numpy").random.default_rng(seed).bytes(size))
    (root / GOLDEN).write_bytes(b"golden")
    (root / REPORT).write_text("{}")
    manifest = {"schema": MANIFEST_SCHEMA, "name": name, "version": version,
                "model": {"file": "model.onnx", "format": "onnx", "runtime": "onnxruntime", "quantize": "none"},
                "inputs": [], "outputs": [], "target_profile": None,
                "files": file_hashes(root, ["model.onnx", GOLDEN, REPORT])}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


class RepoPair:
    """A repository served over MQTT — a real broker, or ``bus`` (tests/memory_bus.py) — and one device
    that trusts its first root."""

    def __init__(self, tmp: Path, broker: Mosquitto | None, repo: Repository, device_id: str = "dev-1",
                 chunk_size: int = 64 * 1024, timeout: float = 2.0, retries: int = 3, serve: bool = True,
                 bus: MemoryBus | None = None, repo_url: str | None = None):
        """``repo_url``: the device fetches the repository over HTTP from there instead (edgeopt.repo_http;
        the caller serves the files)."""
        self.tmp, self.broker, self.repo, self.bus = tmp, broker, repo, bus
        self.clients = []
        if serve and repo_url is None:
            self.server = RepoServer(repo, self._topics("repo-server"))
            self.server.start()
        self.device_dir = tmp / device_id
        (self.device_dir / "metadata").mkdir(parents=True, exist_ok=True)
        if not (self.device_dir / "metadata" / "root.json").exists():
            shutil.copy(repo.metadata_dir / "1.root.json", self.device_dir / "metadata" / "root.json")
        self.link = HttpRepoLink(repo_url) if repo_url else MqttRepoLink(self._topics(device_id), device_id)
        self.fetcher = MqttFetcher(self.link, chunk_size=chunk_size, timeout=timeout, retries=retries,
                                   partial_dir=self.device_dir / "partial", backoff=0.05)
        self.trust = DeviceTrust(self.device_dir / "metadata", self.fetcher, self.device_dir / "downloads")

    def _topics(self, client_id: str):
        if self.bus is not None:
            return self.bus.client()
        client = make_client(client_id, self.broker.url)
        connect(client)
        self.clients.append(client)
        return PahoTopics(client)

    def close(self) -> None:
        for c in self.clients:
            c.disconnect()
            c.loop_stop()
