"""Every kind of source feeding the real agent, several at once, JSON Lines rotation, and what the
agent imports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from edgeopt.agent.statedir import StateDir

from agent_harness import AgentProcess, base_config, results_from_jsonl, to_toml
from brokers import Mosquitto

WINDOW, HOP = 64, 32


@pytest.fixture
def state(tmp_path, imu_model):
    StateDir(tmp_path / "state").install(imu_model["artifact"])
    return tmp_path / "state"


def sample_lines(n: int, start: int = 0, stamp0: float | None = None) -> bytes:
    out = []
    for i in range(start, start + n):
        values = f"{np.sin(i / 5):.4f},{np.cos(i / 7):.4f},{1 + 0.1 * np.sin(i):.4f}"
        out.append(f"{stamp0 + i * 0.02:.3f},{values}" if stamp0 is not None else values)
    return ("\n".join(out) + "\n").encode()


def by_source(results):
    ids: dict[str, list[int]] = {}
    for r in results:
        ids.setdefault(r["source"], []).append(r["seq"])
    return ids


def jsonl_config(tmp_path, sources, **extra):
    return base_config(tmp_path, source=sources, sink=[{"type": "jsonl", "path": str(tmp_path / "out.jsonl")}],
                       **extra)


def test_several_sources_feed_one_model_each_in_order(tmp_path, state, imu_model):
    arr = np.loadtxt(imu_model["stream"], delimiter=",", skiprows=1, usecols=(0, 1, 2), max_rows=2000)
    np.save(tmp_path / "rec.npy", arr.astype(np.float32))
    cfg = jsonl_config(tmp_path, [
        {"type": "csv", "name": "csv", "path": str(imu_model["stream"]), "replay": "fast"},
        {"type": "npy", "name": "npy", "path": str(tmp_path / "rec.npy"), "replay": "fast",
         "channels": ["ax", "ay", "az"]},
        {"type": "synthetic", "name": "synth", "replay": "fast", "seconds": 20.0, "seed": 3},
    ], agent={"exit_when_sources_end": True}, batching={"overflow": "block", "max_batch": 8})
    agent = AgentProcess(tmp_path, cfg)
    assert agent.communicate() == 0, agent.err
    ids = by_source(results_from_jsonl(tmp_path / "out.jsonl"))
    n = {"csv": (6000 - WINDOW) // HOP + 1, "npy": (2000 - WINDOW) // HOP + 1, "synth": (1000 - WINDOW) // HOP + 1}
    assert {k: v for k, v in ids.items()} == {k: list(range(c)) for k, c in n.items()}
    assert agent.status()["telemetry"]["windows_out"] == sum(n.values())


def test_stdin_lines(tmp_path, state):
    cfg = jsonl_config(tmp_path, [{"type": "stdin", "name": "in"}], agent={"exit_when_sources_end": True})
    agent = AgentProcess(tmp_path, cfg, stdin=subprocess.PIPE)
    agent.proc.stdin.write(sample_lines(WINDOW + HOP) + b"not,a,number\n1,2\n")
    agent.proc.stdin.close()
    agent.proc.stdin = None  # EOF ends the source
    assert agent.communicate() == 0, agent.err
    assert [r["id"] for r in results_from_jsonl(tmp_path / "out.jsonl")] == ["in:0", "in:1"]
    assert agent.status()["telemetry"]["dropped"]["malformed_rows"] == 2


def test_unix_datagram_with_timestamps(tmp_path, state):
    path = tmp_path / "dgram.sock"
    cfg = jsonl_config(tmp_path, [{"type": "unix-dgram", "name": "d", "path": str(path), "timestamped": True}],
                       batching={"max_wait_ms": 0})
    agent = AgentProcess(tmp_path, cfg)
    agent.wait_status(lambda s: s["state"]["status"] == "running" and path.exists(), what="socket")
    client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    data = sample_lines(WINDOW + HOP, stamp0=1000.0).splitlines(keepends=True)
    for i in range(0, len(data), 10):  # several lines per datagram
        client.sendto(b"".join(data[i:i + 10]), str(path))
    agent.wait_status(lambda s: s["telemetry"]["windows_out"] == 2, what="2 windows")
    assert agent.stop() == 0
    results = results_from_jsonl(tmp_path / "out.jsonl")
    assert [(r["t_start"], r["t_end"]) for r in results] == [(1000.0, 1001.26), (1000.64, 1001.9)]
    assert not path.exists()  # removed on exit


def test_serial_port_through_a_pty(tmp_path, state):
    pytest.importorskip("serial", reason="needs pyserial: pip install 'edgeopt[serial]'")
    master, slave = os.openpty()
    cfg = jsonl_config(tmp_path, [{"type": "serial", "name": "tty", "port": os.ttyname(slave), "baudrate": 115200}])
    agent = AgentProcess(tmp_path, cfg)
    try:
        agent.wait_status(lambda s: s["telemetry"]["sources"].get("tty", {}).get("status") == "running",
                          what="serial source")
        payload = sample_lines(WINDOW)
        for i in range(0, len(payload), 100):  # in pieces, splitting lines, as a UART delivers them
            os.write(master, payload[i:i + 100])
            time.sleep(0.01)
        agent.wait_status(lambda s: s["telemetry"]["windows_out"] == 1, what="a window from the serial port")
    finally:
        assert agent.stop() == 0, agent.err
        os.close(master)
        os.close(slave)
    assert [r["id"] for r in results_from_jsonl(tmp_path / "out.jsonl")] == ["tty:0"]


def test_mqtt_topic_source(tmp_path, state):
    import paho.mqtt.client as mqtt

    with Mosquitto(tmp_path) as broker:
        cfg = jsonl_config(tmp_path, [{"type": "mqtt", "name": "m", "topic": "sensors/dev1/imu"}],
                           mqtt={"host": broker.host, "port": broker.port})
        agent = AgentProcess(tmp_path, cfg)
        agent.wait_status(lambda s: s["telemetry"]["mqtt"]["connected"], what="connected")
        time.sleep(0.5)  # the subscription follows the connect
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sensor")
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        lines = sample_lines(WINDOW + HOP).splitlines(keepends=True)
        for i in range(0, len(lines), 16):
            pub.publish("sensors/dev1/imu", b"".join(lines[i:i + 16]), qos=1).wait_for_publish(5)
        agent.wait_status(lambda s: s["telemetry"]["windows_out"] == 2, what="2 windows from MQTT")
        pub.loop_stop()
        assert agent.stop() == 0, agent.err
    assert [r["id"] for r in results_from_jsonl(tmp_path / "out.jsonl")] == ["m:0", "m:1"]


def test_jsonl_sink_rotates_and_keeps_every_line(tmp_path, state, imu_model):
    cfg = base_config(tmp_path, agent={"exit_when_sources_end": True}, batching={"overflow": "block", "max_batch": 4},
                      source=[{"type": "csv", "name": "f", "path": str(imu_model["stream"]), "replay": "fast"}],
                      sink=[{"type": "jsonl", "path": str(tmp_path / "out.jsonl"), "max_bytes": 8192, "keep": 100}])
    agent = AgentProcess(tmp_path, cfg)
    assert agent.communicate() == 0
    rotated = sorted(tmp_path.glob("out.jsonl.*"))
    line = len((tmp_path / "out.jsonl").read_text().splitlines()[0]) + 1
    assert len(rotated) >= 3 and all(p.stat().st_size <= 8192 + 4 * line for p in rotated)  # rotation per batch
    assert [r["seq"] for r in results_from_jsonl(tmp_path / "out.jsonl")] == list(range(186))


def test_agent_imports_only_the_runtime_it_uses(tmp_path, state, imu_model):
    cfg = jsonl_config(tmp_path, [{"type": "csv", "name": "f", "path": str(imu_model["stream"]), "replay": "fast"}],
                       agent={"exit_when_sources_end": True})
    (tmp_path / "agent.toml").write_text(to_toml(cfg))
    code = ("import sys\nfrom edgeopt.cli.agent import main\n"
            f"try:\n    main(['--config', {str(tmp_path / 'agent.toml')!r}])\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print(json.dumps(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    modules = {m for m in loaded if "." not in m}
    assert "onnxruntime" in modules  # the runtime the manifest names
    # no broker configured: no update machinery (updates come over MQTT), no subprocess (self-tests, hooks)
    assert not {"edgeopt.agent.update.updater", "subprocess", "numpy.ma"} & loaded
    # click: the edgeopt CLI's, not the agent's (~1.2 MiB of a running agent with its worker, docs/agent.md)
    for heavy in ("onnx", "onnxslim", "torch", "tvm", "coremltools", "ai_edge_litert", "tflite_runtime", "paho",
                  "sklearn", "rich", "click"):
        assert heavy not in modules, heavy
