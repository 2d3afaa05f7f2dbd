"""Data for calibration, validation, golden vectors and distillation.

Formats (DESIGN.md): ``.npz`` with one array per model input name (first axis = samples) and an
optional ``labels`` array; a single ``.npy`` for a one-input model; CSV for sensor streams (one
column per channel, a row per time step, an optional ``label`` column), cut into windows of the
model's input shape. Every mismatch names the file, the input, what was expected and what was found.

Data is checked when it is loaded, before any work uses it: non-finite values (and values the
model's dtype cannot hold), no samples, dtype and per-sample shape against the model's inputs, and,
given the model's outputs, labels (``label_task``): class indices inside the output's class range, or
regression targets shaped like the output. Each refusal is one ``UserInputError`` line naming the
file, the input or ``labels`` and the first bad sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
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
    task: str | None = None  # what the labels are: "classification", "regression" (see label_task)
    # the model's batch axis per input, where it is not axis 0 (``edgeopt.batching``); None: no batch axis
    axes: dict[str, int | None] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, n: int) -> Dataset:
        return Dataset({k: v[:n] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[:n], self.source, self.task, dict(self.axes))


def _dtype_kind_ok(expected: np.dtype, got: np.dtype) -> bool:
    if expected.kind == "f":
        return got.kind == "f"
    if expected.kind in "iu":
        return got.kind in "iu"
    if expected.kind == "b":
        return got.kind == "b"
    return expected == got


def _first_bad_sample(mask: np.ndarray) -> int | None:
    """Index of the first sample (axis 0) where ``mask`` holds any True, or None."""
    per_sample = mask.reshape(len(mask), -1).any(axis=1) if mask.ndim > 1 else mask
    return int(np.argmax(per_sample)) if per_sample.any() else None


def _nonfinite_name(value: float) -> str:
    return "NaN" if np.isnan(value) else "Inf" if value > 0 else "-Inf"


def check_finite(where: str, arr: np.ndarray) -> None:
    """Refuse float data holding NaN or Inf, naming the first sample: ``where`` is e.g.
    "cal.npz: input 'x'"."""
    if arr.dtype.kind not in "fc":
        return
    bad = _first_bad_sample(~np.isfinite(arr))
    if bad is not None:
        sample = arr[bad].ravel()
        value = sample[~np.isfinite(sample)][0]
        raise UserInputError(f"{where} sample {bad} holds {_nonfinite_name(float(np.real(value)))}")


def _fit_dtype(where: str, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``arr`` as ``dtype``, refusing values the model's dtype cannot hold (they would become Inf
    or wrap around) with the first sample that holds one."""
    if arr.dtype == dtype:
        return arr
    if dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            out = arr.astype(dtype)
        bad = _first_bad_sample(~np.isfinite(out))
        if bad is not None:
            value = arr[bad].ravel()[~np.isfinite(out[bad].ravel())][0]
            raise UserInputError(f"{where} sample {bad} holds {value:g}, beyond the range of {dtype} "
                                 f"(the model's input type)")
        return out
    if dtype.kind in "iu" and arr.dtype.kind in "iu":
        info = np.iinfo(dtype)
        bad = _first_bad_sample((arr < info.min) | (arr > info.max))
        if bad is not None:
            value = arr[bad].ravel()[((arr[bad] < info.min) | (arr[bad] > info.max)).ravel()][0]
            raise UserInputError(f"{where} sample {bad} holds {value}, beyond the range of {dtype} "
                                 f"(the model's input type)")
    return arr.astype(dtype, copy=False)


def _check_array(path: Path, spec: TensorSpec, arr: np.ndarray) -> np.ndarray:
    where = f"{path}: input '{spec.name}'"
    expected_dtype = np.dtype(spec.dtype)
    if not _dtype_kind_ok(expected_dtype, arr.dtype):
        raise UserInputError(f"{where} has dtype {arr.dtype}, the model expects {expected_dtype}")
    sample = spec.sample_shape()
    want = "[N, " + ", ".join("?" if not isinstance(d, int) else str(d) for d in sample) + "]"
    if arr.ndim != len(sample) + 1 or any(
        isinstance(d, int) and d > 0 and a != d for a, d in zip(arr.shape[1:], sample, strict=False)
    ):
        raise UserInputError(f"{where} has shape {list(arr.shape)}, the model expects {want} "
                             f"(samples along the first axis{_batch_note(spec)})")
    if len(arr) == 0:
        raise UserInputError(f"{where} has no samples")
    if arr.size == 0:
        raise UserInputError(f"{where} has shape {list(arr.shape)}: its samples hold no values")
    check_finite(where, arr)
    return _fit_dtype(where, arr, expected_dtype)


def _batch_note(spec: TensorSpec) -> str:
    if spec.batch_axis == 0:
        return ""
    if spec.batch_axis is None:
        return f"; each sample is a whole {spec.describe_shape()} tensor"
    return f"; the model stacks them along its axis {spec.batch_axis}, {spec.describe_shape()}"


