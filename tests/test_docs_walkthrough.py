"""The walkthrough in docs/security.md, docs/fleet.md and docs/agent.md -- signing keys, a TLS
Mosquitto with a password per device and an ACL, a provisioned agent, a signed update it commits --
run exactly as written: the shell blocks marked ``<!-- walkthrough N -->`` are collected from the
three pages, ordered by N and run as one bash script in a fresh directory (where, as in a checkout,
``examples/`` is the repository's). A doc that drifts from the tool fails here."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from brokers import remove_workdir, require_mosquitto
from conftest import ROOT
from doc_blocks import marked, marker_count

DOCS = ("docs/security.md", "docs/fleet.md", "docs/agent.md")
STEP = re.compile(r"walkthrough (\d+)")
PORT = 8883  # broker-config's default listener, as the walkthrough leaves it

# Not part of the walkthrough: what the test needs around it. Background processes the steps start
# are stopped (and waited for) however the script ends.
PREAMBLE = """set -euo pipefail
stop() {
    kill ${AGENT:-} ${FLEET:-} 2>/dev/null || true
    wait ${AGENT:-} ${FLEET:-} 2>/dev/null || true
    if [ -f trial/broker/run/mosquitto.pid ]; then kill "$(cat trial/broker/run/mosquitto.pid)" 2>/dev/null || true; fi
}
trap stop EXIT
"""


def walkthrough_steps() -> list[tuple[int, str, str]]:
    """(N, page, commands) for every marked block, ordered by N."""
    steps = [(int(m.group(1)), page, block.text) for page in DOCS for m, block in marked(page, STEP)
             if block.lang == "sh"]
    return sorted(steps)


def test_the_walkthrough_is_numbered_without_gaps_across_its_three_pages():
    steps = walkthrough_steps()
    assert [n for n, _, _ in steps] == list(range(1, len(steps) + 1)), [(n, page) for n, page, _ in steps]
    assert {page for _, page, _ in steps} == set(DOCS)
    for page in DOCS:  # a marker whose block does not parse would silently drop a step
        assert marker_count(page, STEP) == sum(1 for _, p, _ in steps if p == page), page


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


@pytest.fixture
def trial_dir(tmp_path):
    """A fresh directory the broker's user can enter (pytest's are 0700), with the checkout's examples/."""
    d = tmp_path
    if os.geteuid() == 0:
        import tempfile

        d = Path(tempfile.mkdtemp(prefix="edgeopt-walkthrough-", dir="/tmp"))
        d.chmod(0o755)
        (tmp_path / "reachable-workdir").write_text(str(d))
    (d / "examples").symlink_to(ROOT / "examples")
    yield d
    remove_workdir(tmp_path)


@pytest.mark.slow
def test_the_walkthrough_commits_a_signed_update_and_shows_no_password(trial_dir):
    require_mosquitto()
    if _port_in_use(PORT):
        pytest.skip(f"port {PORT} (the walkthrough's broker) is in use on this machine")
    script = PREAMBLE + "\n".join(commands for _, _, commands in walkthrough_steps())
    bin_dir = str(Path(sys.executable).parent)  # `python`, `edgeopt` and `edgeopt-agent` of this install
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    proc = subprocess.run(["bash", "-c", script], cwd=trial_dir, env=env, capture_output=True, text=True,
                          timeout=900)
    trial = trial_dir / "trial"
    logs = {name: (trial / name).read_text() if (trial / name).exists() else "" for name in ("fleet.log", "agent.log")}
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:], logs["fleet.log"][-2000:],
                                  logs["agent.log"][-3000:])

    status = json.loads((trial / "device" / "state" / "status.json").read_text())["state"]
    assert status["model"]["name"] == "imu" and status["model"]["version"] == "1"
    assert status["update"]["state"] == "COMMITTED" and status["online"] is False  # stopped cleanly
    assert "fleet service ready: broker mqtts://edgeopt-fleet@localhost:8883" in logs["fleet.log"]
    assert "updates off" not in logs["agent.log"]
    secrets = [(trial / "broker" / "service.password").read_text().strip(),
               (trial / "device" / "etc" / "mqtt.password").read_text().strip()]
    for where, text in (("stdout", proc.stdout), ("stderr", proc.stderr), *logs.items(),
                        ("status.json", json.dumps(status))):
        assert not any(secret in text for secret in secrets), f"a password shows in {where}"
    deadline = time.monotonic() + 10
    while _port_in_use(PORT) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _port_in_use(PORT), "the walkthrough's last step left Mosquitto running"
