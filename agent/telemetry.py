"""Counters, the batch-size histogram, inference latency percentiles and memory, for the periodic
telemetry message and the local status file."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, deque

import numpy as np

from edgeopt.protocol import CODE_RE, MAX_REJECT_KINDS, MAX_REJECT_REASONS


def rss_bytes(worker: int = 0, worker_peak: int = 0) -> tuple[int | None, int | None]:
    """(current, peak) resident set size of this process, from /proc (Linux), plus the inference worker's
    own memory now and at its peak (``worker``, ``worker_peak``: agent/worker.py); None elsewhere."""
    try:
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value = line.split(":", 1)
                    fields[name] = int(value.split()[0]) * 1024
        return fields["VmRSS"] + worker, fields["VmHWM"] + worker_peak
    except (OSError, ValueError, KeyError):
        return None, None


def percentiles(values: np.ndarray, qs: tuple[float, ...]) -> np.ndarray:
    """``np.percentile(values, qs)`` (its default, linear interpolation) written out: numpy's imports
    numpy.ma on its first call, 1.35 MiB of the agent's memory for three numbers."""
    ordered = np.sort(values)
    at = np.asarray(qs, np.float64) / 100 * (len(ordered) - 1)
    low = np.floor(at).astype(np.intp)
    high = np.minimum(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


class InferenceStats:
    """What the inference loop did: windows out, batch sizes, latency per call."""

    def __init__(self, latency_window: int = 2048):
        self._lock = threading.Lock()
        self.windows_out = 0
        self.batches = 0
        self.errors = 0
        self.batch_sizes: Counter[int] = Counter()
        self._latencies_ms: deque[float] = deque(maxlen=latency_window)
        self.first_inference: float | None = None
        self.last_inference: float | None = None
        self._rate_mark = (time.monotonic(), 0)

    def record_calls(self, calls: list[tuple[int, float]]) -> None:
        """Inference calls of (windows, seconds) that just ended."""
        now = time.time()
        with self._lock:
            for batch, seconds in calls:
                self.windows_out += batch
                self.batches += 1
                self.batch_sizes[batch] += 1
                self._latencies_ms.append(seconds * 1000.0)
            self.first_inference = self.first_inference or now
            self.last_inference = now

    def rate(self, mark: bool = False) -> float:
        """Windows inferred per second since the last mark (``mark``: start a new interval)."""
        now = time.monotonic()
        with self._lock:
            last_t, last_n = self._rate_mark
            if mark:
                self._rate_mark = (now, self.windows_out)
            return round((self.windows_out - last_n) / (now - last_t), 2) if now > last_t else 0.0

    def latency(self) -> dict[str, float | None]:
        with self._lock:
            values = np.asarray(self._latencies_ms)
        if not len(values):
            return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
        p50, p95, p99 = percentiles(values, (50, 95, 99))
        return {"p50_ms": round(float(p50), 4), "p95_ms": round(float(p95), 4), "p99_ms": round(float(p99), 4)}

    def histogram(self) -> dict[str, int]:
        with self._lock:
            return {str(k): v for k, v in sorted(self.batch_sizes.items())}


class Uptime:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.pid = os.getpid()

    def seconds(self) -> float:
        return round(time.monotonic() - self.started, 3)


class RejectedMessages:
    """Network messages the agent refused, per topic kind ("desired", "repo", …) and per short reason
    code ("bad_version", "too_large", "bad_json", "wrong_device", …), for telemetry and the state.
    Bounded as the protocol requires: a kind or reason beyond the limits is counted under "other"."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, Counter[str]] = {}
        self.changes = 0  # bumped on every refusal: the state is republished when it moved

    def add(self, kind: str, code: str) -> None:
        with self._lock:
            kind = kind if CODE_RE.fullmatch(kind) else "other"
            if kind not in self._counts and len(self._counts) >= MAX_REJECT_KINDS - 1:
                kind = "other"
            reasons = self._counts.setdefault(kind, Counter())
            code = code if CODE_RE.fullmatch(code) else "other"
            if code not in reasons and len(reasons) >= MAX_REJECT_REASONS - 1:
                code = "other"
            reasons[code] += 1
            self.changes += 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {kind: dict(reasons) for kind, reasons in self._counts.items()}