def _check_labels(path: Path, labels: np.ndarray, n: int) -> np.ndarray:
    """Labels on their own: one per sample, numbers, finite."""
    labels = np.asarray(labels)
    if labels.ndim == 0:
        raise UserInputError(f"{path}: 'labels' is a single value; give one label per sample ({n})")
    if len(labels) != n:
        raise UserInputError(f"{path}: 'labels' has {len(labels)} entries but the inputs have {n} samples")
    if labels.dtype.kind not in "biuf":
        raise UserInputError(f"{path}: 'labels' has dtype {labels.dtype}; labels are integer class indices "
                             f"or float regression targets")
    check_finite(f"{path}: 'labels'", labels)
    return labels


def label_task(source: str, labels: np.ndarray, output: TensorSpec) -> str:
    """What ``labels`` measure against the model's (first) output ``output``: "classification"
    (integer class indices, one per sample, inside the class range of a [N, C] output) or
    "regression" (targets shaped like one sample of a non-classifier output, or of any output when
    they are floats of exactly its shape). Anything else is refused, naming the first bad sample."""
    sample = output.sample_shape()
    out_desc = f"output '{output.name}' {'[N, ' + ', '.join(str(d) for d in sample) + ']'}"
    classifier = len(sample) == 1 and (not isinstance(sample[0], int) or sample[0] >= 2)
    per_sample = labels.shape[1:]
    size = int(np.prod(per_sample)) if per_sample else 1
    out_size = int(np.prod(sample)) if all(isinstance(d, int) for d in sample) else None
    if labels.dtype.kind in "biu" and classifier:
        if labels.ndim != 1:
            raise UserInputError(f"{source}: 'labels' has shape {list(labels.shape)}; {out_desc} is a classifier's, "
                                 f"so labels are class indices, one per sample (one-hot? store labels.argmax(1))")
        classes = sample[0] if isinstance(sample[0], int) else None
        outside = (labels < 0) | (labels >= classes) if classes is not None else labels < 0
        bad = _first_bad_sample(outside)
        if bad is not None:
            span = f"0..{classes - 1}" if classes is not None else "0 and up"
            raise UserInputError(f"{source}: 'labels' sample {bad} is {labels[bad]}, outside the classes {span} "
                                 f"of {out_desc}")
        return "classification"
    if out_size is not None and size == out_size and (labels.dtype.kind == "f" or not classifier):
        return "regression"
    if labels.dtype.kind == "f" and classifier and labels.ndim == 1:
        whole = bool(np.all(labels == np.round(labels)))
        raise UserInputError(f"{source}: 'labels' are {labels.dtype} but {out_desc} is a classifier's: class "
                             f"labels must be integers" + (" (they hold whole numbers: save them as int64)"
                                                            if whole else
                                                            "; float labels are regression targets, one per "
                                                            "output value"))
    raise UserInputError(f"{source}: 'labels' have {size} value(s) per sample (shape {list(labels.shape)}), "
                         f"which fits neither class indices nor regression targets for {out_desc}")


def load_dataset(path: str | Path, specs: Sequence[TensorSpec], window_hop: int | None = None,
                 outputs: Sequence[TensorSpec] | None = None, state: Sequence[str] = ()) -> Dataset:
    """Load ``path`` and check it against the model inputs ``specs``; given the model's ``outputs``,
    its labels are checked against the first one (``label_task``) and the dataset's ``task`` set.
    ``state`` names the model's recurrent state inputs, which the data must not hold (they are
    carried from one sample to the next)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        data = _load_npz(path, specs, state)
    elif suffix == ".npy":
        data = _load_npy(path, specs)
    elif suffix == ".csv":
        data = _load_csv(path, specs, window_hop)
    else:
        raise UserInputError(f"{path}: unsupported data format '{suffix}' (use .npz, .npy or .csv)")
    if outputs and data.labels is not None:
        data.task = label_task(str(path), data.labels, outputs[0])
    return data


ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry, or an empty zip
NPY_MAGIC = b"\x93NUMPY"


def _file_kind(path: Path) -> str:
    """What the file's first bytes say it is: "npz" (a zip), "npy" or "other"."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    return "npz" if head[:4] in ZIP_MAGIC else "npy" if head.startswith(NPY_MAGIC) else "other"


def _not_the_format(path: Path, want: str, found: str) -> UserInputError:
    if found == "npz" and want == "npy":
        return UserInputError(f"{path}: is an .npz archive, not an .npy array (rename it .npz)")
    if found == "npy" and want == "npz":
        return UserInputError(f"{path}: is an .npy array, not an .npz archive (rename it .npy)")
    if want == "npz":
        return UserInputError(f"{path}: not an .npz file: numpy.savez writes a zip archive of .npy arrays, and this "
                              f"file is not a zip archive")
    return UserInputError(f"{path}: not an .npy file: numpy.save writes a file that starts with \\x93NUMPY, and "
                          f"this one does not")


