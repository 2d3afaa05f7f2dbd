"""Latency measurement: the one code path behind ``edgeopt bench``, the convert report's latency and
the benchmarks.

Times are per call (one batch), measured with ``perf_counter_ns`` after a warm-up. A round runs one
runtime for at least ``min_round_time`` seconds (there is no cap on calls: the last call that starts
inside the time ends the round, and a call slower than the round makes it one call long). When
several runtimes are compared they take turns round by round, so that machine noise hits all alike.
Throughput is samples per second at the median call (batch / p50): the mean, which ``mean_ms`` keeps,
swings with whatever else the machine is doing (on a shared 2-core host one artifact's mean-based
throughput varied 0.78-1.4x between runs whose p50 agreed within 3 %).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from edgeopt.batching import stack
from edgeopt.data import generate_inputs
from edgeopt.params import Param
from edgeopt.runtime import Runtime


def _at_least(lo: float):
    return lambda v: None if v >= lo else f"must be >= {lo}"


# How long a measurement runs: `edgeopt bench` makes its options from these declarations, and the
# convert report measures with their defaults, so both give the same numbers for the same artifact.
WARMUP = Param("warmup", int, 5, "Untimed calls per runtime before measuring.", check=_at_least(0))
ROUNDS = Param("rounds", int, 5, "Measurement rounds (runtimes compared take turns round by round).",
               check=_at_least(1))
MIN_ROUND_TIME = Param("min_round_time", float, 0.1, "Seconds each round runs at least (no cap on calls; a "
                       "call slower than this makes a one-call round).",
                       check=lambda v: None if v > 0 else "must be > 0")


@dataclass(frozen=True)
class BenchSettings:
    warmup: int = WARMUP.default
    rounds: int = ROUNDS.default
    min_round_time: float = MIN_ROUND_TIME.default

    def __post_init__(self) -> None:
        for param in (WARMUP, ROUNDS, MIN_ROUND_TIME):
            param.coerce(getattr(self, param.name), "bench")  # raises UserInputError naming the setting


# What the convert report measures with (the declared defaults; the test suite shortens it).
REPORT_SETTINGS = BenchSettings()


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
    throughput_per_s: float  # samples per second at the median call: batch / p50

    def to_json(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def stats_from(times_ns: Sequence[int], runtime: str, batch: int, threads: int | None) -> LatencyStats:
    ms = np.asarray(times_ns, dtype=np.float64) / 1e6
    return LatencyStats(runtime, batch, threads, len(ms), float(np.percentile(ms, 50)), float(np.percentile(ms, 95)),
                        float(np.percentile(ms, 99)), float(ms.mean()), float(batch * 1e3 / np.percentile(ms, 50)))


def batch_feeds(runtime: Runtime, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the given batch size for ``runtime``'s inputs, stacked along their batch axes."""
    return stack(runtime.inputs, generate_inputs(runtime.inputs, batch, seed).inputs)


def measure(runtimes: Sequence[Runtime], feeds: Sequence[Mapping[str, np.ndarray]],
            settings: BenchSettings | None = None) -> list[LatencyStats]:
    """Interleaved measurement of several runtimes (one feed dict per runtime), one ``LatencyStats`` each
    (``settings``: the declared defaults when None)."""
    settings = settings or BenchSettings()
    for rt, fd in zip(runtimes, feeds, strict=True):
        for _ in range(settings.warmup):
            rt.run(fd)
    times: list[list[int]] = [[] for _ in runtimes]
    round_ns = int(settings.min_round_time * 1e9)
    for _ in range(settings.rounds):
        for i, (rt, fd) in enumerate(zip(runtimes, feeds, strict=True)):
            spent = 0
            while spent < round_ns:
                t0 = time.perf_counter_ns()
                rt.run(fd)
                elapsed = time.perf_counter_ns() - t0
                times[i].append(elapsed)
                spent += elapsed
    out = []
    for rt, fd, ts in zip(runtimes, feeds, times, strict=True):
        batch = len(next(iter(fd.values()))) if fd else 1
        out.append(stats_from(ts, rt.name, batch, rt.config.get("threads")))
    return out
