"""Train small real models on scikit-learn's bundled digits set (8x8 handwriting) and export ONNX.

No download: the digits data ships inside scikit-learn. Used by ``make demo``, the tests and the
benchmarks.

    python examples/digits.py --out build/demo            # CNN + calibration/validation data
    python examples/digits.py --out build/mlp --model mlp-1m
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class DigitsSplit:
    """Pixel values scaled to [0, 1]; images shaped [N, 1, 8, 8]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_cal: np.ndarray  # calibration: a slice of the training images, no labels needed
    x_val: np.ndarray  # held out: never seen in training or calibration
    y_val: np.ndarray


def load_split(seed: int = 0, val_fraction: float = 0.25, calibration: int = 200) -> DigitsSplit:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = int(len(x) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return DigitsSplit(x[train], y[train], x[train][:calibration], x[val], y[val])


def _torch():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    return torch


def build_cnn():
    """Conv-BN-ReLU ×3 with pooling, then two fully connected layers (with Dropout)."""
    nn = _torch().nn
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10),
    )


def build_mlp(hidden: tuple[int, ...]):
    nn = _torch().nn
    layers: list = [nn.Flatten()]
    width = 64
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


MODELS = {
    "cnn": build_cnn,
    "mlp": lambda: build_mlp((512, 256)),          # ~166k weights: weights dominate the file
    "mlp-1m": lambda: build_mlp((1024, 1024)),     # ~1.1M weights, MatMul-heavy
}


def train(model, split: DigitsSplit, epochs: int = 30, lr: float = 2e-3, seed: int = 0):
    torch = _torch()
    torch.manual_seed(seed)
    x = torch.from_numpy(split.x_train)
    y = torch.from_numpy(split.y_train)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    model.eval()
    return model


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    torch = _torch()
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export_onnx(model, path: Path, sample: np.ndarray, opset: int = 17) -> Path:
    """torch.onnx.export with a dynamic batch dim (input 'image', output 'logits')."""
    torch = _torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(sample[:1]),), str(path), dynamo=False,
                          input_names=["image"], output_names=["logits"], opset_version=opset,
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return path


def make(kind: str, out: Path, seed: int = 0, epochs: int | None = None) -> dict[str, Path]:
    """Train ``kind`` and write ``{kind}.onnx``, ``calibration.npz`` and ``validation.npz`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    split = load_split(seed)
    model = train(MODELS[kind](), split, epochs=epochs or (30 if kind == "cnn" else 20), seed=seed)
    model_path = export_onnx(model, out / f"digits_{kind}.onnx", split.x_val)
    np.savez(out / "calibration.npz", image=split.x_cal)
    np.savez(out / "validation.npz", image=split.x_val, labels=split.y_val)
    return {"model": model_path, "calibration": out / "calibration.npz", "validation": out / "validation.npz",
            "torch_accuracy": accuracy(model, split.x_val, split.y_val)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", choices=sorted(MODELS), default="cnn")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    made = make(args.model, args.out, args.seed)
    print(f"wrote {made['model']} (held-out accuracy in torch: {made['torch_accuracy']:.2%}), "
          f"{made['calibration']}, {made['validation']}")


if __name__ == "__main__":
    main()
