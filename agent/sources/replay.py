"""Replay of recorded files: a sensor CSV or a .npy array of samples, at the recorded rate or as
fast as the pipeline takes them (with ``overflow = "block"`` nothing is dropped)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgeopt.agent.config import CsvSource, NpySource
from edgeopt.agent.sources.base import Source
from edgeopt.errors import UserInputError

TIMESTAMP_COLUMNS = ("t", "time", "timestamp")
LABEL_COLUMNS = ("label", "labels")
FAST_CHUNK = 4096


class _Replay(Source):
    cfg: CsvSource | NpySource

    def _load(self) -> tuple[list[str] | None, np.ndarray, np.ndarray | None]:
        """(channel names or None, samples [T, C] float32, recorded timestamps [T] or None)."""
        raise NotImplementedError

    def _run(self) -> None:
        names, samples, stamps = self._load()
        self.bind(names, samples.shape[1])
        rate = self.cfg.rate_hz or self.ctx.rate_hz
        if stamps is None:
            stamps = time.time() + np.arange(len(samples)) / rate
        span = (stamps[-1] - stamps[0] + 1.0 / rate) if len(stamps) else 0.0
        while not self.stopping.is_set():
            self._replay(samples, stamps, rate)
            if not self.cfg.loop or not len(samples):
                return
            stamps = stamps + span

    def _replay(self, samples: np.ndarray, stamps: np.ndarray, rate: float) -> None:
        recorded = self.cfg.replay == "recorded"
        chunk = max(1, int(rate * 0.02)) if recorded else FAST_CHUNK
        wall0, t0 = time.monotonic(), stamps[0] if len(stamps) else 0.0
        for i in range(0, len(samples), chunk):
            if recorded and not self.sleep_until(wall0 + (stamps[i] - t0)):
                return
            if self.stopping.is_set():
                return
            self.emit(samples[i:i + chunk], stamps[i:i + chunk])


class CsvReplaySource(_Replay):
    kind = "csv"
    cfg: CsvSource

    def _load(self):
        path = Path(self.cfg.path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise UserInputError(f"source '{self.name}': file not found: {path}") from None
        except UnicodeDecodeError:
            raise UserInputError(f"source '{self.name}': {path} is not a text CSV file") from None
        lines = [(n, ln) for n, ln in enumerate(text.splitlines(), 1) if ln.strip() and not ln.lstrip().startswith("#")]
        if not lines:
            raise UserInputError(f"source '{self.name}': {path} is empty")
        first = [c.strip() for c in lines[0][1].split(",")]
        has_header = not all(_is_number(c) for c in first)
        header = first if has_header else None
        rows = lines[1:] if has_header else lines
        width = len(first)
        ts_col = label_col = None
        if header:
            lowered = [h.lower() for h in header]
            wanted = [self.cfg.timestamp_column.lower()] if self.cfg.timestamp_column else list(TIMESTAMP_COLUMNS)
            ts_col = next((lowered.index(w) for w in wanted if w in lowered), None)
            if self.cfg.timestamp_column and ts_col is None:
                raise UserInputError(f"source '{self.name}': {path} has no column '{self.cfg.timestamp_column}' "
                                     f"(columns: {', '.join(header)})")
            label_col = next((lowered.index(w) for w in LABEL_COLUMNS if w in lowered), None)
        keep = [i for i in range(width) if i not in (ts_col, label_col)]
        values = np.empty((len(rows), width), np.float64)
        good = np.zeros(len(rows), bool)
        for k, (lineno, line) in enumerate(rows):
            cells = line.split(",")
            if len(cells) != width:
                self.count_malformed(1, f"{path}:{lineno}: expected {width} columns, found {len(cells)}")
                continue
            try:
                values[k] = [float(c) for c in cells]
            except ValueError:
                self.count_malformed(1, f"{path}:{lineno}: not a number in {line[:80]!r}")
                continue
            good[k] = True
        values = values[good]
        names = [header[i] for i in keep] if header else None
        stamps = values[:, ts_col] if ts_col is not None else None
        return names, values[:, keep].astype(np.float32), stamps


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


class NpyReplaySource(_Replay):
    kind = "npy"
    cfg: NpySource

    def _load(self):
        path = Path(self.cfg.path)
        try:
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise UserInputError(f"source '{self.name}': file not found: {path}") from None
        except (ValueError, OSError) as exc:
            raise UserInputError(f"source '{self.name}': {path} is not a readable .npy file ({exc})") from None
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.ndim != 2 or arr.dtype.kind not in "fiu":
            raise UserInputError(f"source '{self.name}': {path} holds {arr.dtype} {list(arr.shape)}; expected "
                                 f"numeric samples [T, C]")
        return None, arr.astype(np.float32, copy=False), None
