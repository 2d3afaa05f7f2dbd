"""The agent as the shipped unit runs it — as its own user (DynamicUser) — beside an operator who
installs models as root: new slot files belong to the state directory's owner, and a slot the agent
cannot read is reported in its state (``slot_errors``) while it keeps serving the other slot, never
an internal error. The agent runs as ``nobody`` (uid 65534) in a real subprocess."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from agent_harness import AgentProcess, base_config
from conftest import run_cli

pytestmark = pytest.mark.slow

NOBODY = 65534
AGENT_MAIN = "from edgeopt.cli.agent import main; main()"


def _works_as_nobody(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "import edgeopt.agent.service, onnxruntime"], user=NOBODY, group=NOBODY,
                              extra_groups=[], capture_output=True, timeout=120).returncode == 0
    except OSError:
        return False


@pytest.fixture(scope="module")
def shared_dir():
    """A directory ``nobody`` can reach (pytest's own temporary directories are root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="edgeopt-perm-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def agent_command(shared_dir) -> list[str]:
    """How to start this checkout's agent as ``nobody``: this interpreter if it can, else a virtualenv
    on a system Python of the same version that adds this environment's site-packages."""
    if os.geteuid() != 0:
        pytest.skip("runs the agent as another user: needs root")
    if _works_as_nobody(sys.executable):
        return [sys.executable, "-c", AGENT_MAIN]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    base = next((p for p in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}") if Path(p).is_file()),
                None)
    if base is None:
        pytest.skip(f"{sys.executable} is not executable by uid {NOBODY} and there is no system python{version} "
                    f"(apt-get install python{version}-venv)")
    env = shared_dir / "venv"
    subprocess.run([base, "-m", "venv", "--without-pip", str(env)], check=True, capture_output=True)
    site = next((env / "lib").glob("python*/site-packages"))
    (site / "edgeopt-checkout.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    python = str(env / "bin" / "python")
    if not _works_as_nobody(python):
        pytest.skip(f"uid {NOBODY} cannot import edgeopt from {sysconfig.get_paths()['purelib']}")
    return [python, "-c", AGENT_MAIN]


@pytest.fixture
def agent_home(shared_dir, request):
    """A state directory owned by ``nobody`` and a results directory it can write."""
    home = shared_dir / request.node.name.replace("[", "-").replace("]", "")
    (home / "out").mkdir(parents=True)
    (home / "state").mkdir()
    for p in (home / "out", home / "state"):
        os.chown(p, NOBODY, NOBODY)
    old_umask = os.umask(0o022)  # an operator's shell
    yield home
    os.umask(old_umask)


def _start(home: Path, command: list[str]) -> AgentProcess:
    cfg = base_config(home, agent={"device_id": "dev1", "state_dir": str(home / "state")},
                      model={"poll_interval_s": 0.2}, batching={"max_batch": 8, "max_wait_ms": 20.0})
    cfg["source"] = [{"type": "synthetic", "name": "imu", "rate_hz": 800.0, "seed": 5}]
    cfg["sink"] = [{"type": "jsonl", "path": str(home / "out" / "results.jsonl")}]
    return AgentProcess(home, cfg, command=command, user=NOBODY, env={"XDG_CACHE_HOME": str(home / "out")})


def _install(artifact: Path, state: Path) -> None:
    res = run_cli("agent", "install-model", artifact, "--state-dir", state)
    assert res.code == 0, res.err


def _serving(slot: str, after: int = 0):
    return lambda s: (s["state"]["status"] == "running" and (s["state"]["model"] or {}).get("slot") == slot
                      and s["telemetry"]["windows_out"] > after + 5)


def test_install_model_as_root_beside_an_agent_running_as_its_own_user(imu_model, agent_command, agent_home):
    state = agent_home / "state"
    agent = _start(agent_home, agent_command)
    try:
        agent.wait_status(lambda s: s["state"]["status"] == "no model", what="the agent waiting for a model")
        _install(imu_model["artifact"], state)
        status = agent.wait_status(_serving("a"), what="the agent serving the installed model")
        assert status["state"]["slot_errors"] is None
        created = [state / "active", state / "slots", *(state / "slots").rglob("*")]
        assert {p.stat().st_uid for p in created} == {NOBODY}, "new files belong to the state dir's owner"
        for p in created:  # the umask's modes (022 here), not 0700 / 0600
            assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p
        _install(imu_model["artifact"], state)  # the other slot; the agent switches to it
        agent.wait_status(_serving("b", status["telemetry"]["windows_out"]), what="the switch to slot b")
        assert agent.stop() == 0, agent.err
    finally:
        if agent.proc.poll() is None:
            agent.proc.kill()


def test_an_unreadable_slot_is_reported_and_the_agent_keeps_serving_the_other(imu_model, agent_command,
                                                                             agent_home):
    state = agent_home / "state"
    _install(imu_model["artifact"], state)
    _install(imu_model["artifact"], state)  # both slots passed their checks; b is active
    (state / "slots" / "b" / "model.onnx").chmod(0)  # unreadable to the agent's user (not to root)
    agent = _start(agent_home, agent_command)
    try:
        status = agent.wait_status(_serving("a"), what="the fall-back to slot a")
        errors = status["state"]["slot_errors"]
        assert list(errors) == ["b"] and "model.onnx" in errors["b"] and "Permission denied" in errors["b"], errors
        assert (state / "active").read_text().strip() == "a"

        (state / "slots" / "a").chmod(0)  # now the slot it serves goes too: no model, both reported
        status = agent.wait_status(lambda s: s["state"]["model"] is None and set(s["state"]["slot_errors"] or ())
                                   == {"a", "b"}, what="both slots reported")
        assert status["state"]["status"] == "error" and agent.proc.poll() is None
        assert all(len(e) <= 200 and e.isprintable() for e in status["state"]["slot_errors"].values())

        (state / "slots" / "a").chmod(0o755)  # fixed: the agent takes slot a again
        status = agent.wait_status(_serving("a"), what="slot a serving again")
        assert list(status["state"]["slot_errors"]) == ["b"]
        assert agent.stop() == 0, agent.err
    finally:
        if agent.proc.poll() is None:
            agent.proc.kill()
