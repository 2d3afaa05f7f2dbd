"""A synthetic accelerometer / IMU stream: activities 'still', 'walk', 'run' and 'shake' in segments
of a few seconds. Used by the ``synthetic`` source for demos, and by examples/imu.py to train the
small 1-D CNN that the tests and benchmarks run (numpy only).

Channels: ax, ay, az (acceleration in g, gravity on z) and, for 6 channels, gx, gy, gz (rad/s).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from edgeopt.agent.config import SyntheticSource
from edgeopt.agent.sources.base import Source
from edgeopt.errors import UserInputError

ACTIVITIES = ("still", "walk", "run", "shake")
CHANNELS = ("ax", "ay", "az", "gx", "gy", "gz")

# activity → (base frequency Hz, accel amplitude x, y, z, noise)
_MOTION = {
    0: (0.0, 0.0, 0.0, 0.0, 0.02),
    1: (1.8, 0.15, 0.10, 0.30, 0.05),
    2: (2.8, 0.50, 0.30, 1.00, 0.10),
    3: (7.0, 1.50, 1.00, 0.20, 0.10),
}


def iter_segments(rate_hz: float, channels: int, seed: int = 0,
                  segment_s: tuple[float, float] = (2.0, 5.0)) -> Iterator[tuple[np.ndarray, int]]:
    """Endless (samples [n, channels] float32, activity) segments."""
    if channels not in (3, 6):
        raise ValueError(f"the synthetic IMU has 3 or 6 channels, not {channels}")
    rng = np.random.default_rng(seed)
    while True:
        activity = int(rng.integers(len(ACTIVITIES)))
        n = int(rng.uniform(*segment_s) * rate_hz)
        t = np.arange(n) / rate_hz
        base, amp_x, amp_y, amp_z, noise = _MOTION[activity]
        f = base * rng.uniform(0.85, 1.15)
        phase = rng.uniform(0, 2 * np.pi, 3)
        w = 2 * np.pi * f * t
        accel = np.stack([amp_x * np.sin(w + phase[0]),
                          amp_y * np.sin(0.5 * w + phase[1]),
                          1.0 + amp_z * np.sin(w + phase[2])], axis=1)
        out = accel
        if channels == 6:
            gyro = np.stack([0.8 * amp_y * np.cos(0.5 * w + phase[1]), 0.8 * amp_x * np.cos(w + phase[0]),
                             0.3 * amp_z * np.cos(w)], axis=1)
            out = np.concatenate([accel, gyro], axis=1)
        out = out + rng.normal(0, noise, out.shape)
        yield out.astype(np.float32), activity


def imu_stream(n: int, rate_hz: float = 50.0, channels: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(samples [n, channels] float32, per-sample activity labels [n] int64)."""
    parts, labels, have = [], [], 0
    for seg, activity in iter_segments(rate_hz, channels, seed):
        parts.append(seg)
        labels.append(np.full(len(seg), activity, np.int64))
        have += len(seg)
        if have >= n:
            break
    return np.concatenate(parts)[:n], np.concatenate(labels)[:n]


class SyntheticImuSource(Source):
    kind = "synthetic"
    cfg: SyntheticSource

    def _run(self) -> None:
        channels = self.ctx.pre.channels
        if channels not in (3, 6):
            raise UserInputError(f"source '{self.name}': the synthetic IMU sends 3 or 6 channels; "
                                 f"the model takes {channels}")
        self.bind(list(CHANNELS[:channels]), channels)
        rate = self.cfg.rate_hz or self.ctx.rate_hz
        total = int(self.cfg.seconds * rate) if self.cfg.seconds else None
        sent = 0
        wall0, t0 = time.monotonic(), time.time()
        chunk = max(1, int(rate * 0.02)) if self.cfg.replay == "recorded" else 4096
        for segment, _activity in iter_segments(rate, channels, self.cfg.seed):
            for i in range(0, len(segment), chunk):
                part = segment[i:i + chunk]
                if total is not None:
                    part = part[:total - sent]
                if not len(part):
                    return
                if self.cfg.replay == "recorded" and not self.sleep_until(wall0 + sent / rate):
                    return
                if self.stopping.is_set():
                    return
                self.emit(part, t0 + (sent + np.arange(len(part))) / rate)
                sent += len(part)
