"""Train a small 1-D CNN activity classifier on a synthetic IMU stream and export it to ONNX.

The stream comes from the agent's own synthetic source (edgeopt.agent.sources.synthetic): 3
accelerometer channels at 50 Hz, activities still / walk / run / shake. The model takes windows of
64 samples laid out [N, 3, 64] (channels first), normalized per channel. Used by the agent's tests
and benchmarks/agent_throughput.py; no download.

    python examples/imu.py --out build/imu
    edgeopt convert build/imu/imu_cnn.onnx -o build/imu/artifact --target onnx \\
        --preprocessing build/imu/preprocessing.json
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

from edgeopt.agent.sources.synthetic import ACTIVITIES, CHANNELS, imu_stream

RATE_HZ = 50.0
WINDOW = 64
HOP = 32


def windows(samples: np.ndarray, labels: np.ndarray, window: int = WINDOW, hop: int = HOP):
    """[N, C, window] windows and their majority labels."""
    starts = range(0, len(samples) - window + 1, hop)
    x = np.stack([samples[s:s + window].T for s in starts])
    y = np.array([np.bincount(labels[s:s + window], minlength=len(ACTIVITIES)).argmax() for s in starts])
    return x.astype(np.float32), y.astype(np.int64)


def build_cnn(channels: int = 3, classes: int = len(ACTIVITIES)):
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv1d(channels, 16, 5, padding=2), nn.ReLU(),
        nn.Conv1d(16, 32, 5, stride=2, padding=2), nn.ReLU(),
        nn.Conv1d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, classes),
    )


def make(out: Path, seed: int = 0, minutes: float = 12.0, epochs: int = 12) -> dict[str, Path]:
    """Write imu_cnn.onnx, preprocessing.json, calibration.npz, validation.npz and a held-out
    stream imu_stream.csv (header ax,ay,az,label) into ``out``."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    out.mkdir(parents=True, exist_ok=True)
    samples, labels = imu_stream(int(minutes * 60 * RATE_HZ), RATE_HZ, 3, seed)
    mean, std = samples.mean(axis=0), samples.std(axis=0)
    x, y = windows((samples - mean) / std, labels)
    held_samples, held_labels = imu_stream(int(2 * 60 * RATE_HZ), RATE_HZ, 3, seed + 1)
    xv, yv = windows((held_samples - mean) / std, held_labels)

    model = build_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(xv)).argmax(1).numpy() == yv).mean())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(x[:1]),), str(out / "imu_cnn.onnx"), dynamo=False,
                          input_names=["imu"], output_names=["activity"], opset_version=17,
                          dynamic_axes={"imu": {0: "batch"}, "activity": {0: "batch"}})
    preprocessing = {"hop": HOP, "layout": "channels_first", "channels": list(CHANNELS[:3]),
                     "sample_rate_hz": RATE_HZ,
                     "normalization": {"mean": mean.tolist(), "std": std.tolist()}}
    (out / "preprocessing.json").write_text(json.dumps(preprocessing, indent=2) + "\n")
    np.savez(out / "calibration.npz", imu=x[:256])
    np.savez(out / "validation.npz", imu=xv, labels=yv)
    with open(out / "imu_stream.csv", "w") as f:
        f.write("ax,ay,az,label\n")
        for row, label in zip(held_samples, held_labels, strict=True):
            f.write(f"{row[0]:.5f},{row[1]:.5f},{row[2]:.5f},{label}\n")
    return {"model": out / "imu_cnn.onnx", "preprocessing": out / "preprocessing.json",
            "calibration": out / "calibration.npz", "validation": out / "validation.npz",
            "stream": out / "imu_stream.csv", "accuracy": acc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    made = make(args.out, args.seed)
    print(f"wrote {made['model']} (held-out window accuracy in torch: {made['accuracy']:.2%}) and "
          f"{made['preprocessing']}, {made['stream']}")


if __name__ == "__main__":
    main()
