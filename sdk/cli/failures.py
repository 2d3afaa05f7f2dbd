"""How every entry point (``edgeopt``, ``edgeopt-agent``) turns an exception into one line and an exit
code: ``EdgeoptError`` → ``PROG: error: ...`` with its exit code (1 a check failed, 2 bad input); an
interruption → ``PROG: interrupted (SIGTERM)``, 128 + the signal; a missing optional package → the
``pip install`` that brings it; anything else is a bug (exit 3) with a one-line hint. ``--debug``
(or EDGEOPT_DEBUG=1) prints the traceback first and changes nothing else. No click here: the agent's
entry point uses it without loading click (``edgeopt.cli.app`` adds click's usage errors)."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

from edgeopt.cli.interrupts import InterruptSignals
from edgeopt.errors import EdgeoptError, missing_dependency

EXIT_INTERNAL = 3  # a bug in edgeopt, not the user's input (0 ok, 1 a check failed, 2 bad input)


def debug_enabled() -> bool:
    return os.environ.get("EDGEOPT_DEBUG", "") not in ("", "0")


def fail(prog_name: str, message: str, exit_code: int, debug: bool) -> int:
    """Print ``PROG: message`` on stderr (the traceback first with ``debug``); return ``exit_code``."""
    if debug:
        traceback.print_exc()
    print(f"{prog_name}: {message}", file=sys.stderr, flush=True)
    return exit_code


def run_guarded(body: Callable[[], int | None], args: list[str], prog_name: str, debug: bool,
                signals: InterruptSignals) -> int:
    """``body()``'s exit code (None: 0), or the exit code of the failure it raised, said in one line."""
    try:
        try:
            return body() or 0
        finally:
            signals.armed = False  # from here on, a signal is noted, not raised
    except KeyboardInterrupt as exc:
        return fail(prog_name, *signals.exit_code(exc), debug)  # type: ignore[misc]
    except EdgeoptError as exc:
        if interrupted := signals.exit_code():
            return fail(prog_name, *interrupted, debug)
        return fail(prog_name, f"error: {exc}", exc.exit_code, debug)
    except Exception as exc:
        if interrupted := signals.exit_code():
            return fail(prog_name, *interrupted, debug)
        # an optional toolchain this install lacks (e.g. onnx where only the `agent` extra is installed)
        command_name = " ".join([prog_name, *args[:1]]) if args and not args[0].startswith("-") else prog_name
        missing = missing_dependency(exc, f"'{command_name}'") if isinstance(exc, ModuleNotFoundError) else None
        if missing is not None:
            return fail(prog_name, f"error: {missing}", missing.exit_code, debug)
        first = (str(exc).strip().splitlines() or [""])[0]
        return fail(prog_name, f"internal error: {type(exc).__name__}: {first} (a bug in edgeopt; "
                               f"{'the traceback is above' if debug else 'rerun with --debug for the traceback'})",
                    EXIT_INTERNAL, debug)
