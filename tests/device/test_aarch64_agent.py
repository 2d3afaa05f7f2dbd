"""The device test on an emulated aarch64 board (a Raspberry Pi 4's Cortex-A72 under qemu-user):
Debian bookworm's arm64 Python 3.11 with edgeopt's wheel and its [agent,litert] dependencies as
aarch64 wheels (tools/make_aarch64_agent_env.sh), running a .tflite model converted on this host
committing a signed update from the host's fleet service over a real Mosquitto and refusing a
tampered one.

Emulated Python is ~10-50x slower: one model, a slow sensor, a short probation."""

from __future__ import annotations

import json
import os

import pytest

from agent_harness import AgentProcess, results_from_jsonl
from brokers import Mosquitto
from device_env import IMPORT_EVERY_AGENT_MODULE, aarch64_board, aarch64_missing, wheel_venv
from device_fleet import Fleet, commit_then_refuse_tampered, convert, device_config

pytestmark = [pytest.mark.device, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def board(wheel_and_sdist):
    reason = aarch64_missing()
    if reason:
        pytest.skip(reason)
    wheel = wheel_and_sdist.wheel
    pip = wheel_venv(wheel, "agent").bin("pip")  # a pip that sees no dev packages
    return aarch64_board(wheel, pip)


def test_every_agent_module_and_litert_import_on_aarch64(board, tmp_path):
    proc = board.run("-c", IMPORT_EVERY_AGENT_MODULE, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["machine"] == "aarch64" and seen["litert"]
    assert seen["file"].startswith(str(board.site)), seen["file"]
    assert "edgeopt.agent.update.updater" in seen["agent"]
    assert not [m for m, there in seen["installed"].items() if there], seen["installed"]


def test_the_emulated_board_runs_a_tflite_model_commits_a_signed_update_and_refuses_a_tampered_one(board, imu_model, tmp_path):
    broker = Mosquitto(tmp_path / "broker").start()
    fleet = Fleet(tmp_path, broker.url)
    agent = None
    try:
        for version in ("1", "2", "3"):
            fleet.publish(convert(imu_model, tmp_path / f"v{version}", version, target="tflite"))
        fleet.tamper("imu-cnn", "3")
        fleet.serve()
        proc = board.run(*board.console_script("edgeopt")[1:], "agent", "install-model", tmp_path / "v1",
                         "--state-dir", tmp_path / "state")
        assert proc.returncode == 0, proc.stderr[-2000:]
        # 50 Hz, windows of 64 every 32 samples: ~1.6 windows/s, as a real IMU sends them
        cfg = device_config(tmp_path, fleet, broker.port, "pi-emulated", rate_hz=50.0, probation_windows=4,
                            probation_s=2.0, baseline_s=1.0, self_test_timeout_s=600.0, request_timeout_s=20.0)
        cfg["agent"]["profile"] = "raspberry-pi-4"
        agent = AgentProcess(tmp_path, cfg, command=board.console_script("edgeopt-agent"), env=board.env())
        fleet.wait_device("pi-emulated", lambda d: (d["model"] or {}).get("version") == "1" and d["online"],
                          timeout=300, what="the emulated board to register running imu-cnn@1")
        first = agent.wait_status(lambda s: s["telemetry"]["windows_out"] >= 2, timeout=300, what="v1 inferring")
        assert first["state"]["model"]["runtime"] == "litert", first["state"]["model"]
        assert os.readlink(f"/proc/{agent.proc.pid}/exe").endswith("qemu-aarch64-static")  # an emulated board

        last = commit_then_refuse_tampered(fleet, agent, timeout=600, windows_after=2)
        assert last["state"]["model"]["runtime"] == "litert"
        assert agent.stop() == 0, agent.err[-3000:]
        versions = [r["model"]["version"] for r in results_from_jsonl(tmp_path / "results.jsonl")]
        assert "1" in versions and "2" in versions and versions.index("2") > versions.index("1")
    finally:
        if agent is not None and agent.proc.poll() is None:
            agent.proc.kill()
        fleet.close()
        broker.stop()
