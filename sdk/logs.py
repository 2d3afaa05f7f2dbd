"""What the toolchains print: off the terminal under ``-q``, into ``--log-file`` when one is given.

Toolchains talk in two ways. Through Python logging and warnings: ONNX Runtime's quantizers log every
node at INFO (one calls ``logging.basicConfig`` when imported), coremltools and absl log warnings,
TVM's ONNX front end warns through ``warnings``. And from C/C++ straight to file descriptors 1 and 2:
LLVM ("'+x' is not a recognized feature for this target"), TVM's and ONNX Runtime's native loggers.

``session`` routes the first kind: warnings and above to the terminal unless quiet, everything from
INFO up to the log file. ``native_output`` catches the second kind around a toolchain call and logs
each line as a warning of ``edgeopt.toolchain.<name>`` once the call returns, so it lands in the same
places and never in the middle of a progress bar. Python's own writes (the progress bar, edgeopt's
messages) keep going to the terminal meanwhile.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from edgeopt.errors import UserInputError

_capture_native = [False]  # set by ``session``: a library caller's process is left as it is
_in_session = [False]


def in_session() -> bool:
    """Whether a command routes the logs (then nobody else should change logging levels)."""
    return _in_session[0]


class _Terminal(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record comes (tests and ``native_output`` swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def session(quiet: bool, log_file: Path | None = None, capture_native: bool = True) -> Iterator[None]:
    """Route third-party logs for one command; restores the logging set-up it found on exit.
    ``capture_native`` False (``--debug``) leaves native output alone, so a crash's last words show."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, _capture_native[0], _in_session[0]
    terminal = _Terminal(logging.CRITICAL + 1 if quiet else logging.WARNING)
    terminal.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    handlers: list[logging.Handler] = [terminal]
    if log_file is not None:
        try:
            to_file = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            raise UserInputError(f"--log-file {log_file}: cannot write it: {exc.strerror or exc}") from None
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(to_file)
    root.handlers[:] = handlers  # also keeps ONNX Runtime's import-time basicConfig from adding its own
    root.setLevel(logging.INFO if log_file is not None else logging.WARNING)
    logging.captureWarnings(True)
    saved_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    _capture_native[0], _in_session[0] = capture_native, True
    try:
        yield
    finally:
        warnings.formatwarning = saved_format
        logging.captureWarnings(False)
        for handler in handlers[1:]:
            handler.close()
        root.handlers[:], root.level, _capture_native[0], _in_session[0] = saved


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A Python warning as one log line: 'UserWarning: Renaming name input.1 to input_1 (onnx_frontend.py:6414)'."""
    return f"{category.__name__}: {message} ({os.path.basename(filename)}:{lineno})"


def _terminal_stream(fd: int, current):
    """A Python stream on a copy of ``fd`` for ``current`` (sys.stdout / sys.stderr) to write to while
    ``fd`` itself is captured; None when ``current`` does not write to ``fd`` (a test's StringIO)."""
    try:
        if current.fileno() != fd:
            return None
    except (AttributeError, OSError, ValueError):
        return None
    current.flush()
    return open(os.dup(fd), "w", buffering=1, encoding=current.encoding, errors=current.errors)


@contextlib.contextmanager
def python_prints(name: str) -> Iterator[None]:
    """Catch what Python code prints to ``sys.stdout`` during the block (ONNX Runtime's entropy and
    percentile calibrators print their progress there, which would corrupt ``--json`` output) and log
    it afterwards at INFO as ``edgeopt.toolchain.<name>``."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        logger = logging.getLogger(f"edgeopt.toolchain.{name}")
        for line, repeats in _runs(line.rstrip() for line in buffer.getvalue().splitlines() if line.strip()):
            logger.info(line if repeats == 1 else f"{line} (x{repeats})")


@contextlib.contextmanager
def native_output(name: str) -> Iterator[None]:
    """Catch what native code writes to file descriptors 1 and 2 during the block and log it afterwards
    as warnings of ``edgeopt.toolchain.<name>`` (only inside a ``session``)."""
    if not _capture_native[0]:
        yield
        return
    streams = {1: _terminal_stream(1, sys.stdout), 2: _terminal_stream(2, sys.stderr)}
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    old_stdout, old_stderr = sys.stdout, sys.stderr
    with tempfile.TemporaryFile() as captured:
        try:
            for fd in (1, 2):
                os.dup2(captured.fileno(), fd)
            sys.stdout = streams[1] or sys.stdout
            sys.stderr = streams[2] or sys.stderr
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            sys.stdout, sys.stderr = old_stdout, old_stderr
            for fd in (1, 2):
                os.dup2(saved[fd], fd)
                os.close(saved[fd])
            for stream in streams.values():
                if stream is not None:
                    stream.close()
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            logger = logging.getLogger(f"edgeopt.toolchain.{name}")
            for line, repeats in _runs(line.rstrip() for line in text.splitlines() if line.strip()):
                logger.warning(line if repeats == 1 else f"{line} (x{repeats})")


def _runs(lines) -> list[tuple[str, int]]:
    """Consecutive equal lines as (line, count): LLVM repeats its warning once per compiled function."""
    runs: list[tuple[str, int]] = []
    for line in lines:
        if runs and runs[-1][0] == line:
            runs[-1] = (line, runs[-1][1] + 1)
        else:
            runs.append((line, 1))
    return runs
