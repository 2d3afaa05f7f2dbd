"""The device path as a board gets it: edgeopt's wheel installed with only the ``agent`` extra into a
fresh virtualenv, that virtualenv's ``edgeopt-agent`` taking signed updates from a real fleet
(the dev virtualenv's ``edgeopt`` CLI: keys init, convert, publish, fleet serve, rollouts) over a
real Mosquitto. An editable install of everything (the rest of the suite) hides what this sees:
a module folder missing from the wheel, a dependency missing from the extra, an import of the
converter's toolchain on the agent's path."""

from __future__ import annotations

import json
import subprocess

import pytest

from agent_harness import AgentProcess
from brokers import Mosquitto
from device_env import IMPORT_EVERY_AGENT_MODULE, Venv, clean_env, installed_mib, wheel_venv
from device_fleet import Fleet, checked, commit_then_refuse_tampered, convert, device_config

pytestmark = [pytest.mark.device, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def venv(wheel_and_sdist):
    return wheel_venv(wheel_and_sdist.wheel, "agent")


def test_every_agent_module_imports_from_the_wheel_and_onnx_is_not_installed(venv, tmp_path):
    proc = venv.run(venv.python, "-c", IMPORT_EVERY_AGENT_MODULE, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["file"].startswith(str(venv.site_packages)), seen["file"]  # the wheel's copy, not the work tree
    for module in ("edgeopt.agent.update.updater", "edgeopt.agent.update.selftest", "edgeopt.agent.sources.synthetic",
                   "edgeopt.agent.sinks.mqtt"):
        assert module in seen["agent"], module
    assert {"edgeopt.artifact", "edgeopt.runtime", "edgeopt.mqtt"} <= set(seen["sdk"]), seen["sdk"]
    assert not [m for m, there in seen["installed"].items() if there], seen["installed"]
    assert not {"onnx", "onnxslim", "sympy", "torch"} & set(seen["loaded"])
    assert seen["machine"] == "x86_64" and not seen["litert"]  # [litert] is a separate extra


def test_the_agent_install_stays_board_sized(venv, tmp_path):
    """docs/agent.md states 195 MiB (site-packages less a bare venv's own pip and setuptools); onnx and
    sympy, which the old base install pulled in, would add ~110 MiB."""
    subprocess.run([str(venv.python), "-m", "venv", str(tmp_path / "bare")], check=True, env=clean_env())
    size = installed_mib(venv.site_packages, Venv(tmp_path / "bare").site_packages)
    assert 100 < size < 260, f"[agent] installs {size:.0f} MiB"


def test_commands_that_need_a_missing_extra_say_which_in_one_line(venv, imu_model, tmp_path):
    help_ = venv.run(venv.bin("edgeopt"), "--help")
    assert help_.returncode == 0 and "convert" in help_.stdout, help_.stderr
    assert venv.run(venv.bin("edgeopt-agent"), "--help").returncode == 0
    for args, extra in ((["convert", imu_model["model"], "-o", tmp_path / "out"], "convert"),
                        (["inspect", imu_model["model"]], "convert")):
        proc = venv.run(venv.bin("edgeopt"), *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and f"pip install 'edgeopt[{extra}]'" in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_wheel_installed_agent_commits_a_signed_update_and_refuses_a_tampered_one(venv, imu_model, tmp_path):
    # host side (dev virtualenv): keys, three versions of the IMU model, the fleet service
    broker = Mosquitto(tmp_path / "broker").start()
    fleet = Fleet(tmp_path, broker.url)
    agent = None
    try:
        for version in ("1", "2", "3"):
            fleet.publish(convert(imu_model, tmp_path / f"v{version}", version))
        fleet.tamper("imu-cnn", "3")
        fleet.serve()
        # the board: v1 installed by hand with the wheel's CLI, then the wheel's agent
        state = tmp_path / "state"
        proc = venv.run(venv.bin("edgeopt"), "agent", "install-model", tmp_path / "v1", "--state-dir", state)
        assert proc.returncode == 0, proc.stderr
        agent = AgentProcess(tmp_path, device_config(tmp_path, fleet, broker.port, "board-1"),
                             command=[str(venv.bin("edgeopt-agent"))], env=clean_env())
        fleet.wait_device("board-1", lambda d: (d["model"] or {}).get("version") == "1" and d["online"],
                          what="board-1 to register running imu-cnn@1")

        commit_then_refuse_tampered(fleet, agent, timeout=90)
        assert agent.stop() == 0, agent.err[-3000:]
        assert "Traceback" not in agent.err, agent.err[-3000:]
        assert checked("fleet", "devices", "--repo", fleet.repo, "--json")  # the registry still answers
    finally:
        if agent is not None and agent.proc.poll() is None:
            agent.proc.kill()
        fleet.close()
        broker.stop()
