"""The docs as tests: every shell block marked ``<!-- runnable -->`` in README.md and docs/*.md runs,
in page order, as one bash script per page in a fresh directory laid out like a checkout
(``examples/`` and ``.venv`` are the repository's; the data comes from the examples), with this
install's ``edgeopt`` first on PATH. A page whose commands drift from the tool fails here.

Every other shell block is either a step of the broker walkthrough (tests/test_docs_walkthrough.py)
or listed in NOT_RUN with the reason it cannot run on a test machine (the page says so too), so a new
block cannot slip in untested."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from doc_blocks import PAGES, ROOT, SHELL, blocks, marked, marker_count

RUNNABLE = re.compile(r"runnable")
WALKTHROUGH = re.compile(r"walkthrough \d+")

# (page, first line of the block) → why it is not run here
NOT_RUN = {
    ("README.md", "make demo   # creates .venv, installs edgeopt with all extras, trains a small CNN on scikit-learn's"):
        "the Makefile targets themselves (make test would run this test; the demo runs in test_fleet_demo.py)",
    ("README.md", "sudo edgeopt agent install-service            # systemd unit (Type=notify, watchdog, hardening) + config"):
        "needs root and systemd (install-service itself: tests/test_agent_install.py)",
    ("README.md", "edgeopt fleet serve --repo repo/ --http 127.0.0.1:8080    # then open http://127.0.0.1:8080/"):
        "serves until stopped (tests/test_fleet_cli.py runs fleet serve --http and asks its dashboard)",
    ("docs/agent.md", "pip install 'edgeopt-0.1.0-py3-none-any.whl[agent]'   # on the board: the built wheel (below); [agent,litert] for .tflite"):
        "a board: the built wheel, /var/lib and systemd (the wheel on a board: make test-device)",
    ("docs/agent.md", "# on the host, in this repository: the wheel and sdist into dist/"):
        "a board, and the build takes minutes (make test-device builds and installs the wheel)",
    ("docs/agent.md", "cp -r pi-0042/. /etc/edgeopt/ && edgeopt agent install-service --config /etc/edgeopt/agent.toml"):
        "needs root, /etc and systemd (walkthrough step 4 runs the bundle on one machine)",
    ("docs/agent.md", "sudo edgeopt agent install-model build/demo/imu-v1 --state-dir /var/lib/edgeopt-agent"):
        "needs root and the agent's state directory in /var/lib",
    ("docs/fleet.md", "edgeopt fleet devices --repo REPO --selector site=lab,ring=canary      # table"):
        "placeholders for a running fleet (the walkthrough runs these commands on a real one)",
    ("docs/fleet.md", "edgeopt fleet rollout create --repo REPO --model kws@2 --selector site=lab --waves 1%,10%,50%,100% \\"):
        "placeholders for a running fleet (the walkthrough runs these commands on a real one)",
    ("docs/testing.md", "make test-device        # CI (.ci/run) runs it after make test"):
        "the device tests themselves (minutes; CI runs them after make test)",
    ("docs/testing.md", "tools/make_aarch64_agent_env.sh build/device/dist/edgeopt-0.1.0-py3-none-any.whl"):
        "needs root, qemu-user-static and a download of bookworm's arm64 Python (make test-device)",
    ("docs/tflite.md", "python3.12 -m venv .venv-onnx2tf          # with pyenv: PYENV_VERSION=3.12.1 python3.12 -m venv .venv-onnx2tf"):
        "installs onnx2tf from the network into a Python 3.12 virtualenv (a benchmark's peer, not edgeopt)",
}

# what a page's commands need beyond this install (the test skips, naming it, where it is missing)
NEEDS = {"README.md": ["aarch64-linux-gnu-gcc"]}  # --profile raspberry-pi-4 --target tvm links for aarch64


def runnable_pages() -> list[str]:
    return [page for page in PAGES if marked(page, RUNNABLE)]


def test_every_shell_block_is_run_or_listed_with_a_reason():
    unaccounted, stale = [], set(NOT_RUN)
    for page in PAGES:
        for block in blocks(page):
            if block.lang not in SHELL:
                continue
            key = (page, block.first_line)
            stale.discard(key)
            if block.marker is not None and (RUNNABLE.fullmatch(block.marker) or WALKTHROUGH.fullmatch(block.marker)):
                assert key not in NOT_RUN, f"{block.where} is marked {block.marker!r} and listed in NOT_RUN"
                continue
            if key not in NOT_RUN:
                unaccounted.append(f"{block.where}: {block.first_line[:70]}")
    assert not unaccounted, ("shell blocks neither marked <!-- runnable --> nor listed in NOT_RUN (with the reason "
                             f"they cannot run here): {unaccounted}")
    assert not stale, f"NOT_RUN names blocks no page has (any more): {sorted(stale)}"


def test_every_runnable_marker_is_over_a_shell_block():
    for page in PAGES:
        found = marked(page, RUNNABLE)
        assert marker_count(page, RUNNABLE) == len(found), f"{page}: a <!-- runnable --> marker over no code block"
        for _, block in found:
            assert block.lang == "sh", f"{block.where}: <!-- runnable --> marks a {block.lang or 'plain'} block"


def test_the_readme_tour_is_runnable():
    assert len(marked("README.md", RUNNABLE)) >= 2  # the host tour and the device part


def script(page: str) -> str:
    """The page's runnable blocks as one script, each announced on stderr (a failure names its block)."""
    parts = ["set -euo pipefail"]
    for _, block in marked(page, RUNNABLE):
        parts += [f"printf '\\n### %s\\n' '{block.where}' >&2", block.text]
    return "\n".join(parts) + "\n"


@pytest.mark.slow
@pytest.mark.parametrize("page", runnable_pages())
def test_the_page_runs_as_written(page, tmp_path):
    missing = [tool for tool in NEEDS.get(page, []) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{page} needs {', '.join(missing)} (apt-get install gcc-aarch64-linux-gnu, or make setup as root)")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    bin_dir = str(Path(sys.executable).parent)  # `python`, `edgeopt` and `edgeopt-agent` of this install
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    proc = subprocess.run(["bash", "-c", script(page)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{page} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}"
