"""Windowing and preprocessing: a source's samples → normalized model-shaped windows.

A ``Windower`` belongs to one source. It maps the source's channels onto the model's channel order,
normalizes each channel, handles NaN/Inf samples by the configured policy, and cuts windows of
``window`` samples every ``hop`` samples, laid out [C, T] or [T, C] as the manifest says. Windows get
consecutive sequence numbers per source, dropped ones included, so a gap in the ids is always a
counted drop.

Windows travel in blocks (``WindowBlock``: the windows one push completed, as columns and one array)
rather than one object each: the per-window work is numpy's, and a batch is a slice of a block.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeopt.agent.profile import Lap
from edgeopt.errors import UserInputError


@dataclass(frozen=True)
class Preprocessing:
    """The manifest's preprocessing, resolved against the model input (see converters/preprocessing.py)."""

    window: int
    hop: int
    channels_first: bool
    channels: int
    channel_names: tuple[str, ...] | None
    mean: np.ndarray | None
    std: np.ndarray | None
    sample_rate_hz: float | None

    @property
    def window_shape(self) -> tuple[int, int]:
        """One window as the windower lays it out: (C, T) or (T, C)."""
        return (self.channels, self.window) if self.channels_first else (self.window, self.channels)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], sample_shape: tuple, window: int = 0, hop: int = 0,
                      where: str = "manifest") -> Preprocessing:
        pre = manifest.get("preprocessing") or {}
        layout = pre.get("layout")
        dims = [int(d) for d in sample_shape]
        if len(dims) == 1:
            layout, n_ch, t = "channels_last", 1, dims[0]
        elif len(dims) == 2:
            layout = layout or ("channels_first" if dims[0] <= dims[1] else "channels_last")
            n_ch, t = (dims[0], dims[1]) if layout == "channels_first" else (dims[1], dims[0])
        else:
            raise UserInputError(f"{where}: model input {dims} is not a sensor window ([C, T], [T, C] or [T])")
        win = window or pre.get("window") or t
        if win != t:
            raise UserInputError(f"{where}: window {win} does not match the model input's {t} samples")
        step = hop or pre.get("hop") or win
        norm = pre.get("normalization")
        names = pre.get("channels")
        return cls(win, int(step), layout == "channels_first", n_ch, tuple(names) if names else None,
                   None if not norm else np.asarray(norm["mean"], np.float32),
                   None if not norm else np.asarray(norm["std"], np.float32),
                   pre.get("sample_rate_hz"))


@dataclass(slots=True)
class WindowBlock:
    """Consecutive windows of one source, in order: what a windower cuts from one push, or a slice of
    it. One entry per window in each column (``seq``, ``t_start``, ``t_end``) and one row of ``data``
    [k, C, T] or [k, T, C] (float32, C-contiguous, so a run of rows is a model batch as it is).
    Sequence numbers may have gaps: windows dropped for NaN samples keep their number."""

    source: str
    seq: np.ndarray      # int64 [k]
    t_start: np.ndarray  # float64 [k]: timestamp of the window's first sample
    t_end: np.ndarray    # float64 [k]: timestamp of its last sample
    data: np.ndarray     # float32 [k, *window shape]

    @classmethod
    def empty(cls, source: str, window_shape: tuple[int, ...]) -> WindowBlock:
        return cls(source, np.empty(0, np.int64), np.empty(0), np.empty(0), np.empty((0, *window_shape), np.float32))

    def __len__(self) -> int:
        return len(self.seq)

    def __getitem__(self, rows: slice) -> WindowBlock:
        """The windows ``rows`` (a slice: the columns are views, nothing is copied)."""
        return WindowBlock(self.source, self.seq[rows], self.t_start[rows], self.t_end[rows], self.data[rows])

    def window_id(self, i: int) -> str:
        return f"{self.source}:{self.seq[i]}"


_NO_DATA = np.empty((0,), np.float32)


