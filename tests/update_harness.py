"""Real agents taking signed updates: a Mosquitto, a signed repository served over it, artifacts of
the IMU model (good and deliberately bad ones) and agent subprocesses."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeopt.artifact import GOLDEN, MANIFEST, REPORT, file_hashes
from edgeopt.fleet.repo_server import RepoServer
from edgeopt.fleet.repository import Repository
from edgeopt.mqtt import PahoTopics, connect, make_client

from agent_harness import AgentProcess, base_config, results_from_jsonl
from brokers import Mosquitto
from conftest import run_cli


def convert(imu: dict, out: Path, version: str, model: Path | None = None, *extra: str) -> Path:
    res = run_cli("convert", model or imu["model"], "-o", out, "--target", "onnx", "-q", "--name", "imu-cnn",
                  "--version", version, "--preprocessing", imu["preprocessing"], "--validation", imu["validation"],
                  *extra)
    assert res.code in (0, 1), res.err  # 1: a check failed, the artifact is kept (the bad variants)
    return out


def rehash(artifact: Path) -> Path:
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["files"] = file_hashes(artifact, [manifest["model"]["file"], GOLDEN, REPORT])
    (artifact / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return artifact


def scrambled(good: Path, dest: Path, version: str) -> Path:
    """Weights permuted after conversion, hashes redone: well-formed and signable, wrong on golden vectors."""
    shutil.copytree(good, dest)
    set_version(dest, version)
    model = onnx.load(dest / "model.onnx")
    rng = np.random.default_rng(3)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.size >= 64:
            init.CopyFrom(numpy_helper.from_array(rng.permutation(w.ravel()).reshape(w.shape), init.name))
    onnx.save(model, dest / "model.onnx")
    return rehash(dest)


def nan_on_golden(good: Path, dest: Path, version: str) -> Path:
    """Outputs multiplied by NaN after conversion: every output is NaN."""
    shutil.copytree(good, dest)
    set_version(dest, version)
    model = onnx.load(dest / "model.onnx")
    out = model.graph.output[0].name
    model.graph.initializer.append(numpy_helper.from_array(np.array(np.nan, np.float32), "nan_c"))
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = out + "_pre"
    model.graph.node.append(helper.make_node("Mul", [out + "_pre", "nan_c"], [out], name="poison"))
    onnx.save(model, dest / "model.onnx")
    return rehash(dest)


def set_version(artifact: Path, version: str) -> None:
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["version"] = version
    (artifact / MANIFEST).write_text(json.dumps(manifest, indent=2))


def permuted_classes(imu: dict, dest_onnx: Path) -> Path:
    """The IMU model with its class scores rolled by one: a self-consistent model that disagrees
    with the original on (almost) every window."""
    model = onnx.load(imu["model"])
    out = model.graph.output[0].name
    n = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    model.graph.initializer.append(numpy_helper.from_array(np.roll(np.arange(n), 1).astype(np.int64), "perm"))
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = out + "_pre"
    model.graph.node.append(helper.make_node("Gather", [out + "_pre", "perm"], [out], axis=1, name="roll"))
    onnx.save(model, dest_onnx)
    return dest_onnx


def nan_on_live_data(imu: dict, dest_onnx: Path, golden_count: int = 8) -> Path:
    """NaN outputs for windows whose largest sample exceeds what the golden windows hold: golden
    vectors pass, live data fails often (a data-dependent bug the self-test cannot see)."""
    x = np.load(imu["validation"])[next(iter(np.load(imu["validation"]).files))][:golden_count]
    threshold = float(np.abs(x).max()) * 1.0001
    model = onnx.load(imu["model"])
    inp, out = model.graph.input[0].name, model.graph.output[0].name
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = out + "_pre"
    model.graph.initializer.extend([numpy_helper.from_array(np.array(threshold, np.float32), "thr"),
                                    numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                                    numpy_helper.from_array(np.array([1], np.int64), "ax1")])
    model.graph.node.extend([
        helper.make_node("Abs", [inp], ["absx"]),
        helper.make_node("ReduceMax", ["absx"], ["peak"], axes=[1, 2], keepdims=0),
        helper.make_node("Sub", ["thr", "peak"], ["room"]),
        helper.make_node("Sqrt", ["room"], ["root"]),          # NaN where the peak exceeds the threshold
        helper.make_node("Mul", ["root", "zero"], ["poison"]),
        helper.make_node("Unsqueeze", ["poison", "ax1"], ["poison2"]),
        helper.make_node("Add", [out + "_pre", "poison2"], [out]),
    ])
    onnx.save(model, dest_onnx)
    return dest_onnx


class Rig:
    """Broker + repository (served over MQTT in this process) + desired publisher."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.broker = Mosquitto(tmp / "broker").start()
        self.repo = Repository.init(tmp / "repo")
        self.server_client = make_client("repo-server", self.broker.url)
        connect(self.server_client)
        self.server = RepoServer(self.repo, PahoTopics(self.server_client))
        self.server.start()
        self.agents: list[AgentProcess] = []

    def publish(self, artifact: Path, version: str) -> dict[str, Any]:
        # the deliberately bad variants may carry a failed conversion report: they are meant to reach devices
        return self.repo.publish(artifact, "imu-cnn", version, allow_failed=True)

    def stored(self, entry: dict[str, Any]) -> Path:
        """The repository's copy of a published artifact (what the server sends)."""
        return self.repo.targets_dir / f"{entry['sha256']}.{entry['target']}"

    def set_desired(self, device: str, version: str | None, rollout: str | None = "r1") -> None:
        payload = b"" if version is None else json.dumps(
            {"name": "imu-cnn", "version": version, "rollout": rollout}).encode()
        self.server_client.publish(f"edgeopt/devices/{device}/desired", payload, qos=1, retain=True).wait_for_publish(5)

    def agent_config(self, state_dir: Path, jsonl: Path, **update: Any) -> dict[str, Any]:
        cfg = base_config(self.tmp, agent={"device_id": "dev1", "state_dir": str(state_dir)},
                          mqtt={"host": "127.0.0.1", "port": self.broker.port, "reconnect_max_s": 1.0},
                          update={"root": str(self.repo.metadata_dir / "1.root.json"), "baseline_s": 0.5,
                                  "probation_windows": 40, "probation_s": 1.0, "retry_interval_s": 0.5,
                                  "request_timeout_s": 2.0, **update},
                          batching={"max_batch": 8, "max_wait_ms": 20.0})
        cfg["source"] = [{"type": "synthetic", "name": "imu", "rate_hz": 1600.0, "seed": 5}]
        cfg["sink"] = [{"type": "jsonl", "path": str(jsonl)}]
        return cfg

    def start_agent(self, config: dict[str, Any], name: str = "agent.toml") -> AgentProcess:
        agent = AgentProcess(self.tmp, config, name=name)
        self.agents.append(agent)
        return agent

    def close(self) -> None:
        for a in self.agents:
            if a.proc.poll() is None:
                a.proc.kill()
                a.proc.wait(5)
        self.server_client.disconnect()
        self.server_client.loop_stop()
        self.broker.stop()