def _load_npz(path: Path, specs: Sequence[TensorSpec], state: Sequence[str] = ()) -> Dataset:
    if (kind := _file_kind(path)) != "npz":
        raise _not_the_format(path, "npz", kind)
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                try:
                    arrays[key] = npz[key]
                except ValueError as exc:
                    if "pickle" not in str(exc):
                        raise
                    raise UserInputError(f"{path}: array '{key}' holds Python objects (pickled), which edgeopt "
                                         f"does not load; store numeric arrays") from None
    except UserInputError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserInputError(f"{path}: not a readable .npz file ({first})") from exc
    names = [s.name for s in specs]
    if held := [k for k in arrays if k in state]:
        raise UserInputError(f"{path}: array {held[0]!r} is the model's recurrent state, which each sample takes "
                             f"from the one before (zeros at the start): leave it out; samples are steps of one "
                             f"stream")
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
    if (kind := _file_kind(path)) != "npy":
        raise _not_the_format(path, "npy", kind)
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "pickle" in first:
            raise UserInputError(f"{path}: holds Python objects (pickled), which edgeopt does not load; "
                                 f"store a numeric array") from exc
        raise UserInputError(f"{path}: not a readable .npy file ({first})") from exc
    return Dataset({specs[0].name: _check_array(path, specs[0], arr)}, None, str(path))


def read_sensor_csv(path: Path) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """(channel names, float32 samples [T, C], labels [T] or None) from a sensor CSV.

    A header row is optional (channels are named ch0, ch1, ... without one); a column named
    ``label`` holds per-row labels (whole numbers: class indices). Errors name the file's line.
    """
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise UserInputError(f"{path}: not a text CSV (it holds bytes that are not UTF-8 text)") from None
    numbered = [(i, ln) for i, ln in enumerate(text.splitlines(), start=1)
                if ln.strip() and not ln.lstrip().startswith("#")]
    if not numbered:
        raise UserInputError(f"{path}: empty CSV")
    first = [c.strip() for c in numbered[0][1].split(",")]

    def is_number(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    has_header = not all(is_number(c) for c in first)
    header = first if has_header else [f"ch{i}" for i in range(len(first))]
    rows = numbered[1:] if has_header else numbered
    label_col = next((i for i, h in enumerate(header) if h.lower() in LABEL_KEYS), None)
    values = np.empty((len(rows), len(header)), dtype=np.float64)
    for r, (lineno, row) in enumerate(rows):
        cells = row.split(",")
        if len(cells) != len(header):
            raise UserInputError(f"{path}:{lineno}: expected {len(header)} columns, found {len(cells)}")
        try:
            values[r] = [float(c) for c in cells]
        except ValueError:
            raise UserInputError(f"{path}:{lineno}: non-numeric value in row {row!r}") from None
        if not np.isfinite(values[r]).all():
            col = int(np.argmin(np.isfinite(values[r])))
            raise UserInputError(f"{path}:{lineno}: column '{header[col]}' holds "
                                 f"{_nonfinite_name(values[r, col])}")
        if label_col is not None and values[r, label_col] != round(values[r, label_col]):
            raise UserInputError(f"{path}:{lineno}: label {values[r, label_col]:g} is not a whole number "
                                 f"(a CSV's label column holds class indices)")
    labels = None
    if label_col is not None:
        labels = values[:, label_col].astype(np.int64)
        values = np.delete(values, label_col, axis=1)
        header = [h for i, h in enumerate(header) if i != label_col]
    with np.errstate(over="ignore"):
        samples = values.astype(np.float32)
    if not np.isfinite(samples).all():
        r = int(np.argmin(np.isfinite(samples).all(axis=1)))
        raise UserInputError(f"{path}:{rows[r][0]}: a value beyond the range of float32")
    return header, samples, labels


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
    where = f"{path}: input '{spec.name}'"
    return Dataset({spec.name: _fit_dtype(where, windows, np.dtype(spec.dtype))}, labels, str(path))


GENERATE_CHUNK_ELEMENTS = 1 << 20


def _standard_normal(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``rng.standard_normal(shape).astype(dtype)`` -- the same values -- drawn a few samples at a time:
    the whole float64 draw of 64 320x320 images held 157 MB beside its float32 copy (issue 15)."""
    out = np.empty(shape, dtype)
    per_sample = int(np.prod(shape[1:])) or 1
    step = max(1, GENERATE_CHUNK_ELEMENTS // per_sample)
    for start in range(0, shape[0], step):
        part = out[start:start + step]
        part[...] = rng.standard_normal(part.shape)
    return out


def generate_inputs(specs: Sequence[TensorSpec], n: int, seed: int = 0) -> Dataset:
    """Random inputs for a model when no data was given (normal floats, small non-negative ints)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in specs:
        shape = (n,) + tuple(int(d) for d in spec.sample_shape())
        dt = np.dtype(spec.dtype)
        if dt.kind == "f":
            inputs[spec.name] = _standard_normal(rng, shape, dt)
        elif dt.kind == "b":
            inputs[spec.name] = rng.integers(0, 2, shape).astype(dt)
        else:
            inputs[spec.name] = rng.integers(0, 8, shape).astype(dt)
    return Dataset(inputs, None, "generated")