class WindowBatch:
    """The windows of one inference call: blocks in queue order (several sources may be mixed, each
    block holds one source's windows)."""

    def __init__(self, blocks: list[WindowBlock]):
        self.blocks = blocks
        self._len = sum(len(b) for b in blocks)

    def __len__(self) -> int:
        return self._len

    @property
    def data(self) -> np.ndarray:
        """The model input [n, *window shape]: a view when the batch is one block's rows, else one copy."""
        if len(self.blocks) == 1:
            return self.blocks[0].data
        return np.concatenate([b.data for b in self.blocks])

    def split(self, n: int) -> list[WindowBatch]:
        """The windows in batches of ``n`` (the last one shorter), in order; block slices, no copies."""
        parts: list[WindowBatch] = []
        current: list[WindowBlock] = []
        room = n
        for block in self.blocks:
            start = 0
            while start < len(block):
                piece = block[start:start + room]
                current.append(piece)
                start += len(piece)
                room -= len(piece)
                if room == 0:
                    parts.append(WindowBatch(current))
                    current, room = [], n
        if current:
            parts.append(WindowBatch(current))
        return parts

    def labels(self) -> WindowBatch:
        """The same windows without their data (ids and timestamps only): what the result writer needs,
        so that queued results do not keep the windows' samples alive."""
        return WindowBatch([WindowBlock(b.source, b.seq, b.t_start, b.t_end, _NO_DATA) for b in self.blocks])

    def describe(self) -> str:
        """'first id ... last id', for log messages."""
        first, last = self.blocks[0], self.blocks[-1]
        return f"{first.window_id(0)} ... {last.window_id(len(last) - 1)}"


def channel_map(source: str, source_names: list[str] | None, source_count: int | None,
                pre: Preprocessing) -> list[int] | None:
    """Indices of the model's channels in the source's rows (None: already in the model's order).

    Names are matched when both sides name their channels; otherwise the counts must agree."""
    if source_names and pre.channel_names:
        missing = [c for c in pre.channel_names if c not in source_names]
        if missing:
            raise UserInputError(f"source '{source}': has channels {', '.join(source_names)}; the model needs "
                                 f"{', '.join(pre.channel_names)} (missing {', '.join(missing)})")
        index = [source_names.index(c) for c in pre.channel_names]
        return None if index == list(range(len(source_names))) else index
    count = len(source_names) if source_names else source_count
    if count is not None and count != pre.channels:
        raise UserInputError(f"source '{source}': sends {count} channels, the model takes {pre.channels}")
    return None


