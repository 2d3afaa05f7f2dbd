"""Compare a converted model with the original on the same inputs: parity and accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _as_float(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def parity(reference: Sequence[np.ndarray], converted: Sequence[np.ndarray], names: Sequence[str]) -> dict[str, Any]:
    """Error metrics per output and overall (worst case across outputs).

    ``top1_agreement`` is reported for outputs shaped [N, C] with C >= 2 (classifier scores).
    """
    per_output = {}
    for name, ref, got in zip(names, reference, converted, strict=True):
        r, g = _as_float(ref), _as_float(got)
        if r.shape != g.shape:
            raise ValueError(f"output '{name}': shape {list(g.shape)} differs from the original {list(r.shape)}")
        diff = np.abs(r - g)
        rf, gf = r.ravel(), g.ravel()
        denom = np.linalg.norm(rf) * np.linalg.norm(gf)
        cosine = float(rf @ gf / denom) if denom > 0 else (1.0 if np.allclose(rf, gf) else 0.0)
        entry = {
            "max_abs_err": float(diff.max()) if diff.size else 0.0,
            "mean_abs_err": float(diff.mean()) if diff.size else 0.0,
            "cosine": cosine,
            "output_scale": float(np.abs(r).max()) if r.size else 0.0,
            "finite": bool(np.isfinite(g).all()),
            "top1_agreement": None,
        }
        if r.ndim == 2 and r.shape[1] >= 2:
            entry["top1_agreement"] = float((r.argmax(1) == g.argmax(1)).mean())
        per_output[name] = entry
    top1 = [e["top1_agreement"] for e in per_output.values() if e["top1_agreement"] is not None]
    return {
        "max_abs_err": max(e["max_abs_err"] for e in per_output.values()),
        "mean_abs_err": float(np.mean([e["mean_abs_err"] for e in per_output.values()])),
        "cosine": min(e["cosine"] for e in per_output.values()),
        "top1_agreement": top1[0] if top1 else None,
        "finite": all(e["finite"] for e in per_output.values()),
        "outputs": per_output,
    }


def accuracy(labels: np.ndarray | None, reference: np.ndarray, converted: np.ndarray) -> dict[str, Any]:
    """Top-1 accuracy (percent) of both models against labels, and the drop in points.

    Classifier outputs [N, C] with integer labels give ``top1_percent``; a single regression output
    with float labels gives ``mae`` (drop = increase in error). Anything else is not measured.
    """
    empty = {"metric": None, "original": None, "converted": None, "drop": None}
    if labels is None:
        return empty
    labels = np.asarray(labels)
    ref, got = np.asarray(reference), np.asarray(converted)
    if labels.dtype.kind in "iu" and ref.ndim == 2 and ref.shape[1] >= 2 and labels.shape == (len(ref),):
        orig = float((ref.argmax(1) == labels).mean() * 100)
        conv = float((got.argmax(1) == labels).mean() * 100)
        return {"metric": "top1_percent", "original": orig, "converted": conv, "drop": orig - conv}
    if labels.dtype.kind == "f" and ref.reshape(len(ref), -1).shape[1] == labels.reshape(len(labels), -1).shape[1]:
        target = labels.reshape(len(labels), -1)
        orig = float(np.abs(ref.reshape(len(ref), -1) - target).mean())
        conv = float(np.abs(got.reshape(len(got), -1) - target).mean())
        return {"metric": "mae", "original": orig, "converted": conv, "drop": conv - orig}
    return empty
