"""Replay of recorded files: a sensor CSV or a .npy array of samples, at the recorded rate or as
fast as the pipeline takes them (with ``overflow = "block"`` nothing is dropped).

Files are streamed, never loaded whole: a reader yields blocks of at most ``CHUNK_SAMPLES`` samples
(a .npy is read block by block from its data offset; a CSV a block of lines at a time), and the
timestamps of a file that has none are computed per block, so the agent's memory does not depend on
the file's length. The windows are the same as a whole-file replay's (the windower keeps what the
next window needs across blocks). A looping replay reads the file again; malformed rows are counted
on the first pass only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgeopt.agent.config import CsvSource, NpySource
from edgeopt.agent.sources.base import Source
from edgeopt.errors import UserInputError

TIMESTAMP_COLUMNS = ("t", "time", "timestamp")
LABEL_COLUMNS = ("label", "labels")
CHUNK_SAMPLES = 4096  # samples per block read from the file (and per emit in a fast replay)

# a block: (samples [n, C] float32, recorded timestamps [n] float64 or None)
Block = tuple[np.ndarray, np.ndarray | None]


class _Replay(Source):
    cfg: CsvSource | NpySource

    def _open(self) -> tuple[list[str] | None, int]:
        """Check the file and read its head: (channel names or None, channels per sample)."""
        raise NotImplementedError

    def _blocks(self, first_pass: bool) -> Iterator[Block]:
        """The file's samples from the start, block by block."""
        raise NotImplementedError

    def _run(self) -> None:
        names, channels = self._open()
        self.bind(names, channels)
        rate = self.cfg.rate_hz or self.ctx.rate_hz
        start = time.time()  # the first sample's time when the file records none
        shift, first_pass = 0.0, True
        while not self.stopping.is_set():
            span = self._replay(self._blocks(first_pass), rate, start, shift)
            if not self.cfg.loop or span is None:
                return
            shift, first_pass = shift + span, False

    def _replay(self, blocks: Iterator[Block], rate: float, start: float, shift: float) -> float | None:
        """One pass over the file; the time it spans (first to last sample, plus one sample period),
        None when it is empty or the replay was stopped."""
        recorded = self.cfg.replay == "recorded"
        step = max(1, int(rate * 0.02)) if recorded else CHUNK_SAMPLES
        wall0 = time.monotonic()
        t0 = t_last = None
        offset = 0  # samples replayed so far in this pass
        for samples, stamps in blocks:
            if stamps is None:  # the same values a whole-file np.arange would give
                stamps = start + np.arange(offset, offset + len(samples)) / rate
            offset += len(samples)
            if not len(samples):
                continue
            if shift:
                stamps = stamps + shift
            if t0 is None:
                t0 = stamps[0]
            t_last = stamps[-1]
            for i in range(0, len(samples), step):
                if recorded and not self.sleep_until(wall0 + (stamps[i] - t0)):
                    return None
                if self.stopping.is_set():
                    return None
                self.emit(samples[i:i + step], stamps[i:i + step])
        if t0 is None:
            return None
        return t_last - t0 + 1.0 / rate


