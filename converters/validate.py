"""Compare a converted model with the original on the same inputs: parity and accuracy.

Every number returned is finite or None, so reports stay strict JSON: errors and similarities are
measured on the samples where both models gave finite outputs, and ``finite`` / ``nonfinite_samples``
say how many did not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _as_float(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def classifier_shaped(shape: Sequence[Any]) -> bool:
    """Class scores: [N, C] with C >= 2 (a dynamic C counts)."""
    return len(shape) == 2 and (not isinstance(shape[1], int) or shape[1] >= 2)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of a and b ([N, K] → [N]); two zero rows count as equal."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    denom = na * nb
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, np.einsum("ij,ij->i", a, b) / np.where(denom > 0, denom, 1.0), 0.0)
    both_zero = (na == 0) & (nb == 0)
    return np.clip(np.where(both_zero, 1.0, cos), -1.0, 1.0)


PARITY_CHUNK_ELEMENTS = 1 << 20  # float64 temporaries per step: a few MB, whatever the output's size


class _OutputParity:
    """Parity of one output, accumulated over chunks of samples: the float64 copies and differences
    of a whole detector output (64 samples of a 320x320 map) held ~12x its size at once (issue 15)."""

    def __init__(self, classifier: bool):
        self.classifier = classifier
        self.finite, self.nonfinite = True, 0
        self.max_err = self.err_sum = self.dot = self.ref_sq = self.got_sq = self.scale = 0.0
        self.worst, self.agree, self.used, self.width = 1.0, 0, 0, 0

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        """Samples along axis 0 of both, as many as given (chunked again to bound the temporaries)."""
        r2, g2 = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
        self.width = width = r2.shape[1]
        step = max(1, PARITY_CHUNK_ELEMENTS // max(width, 1))
        for start in range(0, len(r2), step):
            r, g = _as_float(r2[start:start + step]), _as_float(g2[start:start + step])
            finite_g = np.isfinite(g)
            self.finite = self.finite and bool(finite_g.all())
            ok = np.isfinite(r).all(axis=1) & finite_g.all(axis=1)
            self.nonfinite += int((~ok).sum())
            if not ok.any() or width == 0:
                continue
            r, g = r[ok], g[ok]
            diff = np.abs(r - g)
            self.max_err, self.err_sum = max(self.max_err, float(diff.max())), self.err_sum + float(diff.sum())
            self.dot += float(np.einsum("ij,ij->", r, g))
            self.ref_sq += float(np.einsum("ij,ij->", r, r))
            self.got_sq += float(np.einsum("ij,ij->", g, g))
            self.worst = min(self.worst, float(_cosine(r, g).min()))
            self.scale = max(self.scale, float(np.abs(r).max()))
            if self.classifier:
                self.agree += int((r.argmax(1) == g.argmax(1)).sum())
            self.used += len(r)

    def result(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"max_abs_err": None, "mean_abs_err": None, "cosine": None,
                                 "worst_sample_cosine": None, "output_scale": None, "finite": self.finite,
                                 "nonfinite_samples": self.nonfinite, "top1_agreement": None}
        if not self.used:
            return entry
        norms = np.sqrt(self.ref_sq) * np.sqrt(self.got_sq)
        cosine = (1.0 if self.ref_sq == 0 and self.got_sq == 0 else
                  float(np.clip(self.dot / norms, -1.0, 1.0)) if norms > 0 else 0.0)
        entry.update(max_abs_err=self.max_err, mean_abs_err=self.err_sum / (self.used * self.width), cosine=cosine,
                     worst_sample_cosine=self.worst, output_scale=self.scale)
        if self.classifier:
            entry["top1_agreement"] = self.agree / self.used
        return entry


class Parity:
    """``parity`` fed a batch at a time: ``add`` each batch's outputs of both models (samples along
    axis 0, one array per output, in ``names`` order), then ``result``. Nothing but the running sums
    is kept, so validating holds one batch of outputs, not the whole validation set's."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self._outputs: dict[str, _OutputParity] = {}

    def add(self, reference: Sequence[np.ndarray], converted: Sequence[np.ndarray]) -> None:
        for name, ref, got in zip(self.names, reference, converted, strict=True):
            r, g = np.asarray(ref), np.asarray(got)
            if r.shape != g.shape:
                raise ValueError(f"output '{name}': shape {list(g.shape)} differs from the original {list(r.shape)}")
            if name not in self._outputs:
                self._outputs[name] = _OutputParity(classifier_shaped(r.shape))
            self._outputs[name].add(r, g)

    def result(self) -> dict[str, Any]:
        per_output = {name: self._outputs[name].result() if name in self._outputs else _OutputParity(False).result()
                      for name in self.names}
        entries = per_output.values()

        def worst(key: str, pick) -> float | None:
            values = [e[key] for e in entries if e[key] is not None]
            return pick(values) if values else None

        top1 = [e["top1_agreement"] for e in entries if e["top1_agreement"] is not None]
        means = [e["mean_abs_err"] for e in entries if e["mean_abs_err"] is not None]
        return {
            "max_abs_err": worst("max_abs_err", max),
            "mean_abs_err": float(np.mean(means)) if means else None,
            "cosine": worst("cosine", min),
            "worst_sample_cosine": worst("worst_sample_cosine", min),
            "top1_agreement": top1[0] if top1 else None,
            "finite": all(e["finite"] for e in entries),
            "nonfinite_samples": max((e["nonfinite_samples"] for e in entries), default=0),
            "outputs": per_output,
        }


