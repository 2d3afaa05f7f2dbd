"""SIGTERM / SIGINT / SIGHUP reach the real agent at the worst moment and still work.

Python runs a signal handler in the main thread between two bytecodes — also while that thread
holds a lock: the window queue's (the inference loop inside ``get_batch``) or an Event's (the loop
waiting for a model inside ``Event.wait``). A handler that takes such a lock itself waits for its own
thread for ever, and the agent never stops (seen under load in ``make test``: the agent still running
30 s after SIGTERM). Hitting that moment from outside is a matter of luck, so these tests make the
agent send itself the real signal at exactly that moment, from a wrapper around the code that holds
the lock, and then expect it to stop (or reload) as it should.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

import pytest

from edgeopt.agent.statedir import StateDir

from agent_harness import AgentProcess, base_config

# Runs the agent (the same entry point as edgeopt-agent) with a wrapper that raises SIG once, from the
# main thread, while it holds the lock named by WHERE.
RUN_AGENT = """
import os, signal, sys, threading

from edgeopt.agent import batcher, service
from edgeopt.cli.agent import main

SIG, WHERE = signal.Signals[sys.argv.pop(1)], sys.argv.pop(1)
raised = []


def raise_once():
    if not raised and threading.current_thread() is threading.main_thread():
        raised.append(SIG)
        signal.raise_signal(SIG)  # the handler runs here, the lock still held


if WHERE == "window-queue":  # the inference loop taking a batch (get_batch holds the queue's lock)
    take = batcher.WindowQueue._take

    def _take(self, n):
        if self._windows:
            raise_once()
        return take(self, n)

    batcher.WindowQueue._take = _take
else:  # "event": the loop waiting for a model, inside Agent._stop.wait() (threading.Event.wait)
    class Event(threading.Event):
        def wait(self, timeout=None):
            with self._cond:  # as threading.Event.wait, with the signal raised under its lock
                raise_once()
                return self._flag or self._cond.wait(timeout)

    init = service.Agent.__init__

    def __init__(self, config):
        init(self, config)
        self._stop = Event()

    service.Agent.__init__ = __init__

main()
"""

TIMEOUT_S = 60.0  # generous: a healthy agent stops within [agent] shutdown_timeout_s (4 s)


def agent_config(tmp_path):
    return base_config(tmp_path, source=[{"type": "synthetic", "name": "s", "replay": "fast", "seed": 1}],
                       sink=[{"type": "jsonl", "path": str(tmp_path / "out.jsonl")}])


def run_agent(tmp_path, sig: signal.Signals, where: str) -> AgentProcess:
    return AgentProcess(tmp_path, agent_config(tmp_path), command=[sys.executable, "-c", RUN_AGENT, sig.name, where])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_while_the_loop_holds_the_window_queue_lock(tmp_path, imu_model, sig):
    StateDir(tmp_path / "state").install(imu_model["artifact"])
    agent = run_agent(tmp_path, sig, "window-queue")
    assert agent.communicate(timeout=TIMEOUT_S) == 0, agent.err
    assert "stopped after" in agent.err
    assert agent.status()["state"]["status"] == "stopped"


def test_stop_signal_while_the_loop_waits_for_a_model(tmp_path):
    agent = run_agent(tmp_path, signal.SIGTERM, "event")  # no model installed: the loop polls for one
    assert agent.communicate(timeout=TIMEOUT_S) == 0, agent.err
    assert "stopped after" in agent.err


def stderr_until(agent: AgentProcess, text: str, count: int, timeout: float) -> str:
    """The agent's stderr read until ``text`` has appeared ``count`` times (or the timeout, or its exit)."""
    seen, deadline = b"", time.monotonic() + timeout
    fd = agent.proc.stderr.fileno()
    while seen.decode(errors="replace").count(text) < count and time.monotonic() < deadline:
        if select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            seen += chunk
    return seen.decode(errors="replace")


def test_reload_signal_while_the_loop_holds_the_window_queue_lock(tmp_path, imu_model):
    StateDir(tmp_path / "state").install(imu_model["artifact"])
    agent = run_agent(tmp_path, signal.SIGHUP, "window-queue")
    try:  # the configuration is read again and the model runs in a new pipeline
        err = stderr_until(agent, "running model", 2, TIMEOUT_S)
        assert "reloading with" in err and err.count("running model") == 2, err
    finally:
        assert agent.stop() == 0, agent.err
