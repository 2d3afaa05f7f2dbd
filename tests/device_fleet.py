"""The fleet side of the device tests, run as an operator runs it: the dev virtualenv's ``edgeopt``
CLI in subprocesses (keys init, convert, fleet publish, fleet serve, rollout create / status) over
a real Mosquitto. The device side is another install's ``edgeopt-agent`` (tests/device/)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent_harness import base_config

EDGEOPT = str(Path(sys.executable).parent / "edgeopt")


def edgeopt(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``edgeopt ARGS`` of the dev virtualenv (the host: converter + fleet)."""
    return subprocess.run([EDGEOPT, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def checked(*args: str | Path, timeout: float = 300) -> str:
    proc = edgeopt(*args, timeout=timeout)
    assert proc.returncode == 0, f"edgeopt {' '.join(map(str, args))} exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc.stdout


def convert(imu: dict, out: Path, version: str, target: str = "onnx") -> Path:
    """The IMU model as an artifact named imu-cnn@VERSION for ``target``."""
    checked("convert", imu["model"], "-o", out, "--target", target, "-q", "--force", "--name", "imu-cnn",
            "--version", version, "--preprocessing", imu["preprocessing"], "--validation", imu["validation"])
    return out


class Fleet:
    """A signed repository (``keys init``) and ``fleet serve`` on the given broker."""

    def __init__(self, tmp: Path, broker_url: str):
        self.tmp, self.broker_url = tmp, broker_url
        self.repo = tmp / "repo"
        checked("keys", "init", self.repo)
        self.root = self.repo / "metadata" / "1.root.json"
        self.service: subprocess.Popen | None = None
        self.log = tmp / "fleet-serve.log"

    def publish(self, artifact: Path) -> None:
        checked("fleet", "publish", artifact, "--repo", self.repo)

    def tamper(self, name: str, version: str) -> Path:
        """Change bytes of a published artifact on the repository side after it was signed (what a
        compromised mirror or disk corruption does): its length stays, its sha256 no longer matches.
        The deltas that make that version too: a board would otherwise build the signed artifact from
        an intact delta and never fetch the damaged file."""
        (target,) = (self.repo / "targets").glob(f"*.{name}-{version}.tar")
        for path in [target, *(self.repo / "targets").glob(f"*.{name}-{version}.from-*.zst")]:
            data = bytearray(path.read_bytes())
            middle = len(data) // 2
            data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
            path.write_bytes(bytes(data))
        return target

    def serve(self, timeout: float = 60) -> None:
        with open(self.log, "ab") as log:
            self.service = subprocess.Popen([EDGEOPT, "fleet", "serve", "--repo", str(self.repo), "--broker",
                                             self.broker_url, "--tick", "0.2"], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while "fleet service ready" not in self.log.read_text():
            if self.service.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"fleet serve did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def devices(self) -> dict[str, dict[str, Any]]:
        return {d["device_id"]: d for d in json.loads(checked("fleet", "devices", "--repo", self.repo, "--json"))}

    def wait_device(self, device_id: str, predicate, timeout: float = 120, what: str = "the device") -> dict:
        deadline = time.monotonic() + timeout
        while True:
            device = self.devices().get(device_id)
            if device is not None and predicate(device):
                return device
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; registry: {device}")
            time.sleep(0.5)

    def roll_out(self, model: str, selector: str, timeout: float) -> tuple[int, dict[str, Any]]:
        """Create and start a one-wave rollout, watch it to the end: (watch exit code: 0 completed,
        1 aborted; the rollout's status)."""
        created = json.loads(checked("fleet", "rollout", "create", "--repo", self.repo, "--model", model,
                                     "--selector", selector, "--waves", "100%", "--bake", "1s",
                                     "--device-timeout", f"{int(timeout)}s", "--start", "--json"))
        rollout = created["rollout_id"]
        watch = edgeopt("fleet", "rollout", "status", rollout, "--repo", self.repo, "--watch", timeout=timeout + 60)
        status = json.loads(checked("fleet", "rollout", "status", rollout, "--repo", self.repo, "--json"))
        return watch.returncode, status

    def close(self) -> None:
        if self.service is not None and self.service.poll() is None:
            self.service.terminate()
            try:
                self.service.wait(15)
            except subprocess.TimeoutExpired:
                self.service.kill()
                self.service.wait(5)


def device_config(tmp: Path, fleet: Fleet, broker_port: int, device_id: str, rate_hz: float = 400.0,
                  **update: Any) -> dict[str, Any]:
    """An agent.toml for a board of the test fleet: updates on (pinned root), a synthetic IMU source,
    results to a JSON Lines file, short probation."""
    cfg = base_config(tmp, agent={"device_id": device_id, "state_dir": str(tmp / "state"), "labels": ["ring=device"]},
                      mqtt={"host": "127.0.0.1", "port": broker_port, "reconnect_max_s": 1.0},
                      update={"root": str(fleet.root), "baseline_s": 0.5, "probation_windows": 20,
                              "probation_s": 1.0, "retry_interval_s": 0.5, "max_retries": 3,
                              "request_timeout_s": 5.0, **update},
                      batching={"max_batch": 8, "max_wait_ms": 20.0},
                      telemetry={"interval_s": 0.5})
    cfg["source"] = [{"type": "synthetic", "name": "imu", "rate_hz": rate_hz, "seed": 5}]
    cfg["sink"] = [{"type": "jsonl", "path": str(tmp / "results.jsonl")}]
    return cfg


def commit_then_refuse_tampered(fleet: Fleet, agent, timeout: float, windows_after: int = 20) -> dict[str, Any]:
    """The signed-update story on a board running imu-cnn@1 with @2 and a tampered @3 published:
    a rollout of @2 completes and the board commits it; a rollout of @3 aborts because the board
    refused the file (hash mismatch, seen by the registry too) and goes on inferring with @2.
    Returns the board's last status."""
    code, status = fleet.roll_out("imu-cnn@2", "ring=device", timeout=timeout)
    assert code == 0, json.dumps(status)[:3000]
    now = agent.wait_status(lambda s: s["state"]["update"]["state"] == "COMMITTED"
                            and s["state"]["model"]["version"] == "2", timeout=timeout, what="imu-cnn@2 committed")
    assert now["state"]["status"] == "running"

    code, status = fleet.roll_out("imu-cnn@3", "ring=device", timeout=timeout)
    assert code == 1, json.dumps(status)[:3000]  # aborted: the board refused the tampered file...
    assert "hash_mismatch" in status["failures"][0]["reason"], status["failures"]  # ...and the registry saw why
    refused = agent.wait_status(lambda s: s["state"]["update"]["state"] in ("ROLLED_BACK", "IDLE")
                                and (s["state"]["update"]["target"] or {}).get("version") == "3",
                                timeout=timeout, what="imu-cnn@3 refused")
    assert "hash_mismatch" in (refused["state"]["update"]["reason"] or ""), refused["state"]["update"]
    windows = refused["telemetry"]["windows_out"]
    running = agent.wait_status(lambda s: s["telemetry"]["windows_out"] >= windows + windows_after,
                                timeout=timeout, what="inference going on with imu-cnn@2")
    assert running["state"]["model"]["version"] == "2" and running["state"]["status"] == "running"
    return running
