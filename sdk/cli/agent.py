"""``edgeopt-agent --config agent.toml``: the device agent's entry point, without click.

The agent runs for months on boards where each MiB counts, so its entry point loads neither click nor
the ``edgeopt`` CLI: measured on the IMU benchmark, they held ~1.2 MiB of the running agent and its
inference worker (docs/benchmarks.md, "Issue 18, fourth pass"). The options are parsed with argparse
(which the agent's self-test loads anyway); errors become one line and an exit code as in every
``edgeopt`` command (``edgeopt.cli.failures``). ``edgeopt agent run`` (``edgeopt.cli.agent_commands``)
runs the same ``run_agent``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from edgeopt import __version__
from edgeopt.agent.config import load_config
from edgeopt.cli.failures import debug_enabled, run_guarded
from edgeopt.cli.interrupts import InterruptSignals, private_temp_dir

PROG = "edgeopt-agent"
DESCRIPTION = """Run the device agent: the model in the state directory's active slot, fed by the configured
sources, results to the configured sinks; MQTT state and telemetry; systemd notify and watchdog.
SIGTERM flushes the partial batch and exits 0; SIGHUP reloads the configuration. Exit codes: 0 stopped,
1 a source failed (exit_when_sources_end), 2 bad input, 3 a bug."""


def _logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="edgeopt-agent: %(levelname)s: %(message)s")
    logging.getLogger("paho").setLevel(logging.WARNING)


def run_agent(config_path: Path, debug: bool = False) -> int:
    """Load the configuration and run the agent until it is stopped; its exit code."""
    from edgeopt.agent.service import Agent  # lazy: numpy and the agent's machinery, not needed by --help

    config = load_config(config_path)
    _logging("debug" if debug else config.agent.log_level)
    agent = Agent(config)
    agent.install_signal_handlers()
    return agent.run()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as the edgeopt CLI's usage errors (exit 2)
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=DESCRIPTION)
    p.add_argument("-c", "--config", type=Path, required=True, metavar="PATH",
                   help="agent configuration (TOML); keys and defaults: docs/agent.md")
    p.add_argument("--debug", action="store_true", help="show tracebacks (same as EDGEOPT_DEBUG=1)")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def main(argv: list[str] | None = None) -> None:
    """The ``edgeopt-agent`` console script (same as ``edgeopt agent run``)."""
    args = sys.argv[1:] if argv is None else argv
    options = parser().parse_args(args)
    debug = options.debug or debug_enabled()
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # before any import of onnxruntime: see no_telemetry
    with InterruptSignals() as signals, private_temp_dir():
        code = run_guarded(lambda: run_agent(options.config, debug), args, PROG, debug, signals)
    sys.exit(code)