def update_of(status: dict[str, Any]) -> dict[str, Any]:
    return status["state"]["update"]


def wait_outcome(agent: AgentProcess, version: str, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until the update to ``version`` ended (COMMITTED or ROLLED_BACK); the final status."""
    return agent.wait_status(
        lambda s: update_of(s)["state"] in ("COMMITTED", "ROLLED_BACK") and (update_of(s)["target"] or {}).get(
            "version") == version, timeout=timeout, what=f"the update to {version} to end")


def model_version(status: dict[str, Any]) -> str | None:
    m = status["state"]["model"]
    return m["version"] if m else None


def seq_gaps(jsonl: Path) -> tuple[list[int], list[str]]:
    """Missing sequence numbers of the one source, and the model version of each result in order."""
    rows = results_from_jsonl(jsonl)
    seqs = sorted(r["seq"] for r in rows)
    missing = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs)) if seqs else []
    versions = [r["model"]["version"] for r in sorted(rows, key=lambda r: r["seq"])]
    return missing, versions


def wait(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


CRASH_ON_LOAD_C = """
#include <stdlib.h>
/* Runs when the library is loaded (dlopen): a native model library that brings its runtime down. */
__attribute__((constructor)) static void crash_on_load(void) { abort(); }
"""


def crashes_on_load(good: Path, dest: Path, version: str) -> Path:
    """A TVM-format artifact whose model.so aborts the process that loads it (a broken native build).
    Built from ``good``'s manifest and golden vectors; the compiled library is a real shared object."""
    import subprocess

    shutil.copytree(good, dest)
    (dest / "model.onnx").unlink()
    src = dest / "crash.c"
    src.write_text(CRASH_ON_LOAD_C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(dest / "model.so"), str(src)], check=True)
    src.unlink()
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest["model"].update(file="model.so", format="tvm", runtime="tvm")
    manifest["version"] = version
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return rehash(dest)