def parity(reference: Sequence[np.ndarray], converted: Sequence[np.ndarray], names: Sequence[str]) -> dict[str, Any]:
    """Error metrics per output and overall (worst case across outputs).

    ``cosine`` is over the whole output (all samples at once), ``worst_sample_cosine`` the lowest of
    one sample's; ``top1_agreement`` is reported for outputs shaped [N, C] with C >= 2 (classifier
    scores).
    """
    acc = Parity(names)
    acc.add(reference, converted)
    return acc.result()


NO_ACCURACY = {"metric": None, "original": None, "converted": None, "drop": None}


def accuracy(labels: np.ndarray | None, reference: np.ndarray, converted: np.ndarray,
             task: str | None = None) -> dict[str, Any]:
    """Both models against the labels, and how much worse the converted one is.

    ``task`` comes from the data check (``edgeopt.data.label_task``): "classification" gives top-1
    accuracy in percent (drop in points), "regression" the mean absolute error (drop = increase in
    MAE; RMSE alongside). Without ``task`` it is inferred the same way from the labels' dtype.
    Samples where a model gave non-finite outputs count as wrong (classification) or are left out
    of the errors (regression); a metric that cannot be computed is None, never NaN.
    """
    if labels is None:
        return dict(NO_ACCURACY)
    labels = np.asarray(labels)
    ref, got = np.asarray(reference), np.asarray(converted)
    if task is None:
        task = ("classification" if labels.dtype.kind in "iub" and classifier_shaped(ref.shape) else
                "regression" if labels.dtype.kind in "fiu" else None)
    if task == "classification":
        orig, conv = (float(((m.argmax(1) == labels) & np.isfinite(m).all(1)).mean() * 100) for m in (ref, got))
        return {"metric": "top1_percent", "original": orig, "converted": conv, "drop": orig - conv}
    if task == "regression":
        target = labels.reshape(len(labels), -1).astype(np.float64)
        r, g = ref.reshape(len(ref), -1).astype(np.float64), got.reshape(len(got), -1).astype(np.float64)
        if r.shape != target.shape:
            return dict(NO_ACCURACY)
        ok = np.isfinite(r).all(1) & np.isfinite(g).all(1)
        if not ok.any():
            return dict(NO_ACCURACY)
        orig, conv = (float(np.abs(m[ok] - target[ok]).mean()) for m in (r, g))
        rmse = {k: float(np.sqrt(((m[ok] - target[ok]) ** 2).mean())) for k, m in (("original", r), ("converted", g))}
        return {"metric": "mae", "original": orig, "converted": conv, "drop": conv - orig, "rmse": rmse}
    return dict(NO_ACCURACY)
