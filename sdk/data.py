"""Data for calibration, validation, golden vectors and distillation.

Formats (DESIGN.md): ``.npz`` with one array per model input name (first axis = samples) and an
optional ``labels`` array; a single ``.npy`` for a one-input model; CSV for sensor streams (one
column per channel, a row per time step, an optional ``label`` column), cut into windows of the
model's input shape. Every mismatch names the file, the input, what was expected and what was found.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeopt.errors import UserInputError
from edgeopt.specs import TensorSpec

LABEL_KEYS = ("labels", "label")


@dataclass
class Dataset:
    """Samples stacked along axis 0 of every input array, with optional labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str  # a path, or "generated"

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, n: int) -> Dataset:
        return Dataset({k: v[:n] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[:n], self.source)

    def samples(self) -> Iterator[dict[str, np.ndarray]]:
        """One feed dict per sample, each with a batch dim of 1."""
        for i in range(len(self)):
            yield {k: v[i:i + 1] for k, v in self.inputs.items()}


def _dtype_kind_ok(expected: np.dtype, got: np.dtype) -> bool:
    if expected.kind == "f":
        return got.kind == "f"
    if expected.kind in "iu":
        return got.kind in "iu"
    if expected.kind == "b":
        return got.kind == "b"
    return expected == got


def _check_array(path: Path, spec: TensorSpec, arr: np.ndarray) -> np.ndarray:
    expected_dtype = np.dtype(spec.dtype)
    if not _dtype_kind_ok(expected_dtype, arr.dtype):
        raise UserInputError(
            f"{path}: input '{spec.name}' has dtype {arr.dtype}, the model expects {expected_dtype}")
    sample = spec.sample_shape()
    want = "[N, " + ", ".join("?" if not isinstance(d, int) else str(d) for d in sample) + "]"
    if arr.ndim != len(spec.shape) or any(
        isinstance(d, int) and d > 0 and a != d for a, d in zip(arr.shape[1:], sample, strict=False)
    ):
        raise UserInputError(
            f"{path}: input '{spec.name}' has shape {list(arr.shape)}, the model expects {want} "
            f"(samples along the first axis)")
    if len(arr) == 0:
        raise UserInputError(f"{path}: input '{spec.name}' has no samples")
    return arr.astype(expected_dtype, copy=False)


def _check_labels(path: Path, labels: np.ndarray, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if len(labels) != n:
        raise UserInputError(f"{path}: 'labels' has {len(labels)} entries but the inputs have {n} samples")
    return labels


def load_dataset(path: str | Path, specs: Sequence[TensorSpec], window_hop: int | None = None) -> Dataset:
    """Load ``path`` and check it against the model inputs ``specs``."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _load_npz(path, specs)
    if suffix == ".npy":
        return _load_npy(path, specs)
    if suffix == ".csv":
        return _load_csv(path, specs, window_hop)
    raise UserInputError(f"{path}: unsupported data format '{suffix}' (use .npz, .npy or .csv)")


def _load_npz(path: Path, specs: Sequence[TensorSpec]) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise UserInputError(f"{path}: not a readable .npz file ({exc})") from exc
    names = [s.name for s in specs]
    unknown = [k for k in arrays if k not in names and k not in LABEL_KEYS]
    missing = [n for n in names if n not in arrays]
    if unknown or missing:
        msg = []
        if missing:
            msg.append(f"no array for model input(s) {', '.join(repr(m) for m in missing)}")
        if unknown:
            msg.append(f"array(s) {', '.join(repr(u) for u in unknown)} match no model input")
        raise UserInputError(f"{path}: {'; '.join(msg)} (model inputs: {', '.join(names)})")
    inputs = {s.name: _check_array(path, s, arrays[s.name]) for s in specs}
    counts = {k: len(v) for k, v in inputs.items()}
    if len(set(counts.values())) > 1:
        raise UserInputError(f"{path}: inputs have different sample counts: {counts}")
    labels = next((arrays[k] for k in LABEL_KEYS if k in arrays), None)
    n = next(iter(counts.values()))
    return Dataset(inputs, None if labels is None else _check_labels(path, labels, n), str(path))


def _load_npy(path: Path, specs: Sequence[TensorSpec]) -> Dataset:
    if len(specs) != 1:
        raise UserInputError(
            f"{path}: a .npy file feeds a one-input model; this model has inputs "
            f"{', '.join(s.name for s in specs)} (use an .npz with one array per input)")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise UserInputError(f"{path}: not a readable .npy file ({exc})") from exc
    return Dataset({specs[0].name: _check_array(path, specs[0], arr)}, None, str(path))


def read_sensor_csv(path: Path) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """(channel names, float32 samples [T, C], labels [T] or None) from a sensor CSV.

    A header row is optional (channels are named ch0, ch1, ... without one); a column named
    ``label`` holds per-row labels.
    """
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise UserInputError(f"{path}: empty CSV")
    first = [c.strip() for c in lines[0].split(",")]

    def is_number(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    has_header = not all(is_number(c) for c in first)
    header = first if has_header else [f"ch{i}" for i in range(len(first))]
    rows = lines[1:] if has_header else lines
    label_col = next((i for i, h in enumerate(header) if h.lower() in LABEL_KEYS), None)
    values = np.empty((len(rows), len(header)), dtype=np.float64)
    for lineno, row in enumerate(rows, start=2 if has_header else 1):
        cells = row.split(",")
        if len(cells) != len(header):
            raise UserInputError(f"{path}:{lineno}: expected {len(header)} columns, found {len(cells)}")
        try:
            values[lineno - (2 if has_header else 1)] = [float(c) for c in cells]
        except ValueError:
            raise UserInputError(f"{path}:{lineno}: non-numeric value in row {row!r}") from None
    labels = None
    if label_col is not None:
        labels = values[:, label_col].astype(np.int64)
        values = np.delete(values, label_col, axis=1)
        header = [h for i, h in enumerate(header) if i != label_col]
    return header, values.astype(np.float32), labels


def _load_csv(path: Path, specs: Sequence[TensorSpec], hop: int | None) -> Dataset:
    if len(specs) != 1:
        raise UserInputError(f"{path}: a sensor CSV feeds a one-input model; this model has {len(specs)} inputs")
    spec = specs[0]
    channels, values, row_labels = read_sensor_csv(path)
    n_ch = len(channels)
    sample = spec.sample_shape()
    if any(not isinstance(d, int) for d in sample):
        raise UserInputError(f"{path}: input '{spec.name}' has dynamic dims {spec.describe_shape()}; "
                             f"fix them with --input-shape before windowing a CSV")
    # Layout of one window: [C, T] (channels first), [T, C] (channels last) or [T] for one channel.
    if len(sample) == 2 and sample[0] == n_ch:
        window, channels_first = int(sample[1]), True
    elif len(sample) == 2 and sample[1] == n_ch or len(sample) == 1 and n_ch == 1:
        window, channels_first = int(sample[0]), False
    else:
        raise UserInputError(f"{path}: {n_ch} channel column(s) do not fit input '{spec.name}' of shape "
                             f"{spec.describe_shape()} (expected [N, {n_ch}, T] or [N, T, {n_ch}])")
    hop = hop or window
    starts = range(0, len(values) - window + 1, hop)
    if len(starts) == 0:
        raise UserInputError(f"{path}: {len(values)} rows are fewer than one window of {window}")
    windows = np.stack([values[s:s + window] for s in starts])  # [N, T, C]
    if channels_first:
        windows = windows.transpose(0, 2, 1)
    windows = windows.reshape((len(windows),) + tuple(int(d) for d in sample))
    labels = None
    if row_labels is not None:  # a window's label: the most frequent row label inside it
        labels = np.array([np.bincount(row_labels[s:s + window] - row_labels.min()).argmax() + row_labels.min()
                           for s in starts])
    return Dataset({spec.name: windows.astype(np.dtype(spec.dtype))}, labels, str(path))


def generate_inputs(specs: Sequence[TensorSpec], n: int, seed: int = 0) -> Dataset:
    """Random inputs for a model when no data was given (normal floats, small non-negative ints)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in specs:
        shape = (n,) + tuple(int(d) for d in spec.concrete_shape(1)[1:])
        dt = np.dtype(spec.dtype)
        if dt.kind == "f":
            inputs[spec.name] = rng.standard_normal(shape).astype(dt)
        elif dt.kind == "b":
            inputs[spec.name] = rng.integers(0, 2, shape).astype(dt)
        else:
            inputs[spec.name] = rng.integers(0, 8, shape).astype(dt)
    return Dataset(inputs, None, "generated")
