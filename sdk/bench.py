"""Latency measurement shared by ``edgeopt bench``, the convert report and the benchmarks.

Times are per call (one batch), measured with ``perf_counter_ns`` after a warm-up. When several
runtimes are compared they are measured in interleaved rounds so that machine noise hits all alike.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from edgeopt.data import generate_inputs
from edgeopt.runtime import Runtime


@dataclass
class LatencyStats:
    runtime: str
    batch: int
    threads: int | None
    calls: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    throughput_per_s: float  # samples per second

    def to_json(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def stats_from(times_ns: Sequence[int], runtime: str, batch: int, threads: int | None) -> LatencyStats:
    ms = np.asarray(times_ns, dtype=np.float64) / 1e6
    return LatencyStats(runtime, batch, threads, len(ms), float(np.percentile(ms, 50)), float(np.percentile(ms, 95)),
                        float(np.percentile(ms, 99)), float(ms.mean()), float(batch * len(ms) / (ms.sum() / 1e3)))


def batch_feeds(runtime: Runtime, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the given batch size for ``runtime``'s inputs."""
    data = generate_inputs(runtime.inputs, batch, seed)
    return data.inputs


def measure(runtimes: Sequence[Runtime], feeds: Sequence[Mapping[str, np.ndarray]], *, warmup: int = 5,
            rounds: int = 5, min_round_s: float = 0.1, max_calls_per_round: int = 200) -> list[LatencyStats]:
    """Interleaved measurement of several runtimes (one feed dict per runtime)."""
    for rt, fd in zip(runtimes, feeds, strict=True):
        for _ in range(warmup):
            rt.run(fd)
    times: list[list[int]] = [[] for _ in runtimes]
    for _ in range(rounds):
        for i, (rt, fd) in enumerate(zip(runtimes, feeds, strict=True)):
            start_round = time.perf_counter()
            for _ in range(max_calls_per_round):
                t0 = time.perf_counter_ns()
                rt.run(fd)
                times[i].append(time.perf_counter_ns() - t0)
                if time.perf_counter() - start_round >= min_round_s:
                    break
    out = []
    for rt, fd, ts in zip(runtimes, feeds, times, strict=True):
        batch = len(next(iter(fd.values()))) if fd else 1
        out.append(stats_from(ts, rt.name, batch, rt.config.get("threads")))
    return out