class CsvReplaySource(_Replay):
    """Rows ``v0,v1,...`` with an optional header naming the channels, a timestamp column (seconds)
    and a label column (ignored). Blank lines and ``#`` comments are skipped; a malformed row (wrong
    number of fields, not a number) is counted and skipped."""

    kind = "csv"
    cfg: CsvSource

    def _open(self):
        path = Path(self.cfg.path)
        lines = self._lines()
        try:
            lineno, first_line = next(lines)
        except StopIteration:
            raise UserInputError(f"source '{self.name}': {path} is empty") from None
        finally:
            lines.close()
        first = [c.strip() for c in first_line.split(",")]
        header = None if all(_is_number(c) for c in first) else first
        self._width = len(first)
        self._data_from = lineno + 1 if header else lineno  # the first data row's line number
        self._ts_col = label_col = None
        if header:
            lowered = [h.lower() for h in header]
            wanted = [self.cfg.timestamp_column.lower()] if self.cfg.timestamp_column else list(TIMESTAMP_COLUMNS)
            self._ts_col = next((lowered.index(w) for w in wanted if w in lowered), None)
            if self.cfg.timestamp_column and self._ts_col is None:
                raise UserInputError(f"source '{self.name}': {path} has no column '{self.cfg.timestamp_column}' "
                                     f"(columns: {', '.join(header)})")
            label_col = next((lowered.index(w) for w in LABEL_COLUMNS if w in lowered), None)
        self._keep = [i for i in range(self._width) if i not in (self._ts_col, label_col)]
        return ([header[i] for i in self._keep] if header else None), len(self._keep)

    def _lines(self) -> Iterator[tuple[int, str]]:
        """(line number, line) of every line that is not blank or a comment, read as the file goes."""
        path = Path(self.cfg.path)
        try:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    stripped = line.strip()
                    if stripped and not stripped.startswith("#"):
                        yield lineno, line.rstrip("\r\n")
        except FileNotFoundError:
            raise UserInputError(f"source '{self.name}': file not found: {path}") from None
        except UnicodeDecodeError:
            raise UserInputError(f"source '{self.name}': {path} is not a text CSV file") from None

    def _blocks(self, first_pass):
        rows: list[tuple[int, str]] = []
        for lineno, line in self._lines():
            if lineno < self._data_from:
                continue
            rows.append((lineno, line))
            if len(rows) == CHUNK_SAMPLES:
                yield self._parse(rows, first_pass)
                rows = []
        if rows:
            yield self._parse(rows, first_pass)

    def _parse(self, rows: list[tuple[int, str]], count: bool) -> Block:
        """Rows → (samples, recorded timestamps or None); malformed rows are skipped (and counted
        when ``count``)."""
        width = self._width
        values = None
        if all(line.count(",") == width - 1 for _, line in rows):
            try:  # the usual case: every row well formed, parsed by numpy in one call
                values = np.array(",".join(line for _, line in rows).split(","), np.float64).reshape(-1, width)
            except ValueError:
                values = None
        if values is None:  # find the bad rows, one at a time
            good = []
            for lineno, line in rows:
                cells = line.split(",")
                if len(cells) != width:
                    if count:
                        self.count_malformed(1, f"{self.cfg.path}:{lineno}: expected {width} columns, "
                                                f"found {len(cells)}")
                    continue
                try:
                    good.append([float(c) for c in cells])
                except ValueError:
                    if count:
                        self.count_malformed(1, f"{self.cfg.path}:{lineno}: not a number in {line[:80]!r}")
            values = np.array(good, np.float64).reshape(-1, width)
        stamps = values[:, self._ts_col] if self._ts_col is not None else None
        return values[:, self._keep].astype(np.float32), stamps


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


class NpyReplaySource(_Replay):
    """A .npy array of samples [T, C] (or [T]) of any numeric dtype, read a block at a time from its
    data offset (``np.load`` would read it whole; a memory map would leave every page it touched
    resident)."""

    kind = "npy"
    cfg: NpySource

    def _open(self):
        path = Path(self.cfg.path)
        where = f"source '{self.name}': {path}"
        try:
            with open(path, "rb") as f:
                try:
                    version = np.lib.format.read_magic(f)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read_header is None:
                        raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
                    shape, fortran, dtype = read_header(f)
                except ValueError as exc:
                    raise UserInputError(f"{where} is not a readable .npy file ({exc})") from None
                self._offset = f.tell()
        except FileNotFoundError:
            raise UserInputError(f"source '{self.name}': file not found: {path}") from None
        if len(shape) not in (1, 2) or dtype.hasobject or dtype.kind not in "fiu":
            raise UserInputError(f"{where} holds {dtype} {list(shape)}; expected numeric samples [T, C]")
        self._length, self._channels = shape[0], (shape[1] if len(shape) == 2 else 1)
        self._dtype, self._fortran = dtype, fortran and len(shape) == 2
        size = path.stat().st_size
        need = self._offset + self._length * self._channels * dtype.itemsize
        if size < need:
            raise UserInputError(f"{where} is truncated: {size} bytes, its header promises {need}")
        return None, self._channels

    def _blocks(self, first_pass):
        length, channels, dtype = self._length, self._channels, self._dtype
        with open(self.cfg.path, "rb") as f:
            for start in range(0, length, CHUNK_SAMPLES):
                n = min(CHUNK_SAMPLES, length - start)
                if self._fortran:  # column-major: each channel's run of samples lies apart
                    cols = []
                    for c in range(channels):
                        f.seek(self._offset + (c * length + start) * dtype.itemsize)
                        cols.append(np.fromfile(f, dtype, n))
                    block = np.stack(cols, axis=1)
                else:
                    f.seek(self._offset + start * channels * dtype.itemsize)
                    block = np.fromfile(f, dtype, n * channels).reshape(n, channels)
                yield block.astype(np.float32, copy=False), None
