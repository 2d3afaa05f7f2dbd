"""The ``edgeopt`` command line.

Subcommands are imported only when they run (the table below holds their one-line help), so
``edgeopt --help`` starts fast. This is the only place where exceptions become one-line messages:
``EdgeoptError`` → ``edgeopt: error: ...`` with its exit code (1 check failed, 2 bad input); click's
usage errors → one line naming the option (exit 2); anything else is a bug (exit 3) with a one-line
hint. ``--debug`` or EDGEOPT_DEBUG=1 prints the traceback first and changes nothing else. SIGTERM and
SIGHUP interrupt like SIGINT (exit 128 + the signal), so every staging and temporary directory is
removed on the way out.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import traceback
from collections.abc import Iterator

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

EXIT_INTERNAL = 3  # a bug in edgeopt, not the user's input (0 ok, 1 a check failed, 2 bad input)
INTERRUPTING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # exit 128 + the signal: 130, 143, 129


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


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, like SIGINT's KeyboardInterrupt: every ``with``
    block (staging directory, temporary directory) cleans up on the way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class InterruptSignals:
    """While armed, SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` in the main thread.

    Only the first one raises, and only while the command runs: a second Ctrl-C or a supervisor
    repeating its SIGTERM must not cut the cleanup short, nor a late one turn a finished run into a
    traceback. A command that handles signals itself (the agent, ``fleet serve``) installs its own
    handlers over these. Outside the main thread (a library caller), nothing is installed."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.armed = False
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        self.received.append(signum)
        if self.armed and len(self.received) == 1:
            stop_descendants()
            raise Interrupted(signum)

    def __enter__(self) -> InterruptSignals:
        try:
            self._previous = {s: signal.signal(s, self._handler) for s in INTERRUPTING}
            self.armed = True
        except ValueError:  # not the main thread
            pass
        return self

    def __exit__(self, *exc_info) -> None:
        self.armed = False
        for s, old in self._previous.items():
            signal.signal(s, old)

    def exit_code(self, exc: BaseException | None = None) -> tuple[str, int] | None:
        """('interrupted (SIGTERM)', 143) when the run was interrupted (also when a toolchain turned
        the interruption into an error of its own on the way out), else None."""
        signum = getattr(exc, "signum", None) or (self.received[0] if self.received else None)
        if signum is None and isinstance(exc, KeyboardInterrupt | click.exceptions.Abort):
            signum = signal.SIGINT
        return None if signum is None else (f"interrupted ({signal.Signals(signum).name})", 128 + signum)


def stop_descendants(grace_s: float = 5.0) -> None:
    """Stop every process this one started, and theirs (a linker under TVM, a quantizer's worker):
    SIGTERM, then SIGKILL for what is still running after ``grace_s``. A terminal's Ctrl-C reaches
    the whole process group, but `timeout`, `docker stop` and systemd signal only this process, and
    background children ignore SIGINT; a child outliving it would write into the temporary directory
    after it was removed (and onto the terminal after the last line). Linux (/proc); elsewhere
    nothing is done."""
    import time

    try:
        stats = {int(e.name): _proc_stat(int(e.name)) for e in os.scandir("/proc") if e.name.isdigit()}
    except OSError:
        return
    parents = {pid: int(fields[1]) for pid, fields in stats.items() if fields}
    found, frontier = [], [os.getpid()]
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier]
        found += children
        frontier = children
    for pid in found:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while found and time.monotonic() < deadline:
        found = [pid for pid in found if _running(pid)]
        time.sleep(0.01)
    for pid in found:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: [state, ppid, ...] (None: gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie writes nothing)."""
    fields = _proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def main(argv: list[str] | None = None, command: click.Command | None = None, prog_name: str = "edgeopt") -> None:
    """Run ``command`` (default: the ``edgeopt`` group) and turn errors into one-line messages and
    exit codes; other entry points (``edgeopt-agent``) pass their own command and name. ``--debug``
    (or EDGEOPT_DEBUG=1) prints the traceback before that line; the exit code stays the same."""
    command = command or cli
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or debug_enabled()
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # before any import of onnxruntime: see no_telemetry
    with InterruptSignals() as signals, private_temp_dir():
        code = _run(command, args, prog_name, debug, signals)
    sys.exit(code)


@contextlib.contextmanager
def private_temp_dir() -> Iterator[None]:
    """Every temporary file of this run — edgeopt's own and its toolchains' (ONNX Runtime writes a
    telemetry session file ``.ses`` into $TMPDIR at import; TVM, gcc and the quantizers their scratch
    files) — goes under one ``edgeopt-*`` directory that is removed at exit, interrupted or not.
    Children (a cross-linker, a self-test) inherit it through TMPDIR."""
    import shutil
    import tempfile

    try:
        path = tempfile.mkdtemp(prefix="edgeopt-")
    except OSError:  # no writable temporary directory: whoever needs one will say so
        yield
        return
    saved_env, saved_default = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = path, path
    try:
        yield
    finally:
        tempfile.tempdir = saved_default
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(path, ignore_errors=True)


def _run(command: click.Command, args: list[str], prog_name: str, debug: bool, signals: InterruptSignals) -> int:
    from edgeopt.errors import EdgeoptError, missing_dependency

    def fail(message: str, exit_code: int) -> int:
        if debug:
            traceback.print_exc()
        click.echo(f"{prog_name}: {message}", err=True)
        return exit_code

    try:
        try:
            return command.main(args=args, prog_name=prog_name, standalone_mode=False, obj={"debug": debug}) or 0
        finally:
            signals.armed = False  # from here on, a signal is noted, not raised
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        return fail(f"error: {usage_message(exc)}", exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        return fail(*signals.exit_code(exc))
    except EdgeoptError as exc:
        if interrupted := signals.exit_code():
            return fail(*interrupted)
        return fail(f"error: {exc}", exc.exit_code)
    except Exception as exc:
        if interrupted := signals.exit_code():
            return fail(*interrupted)
        # an optional toolchain this install lacks (e.g. onnx where only the `agent` extra is installed)
        command_name = " ".join([prog_name, *args[:1]]) if args and not args[0].startswith("-") else prog_name
        missing = missing_dependency(exc, f"'{command_name}'") if isinstance(exc, ModuleNotFoundError) else None
        if missing is not None:
            return fail(f"error: {missing}", missing.exit_code)
        first = (str(exc).strip().splitlines() or [""])[0]
        return fail(f"internal error: {type(exc).__name__}: {first} (a bug in edgeopt; "
                    f"{'the traceback is above' if debug else 'rerun with --debug for the traceback'})", EXIT_INTERNAL)
