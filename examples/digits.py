"""Train small real models on scikit-learn's bundled digits set (8x8 handwriting) and export ONNX.

No download: the digits data ships inside scikit-learn. Used by ``make demo``, the tests, the docs
and the benchmarks. Training is seeded, so a trained model is kept in edgeopt's cache
(``$XDG_CACHE_HOME/edgeopt/examples``, keyed by this file, the options and the torch and scikit-learn
versions) and copied from there next time; ``--no-cache`` trains again.

    python examples/digits.py --out build/demo            # CNN + calibration/validation/training data
    python examples/digits.py --out build/mlp --model mlp-1m
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from edgeopt.fsutil import cache_dir


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


def make(kind: str, out: Path, seed: int = 0, epochs: int | None = None, cache: bool = True) -> dict:
    """Train ``kind`` and write ``digits_{kind}.onnx`` and its data into ``out``: ``calibration.npz``
    (200 training images), ``validation.npz`` (the held-out images and their labels) and ``train.npz``
    (the training images and labels, for ``edgeopt convert --distill``)."""
    epochs = epochs or (30 if kind == "cnn" else 20)
    names = [f"digits_{kind}.onnx", "calibration.npz", "validation.npz", "train.npz"]
    kept = _cached(kind, seed, epochs) if cache else None
    out.mkdir(parents=True, exist_ok=True)
    if kept is not None and all((kept / n).is_file() for n in [*names, "accuracy.json"]):
        for name in names:
            shutil.copyfile(kept / name, out / name)
        torch_accuracy = json.loads((kept / "accuracy.json").read_text())["torch_accuracy"]
    else:
        split = load_split(seed)
        model = train(MODELS[kind](), split, epochs=epochs, seed=seed)
        export_onnx(model, out / names[0], split.x_val)
        np.savez(out / "calibration.npz", image=split.x_cal)
        np.savez(out / "validation.npz", image=split.x_val, labels=split.y_val)
        np.savez(out / "train.npz", image=split.x_train, labels=split.y_train)
        torch_accuracy = accuracy(model, split.x_val, split.y_val)
        if kept is not None:
            _keep(kept, [out / n for n in names], torch_accuracy)
    return {"model": out / names[0], "calibration": out / "calibration.npz", "validation": out / "validation.npz",
            "train": out / "train.npz", "torch_accuracy": torch_accuracy}


def _cached(kind: str, seed: int, epochs: int) -> Path:
    """Where a model trained with these settings by this file is kept."""
    key = hashlib.sha256(Path(__file__).read_bytes())
    key.update(f"{kind}:{seed}:{epochs}:{metadata.version('torch')}:{metadata.version('scikit-learn')}".encode())
    return cache_dir() / "examples" / f"digits-{kind}-{key.hexdigest()[:16]}"


def _keep(dest: Path, files: list[Path], torch_accuracy: float) -> None:
    """Copy the trained files into the cache, complete or not at all (a temporary sibling renamed)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    for f in files:
        shutil.copyfile(f, tmp / f.name)
    (tmp / "accuracy.json").write_text(json.dumps({"torch_accuracy": torch_accuracy}))
    try:
        os.replace(tmp, dest)
    except OSError:  # another run kept it first
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", choices=sorted(MODELS), default="cnn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cache", action="store_true", help="train again rather than copy a model kept from "
                                                            "an earlier run with the same settings")
    args = ap.parse_args()
    made = make(args.model, args.out, args.seed, cache=not args.no_cache)
    print(f"wrote {made['model']} (held-out accuracy in torch: {made['torch_accuracy']:.2%}), "
          f"{made['calibration']}, {made['validation']}, {made['train']}")


if __name__ == "__main__":
    main()