class Windower:
    """Cuts one source's samples into windows. Samples wait in a buffer laid out like the windows
    ([C, n] for [C, T] windows, [n, C] for [T, C]), so a window is a strided view of it and a block
    of windows is one contiguous copy."""

    def __init__(self, source: str, pre: Preprocessing, nan_policy: str = "drop",
                 index: list[int] | None = None):
        self.source = source
        self.pre = pre
        self.nan_policy = nan_policy
        self.index = index
        self.seq = 0
        self.nan_windows = 0
        self.samples_in = 0
        self._time_axis = 1 if pre.channels_first else 0
        self._buf = np.empty((pre.channels, 0) if pre.channels_first else (0, pre.channels), np.float32)
        self._ts = np.empty(0, np.float64)
        self._bad = np.empty(0, bool)
        self._last_finite = np.zeros(pre.channels, np.float32)
        self._mean_per_value = self._std_per_value = np.empty(0, np.float32)  # see _normalize
        self._skip = 0
        self._lock = threading.Lock()

    def push(self, samples: np.ndarray, timestamps: np.ndarray, lap: Lap | None = None) -> WindowBlock:
        """Add samples [n, source channels] with their timestamps [n]; return the windows completed
        (possibly none). ``lap``: the source thread's stopwatch (``preprocess``, then ``window``)."""
        samples = np.asarray(samples, np.float32)
        if self.index is not None:
            samples = samples[:, self.index]
        with self._lock:
            self.samples_in += len(samples)
            if self._skip:
                skipped = min(self._skip, len(samples))
                samples, timestamps = samples[skipped:], np.asarray(timestamps)[skipped:]
                self._skip -= skipped
            samples, bad = self._clean(samples)
            kept = self._buf.shape[self._time_axis]
            # a new array (the caller's samples stay untouched), normalized in place past what was kept
            self._buf = np.concatenate([self._buf, samples.T if self.pre.channels_first else samples],
                                       axis=self._time_axis)
            if self.pre.mean is not None:
                self._normalize(self._buf[:, kept:] if self.pre.channels_first else self._buf[kept:])
            self._ts = np.concatenate([self._ts, np.asarray(timestamps, np.float64)])
            self._bad = np.concatenate([self._bad, bad])
            if lap is not None:
                lap("preprocess")
            block = self._cut()
            if lap is not None:
                lap("window")
            return block

    def _normalize(self, fresh: np.ndarray) -> None:
        """(x - mean) / std for each channel, in place, on the new part of the buffer."""
        mean, std = self.pre.mean, self.pre.std
        if self.pre.channels_first:  # [C, m]
            fresh -= mean[:, None]
            fresh /= std[:, None]
            return
        # [m, C]: broadcasting along rows of a few channels costs numpy a loop per row; seen flat, the
        # means repeated per sample make it one loop (the repeats are kept for the next push)
        flat = fresh.reshape(-1)
        if len(self._mean_per_value) < len(flat):
            self._mean_per_value, self._std_per_value = np.tile(mean, len(fresh)), np.tile(std, len(fresh))
        flat -= self._mean_per_value[:len(flat)]
        flat /= self._std_per_value[:len(flat)]

    def _clean(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        finite = np.isfinite(samples)
        if finite.all():
            if len(samples):
                self._last_finite = samples[-1].copy()
            return samples, np.zeros(len(samples), bool)
        if self.nan_policy == "drop":
            return samples, ~finite.all(axis=1)
        samples = samples.copy()
        if self.nan_policy == "zero":
            samples[~finite] = 0.0
        else:  # hold: each channel keeps its last finite value
            for i in range(len(samples)):
                row = samples[i]
                bad = ~finite[i]
                row[bad] = self._last_finite[bad]
                self._last_finite = row.copy()
        return samples, np.zeros(len(samples), bool)

    def _cut(self) -> WindowBlock:
        """Every complete window in the buffer, as one block; the buffer keeps what the next window needs."""
        win, hop, channels_first = self.pre.window, self.pre.hop, self.pre.channels_first
        n = self._buf.shape[self._time_axis]
        if n < win:
            return WindowBlock.empty(self.source, self.pre.window_shape)
        starts = np.arange(0, n - win + 1, hop)
        k = len(starts)
        t_stride, c_stride = self._buf.strides[self._time_axis], self._buf.strides[1 - self._time_axis]
        views = np.lib.stride_tricks.as_strided(  # [k, C, win] or [k, win, C]: window i starts at sample i * hop
            self._buf, (k, self.pre.channels, win) if channels_first else (k, win, self.pre.channels),
            (hop * t_stride, c_stride, t_stride) if channels_first else (hop * t_stride, t_stride, c_stride),
            writeable=False)
        seq = self.seq + np.arange(k, dtype=np.int64)
        self.seq += k
        if self._bad.any():  # windows holding a NaN/Inf sample: dropped, counted, their numbers kept
            bad_counts = np.concatenate([[0], np.cumsum(self._bad)])
            good = bad_counts[starts + win] - bad_counts[starts] == 0
            self.nan_windows += k - int(np.count_nonzero(good))
            starts, views, seq = starts[good], views[good], seq[good]
        data = np.array(views, order="C")  # one copy: the block outlives the buffer, its rows are a model batch
        block = WindowBlock(self.source, seq, self._ts[starts], self._ts[starts + win - 1], data)
        keep_from = k * hop  # where the next window starts
        self._skip = max(0, keep_from - n)  # hop > window: samples between windows are never used
        self._buf = self._buf[:, keep_from:] if channels_first else self._buf[keep_from:]
        self._ts, self._bad = self._ts[keep_from:], self._bad[keep_from:]
        return block
