"""How a command ends when it is told to stop: SIGINT, SIGTERM (``timeout``, CI runners, ``docker stop``)
and SIGHUP all interrupt it the same way — the processes it started are stopped, every ``with`` block
(staging directory, temporary directory) cleans up on the way out, the exit code is 128 + the signal —
and every temporary file of the run lives in one directory removed at exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

INTERRUPTING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # exit 128 + the signal: 130, 143, 129


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
        if signum is None and isinstance(exc, KeyboardInterrupt):
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
