"""The ``edgeopt`` command line.

Subcommands are imported only when they run (the table below holds their one-line help), so
``edgeopt --help`` starts fast. Exceptions become one-line messages here (``edgeopt.cli.failures``,
which ``edgeopt-agent`` shares): ``EdgeoptError`` → ``edgeopt: error: ...`` with its exit code (1 check
failed, 2 bad input); click's usage errors → one line naming the option (exit 2); anything else is a
bug (exit 3) with a one-line hint. ``--debug`` or EDGEOPT_DEBUG=1 prints the traceback first and
changes nothing else. SIGTERM and SIGHUP interrupt like SIGINT (exit 128 + the signal), so every
staging and temporary directory is removed on the way out.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from edgeopt.cli.failures import EXIT_INTERNAL, debug_enabled, fail, run_guarded
from edgeopt.cli.interrupts import InterruptSignals, private_temp_dir

# name → (module:attribute, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("edgeopt.cli.convert:convert_cmd", "Compress, compile and validate an ONNX model into an artifact."),
    "inspect": ("edgeopt.cli.inspect:inspect_cmd", "Ops, parameters, size and target support of an ONNX model."),
    "analyze": ("edgeopt.cli.analyze:analyze_cmd", "Rank a model's nodes by what INT8 quantization of each costs."),
    "optimize": ("edgeopt.cli.optimize:optimize_cmd", "Convert with every recipe a board takes; the Pareto front and the best."),
    "bench": ("edgeopt.cli.bench:bench_cmd", "Latency and throughput of an artifact or model over a batch sweep."),
    "profiles": ("edgeopt.cli.profiles:profiles_cmd", "List and show hardware profiles."),
    "keys": ("edgeopt.cli.keys:keys_cmd", "Create and rotate the signing keys of a fleet repository."),
    "fleet": ("edgeopt.cli.fleet:fleet_cmd", "Publish models, run the fleet service, roll models out in waves."),
    "agent": ("edgeopt.cli.agent_commands:agent_group", "Run the device agent, install it as a systemd service, install a model."),
}

__all__ = ["COMMANDS", "EXIT_INTERNAL", "cli", "debug_enabled", "debug_requested", "main", "usage_message"]


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, _, attr = COMMANDS[name][0].partition(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in self.list_commands(ctx)])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks (same as EDGEOPT_DEBUG=1).")
@click.version_option(package_name="edgeopt", message="edgeopt %(version)s")
def cli(debug: bool) -> None:
    """edgeopt: shrink, compile, validate and ship ONNX models to edge devices.

    Exit codes: 0 ok, 1 a check failed (accuracy gate, fit, parity), 2 bad input or usage, 3 an internal
    error (a bug); interrupted by SIGINT / SIGTERM / SIGHUP: 130 / 143 / 129, nothing left behind.
    """


def debug_requested(ctx: click.Context | None = None) -> bool:
    """Whether this run was started with --debug / EDGEOPT_DEBUG=1 (for a command that behaves
    differently then, e.g. leaving the toolchains' native output on the terminal)."""
    ctx = ctx or click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    return bool(isinstance(getattr(root, "obj", None), dict) and root.obj.get("debug")) or debug_enabled()


def usage_message(exc: click.ClickException) -> str:
    """Click's usage error as one line that starts with the option at fault: ``--batch: must be >= 1``."""
    if isinstance(exc, click.BadParameter) and not isinstance(exc, click.MissingParameter):
        hint = exc.param_hint
        if hint is None and isinstance(exc.param, click.Option):
            hint = max(exc.param.opts, key=len)  # the long form: --batch, not -b
        elif hint is None and exc.param is not None:
            hint = exc.param.human_readable_name
        text = f"{hint if isinstance(hint, str) else ' / '.join(hint)}: {exc.message}" if hint else exc.message
    else:
        text = exc.format_message()
    text = " ".join(text.split()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    return f"{text} (see '{ctx.command_path} --help')" if ctx is not None else text


def main(argv: list[str] | None = None) -> None:
    """Run ``edgeopt ARGS`` and turn errors into one-line messages and exit codes. ``--debug`` (or
    EDGEOPT_DEBUG=1) prints the traceback before that line; the exit code stays the same."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or debug_enabled()
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # before any import of onnxruntime: see no_telemetry
    with InterruptSignals() as signals, private_temp_dir():
        code = _run(cli, args, "edgeopt", debug, signals)
    sys.exit(code)


def _run(command: click.Command, args: list[str], prog_name: str, debug: bool, signals: InterruptSignals) -> int:
    def body() -> int:
        try:
            return command.main(args=args, prog_name=prog_name, standalone_mode=False, obj={"debug": debug}) or 0
        except click.exceptions.Exit as exc:
            return exc.exit_code
        except click.ClickException as exc:
            return fail(prog_name, f"error: {usage_message(exc)}", exc.exit_code, debug)
        except click.exceptions.Abort:  # click's word for Ctrl-C at a prompt
            raise KeyboardInterrupt from None

    return run_guarded(body, args, prog_name, debug, signals)
