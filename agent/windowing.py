"""Windowing and preprocessing: a source's samples → normalized model-shaped windows.

A ``Windower`` belongs to one source. It maps the source's channels onto the model's channel order,
normalizes each channel, handles NaN/Inf samples by the configured policy, and cuts windows of
``window`` samples every ``hop`` samples, laid out [C, T] or [T, C] as the manifest says. Windows get
consecutive sequence numbers per source, dropped ones included, so a gap in the ids is always a
counted drop.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

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


@dataclass
class Window:
    source: str
    seq: int
    t_start: float
    t_end: float
    data: np.ndarray  # one model input sample, float32, [C, T] or [T, C]

    @property
    def id(self) -> str:
        return f"{self.source}:{self.seq}"


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
    def __init__(self, source: str, pre: Preprocessing, nan_policy: str = "drop",
                 index: list[int] | None = None):
        self.source = source
        self.pre = pre
        self.nan_policy = nan_policy
        self.index = index
        self.seq = 0
        self.nan_windows = 0
        self.samples_in = 0
        self._buf = np.empty((0, pre.channels), np.float32)
        self._ts = np.empty(0, np.float64)
        self._bad = np.empty(0, bool)
        self._last_finite = np.zeros(pre.channels, np.float32)
        self._skip = 0
        self._lock = threading.Lock()

    def push(self, samples: np.ndarray, timestamps: np.ndarray) -> list[Window]:
        """Add samples [n, source channels] with their timestamps [n]; return the windows completed."""
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
            if self.pre.mean is not None:
                samples = (samples - self.pre.mean) / self.pre.std
            self._buf = np.concatenate([self._buf, samples]) if len(self._buf) else samples
            self._ts = np.concatenate([self._ts, np.asarray(timestamps, np.float64)])
            self._bad = np.concatenate([self._bad, bad])
            return self._cut()

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

    def _cut(self) -> list[Window]:
        win, hop = self.pre.window, self.pre.hop
        n = len(self._buf)
        if n < win:
            return []
        starts = np.arange(0, n - win + 1, hop)
        views = np.lib.stride_tricks.sliding_window_view(self._buf, win, axis=0)[starts]  # [k, C, win]
        data = views if self.pre.channels_first else views.transpose(0, 2, 1)
        bad_counts = np.concatenate([[0], np.cumsum(self._bad)])
        has_bad = bad_counts[starts + win] - bad_counts[starts] > 0
        out = []
        for k, s in enumerate(starts):
            seq = self.seq
            self.seq += 1
            if has_bad[k]:
                self.nan_windows += 1
                continue
            out.append(Window(self.source, seq, float(self._ts[s]), float(self._ts[s + win - 1]),
                              np.ascontiguousarray(data[k])))
        keep_from = int(starts[-1]) + hop
        self._skip = max(0, keep_from - n)  # hop > window: samples between windows are never used
        self._buf, self._ts, self._bad = self._buf[keep_from:], self._ts[keep_from:], self._bad[keep_from:]
        return out
