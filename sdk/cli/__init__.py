"""The ``edgeopt`` command line.

Subcommands are imported only when they run (the table below holds their one-line help), so
``edgeopt --help`` starts fast. This is the only place where exceptions become one-line messages:
``EdgeoptError`` → ``edgeopt: error: ...`` with its exit code (1 check failed, 2 bad input);
anything else is a bug and shows a one-line hint (its traceback with ``--debug`` or EDGEOPT_DEBUG=1,
which also makes unexpected errors propagate, as the test suite wants).
"""

from __future__ import annotations

import importlib
import os
import sys

import click

# name → (module:attribute, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("edgeopt.cli.convert:convert_cmd", "Compress, compile and validate an ONNX model into an artifact."),
    "inspect": ("edgeopt.cli.inspect:inspect_cmd", "Ops, parameters, size and target support of an ONNX model."),
    "bench": ("edgeopt.cli.bench:bench_cmd", "Latency and throughput of an artifact or model over a batch sweep."),
    "profiles": ("edgeopt.cli.profiles:profiles_cmd", "List and show hardware profiles."),
    "keys": ("edgeopt.cli.keys:keys_cmd", "Create and rotate the signing keys of a fleet repository."),
    "fleet": ("edgeopt.cli.fleet:fleet_cmd", "Publish models, run the fleet service, roll models out in waves."),
    "agent": ("edgeopt.agent.cli:agent_group", "Run the device agent, install it as a systemd service, install a model."),
}

EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug in edgeopt, not the user's input


def debug_enabled() -> bool:
    return os.environ.get("EDGEOPT_DEBUG", "") not in ("", "0")


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


def _version() -> str:
    from edgeopt import __version__

    return __version__


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks (same as EDGEOPT_DEBUG=1).")
@click.version_option(package_name="edgeopt", message="edgeopt %(version)s")
def cli(debug: bool) -> None:
    """edgeopt: shrink, compile, validate and ship ONNX models to edge devices.

    Exit codes: 0 ok, 1 a check failed (accuracy gate, fit, parity), 2 bad input or usage.
    """
    if debug:
        os.environ["EDGEOPT_DEBUG"] = "1"


def main(argv: list[str] | None = None, command: click.Command | None = None, prog_name: str = "edgeopt") -> None:
    """Run ``command`` (default: the ``edgeopt`` group) and turn errors into one-line messages and
    exit codes; other entry points (``edgeopt-agent``) pass their own command and name."""
    from edgeopt.errors import EdgeoptError, missing_dependency

    command = command or cli
    args = sys.argv[1:] if argv is None else argv
    if "--debug" in args:
        os.environ["EDGEOPT_DEBUG"] = "1"
    try:
        code = command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:  # usage errors: click prints them itself
        exc.show()
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo(f"{prog_name}: aborted", err=True)
        code = 130
    except EdgeoptError as exc:
        if debug_enabled():
            raise
        click.echo(f"{prog_name}: error: {exc}", err=True)
        code = exc.exit_code
    except KeyboardInterrupt:
        click.echo(f"{prog_name}: interrupted", err=True)
        code = 130
    except Exception as exc:
        if debug_enabled():
            raise
        # an optional toolchain this install lacks (e.g. onnx where only the `agent` extra is installed)
        command_name = " ".join([prog_name, *args[:1]]) if args and not args[0].startswith("-") else prog_name
        missing = missing_dependency(exc, f"'{command_name}'") if isinstance(exc, ModuleNotFoundError) else None
        if missing is not None:
            click.echo(f"{prog_name}: error: {missing}", err=True)
            sys.exit(missing.exit_code)
        first = (str(exc).strip().splitlines() or [""])[0]
        click.echo(f"{prog_name}: internal error: {type(exc).__name__}: {first} "
                   f"(a bug in edgeopt; rerun with --debug for the traceback)", err=True)
        code = EXIT_INTERNAL
    sys.exit(code or 0)

