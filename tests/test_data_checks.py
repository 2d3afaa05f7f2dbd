"""Data checks: every data file (calibration, validation, distillation) is checked before any work —
non-finite values, no samples, dtype and shape, labels against the model's outputs — and a bad one
gives one line naming the file, the input and the first bad sample, exit 2, nothing written."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest

from edgeopt.data import label_task, load_dataset
from edgeopt.errors import UserInputError
from edgeopt.specs import TensorSpec

from conftest import run_cli

IMG = [TensorSpec("image", ("batch", 1, 8, 8), "float32")]
LOGITS = TensorSpec("logits", ("batch", 10), "float32")
VALUE = TensorSpec("value", ("batch", 1), "float32")


def _images(n: int = 32) -> np.ndarray:
    return np.random.default_rng(0).random((n, 1, 8, 8), dtype=np.float32)


def _poked(value: float, sample: int, n: int = 32) -> np.ndarray:
    x = _images(n)
    x[sample, 0, 3, 4] = value
    return x


def _write(path, kind: str) -> None:
    """One bad data file per case of the table below."""
    labels = np.arange(32) % 10
    writers = {
        "nan": lambda: np.savez(path, image=_poked(np.nan, 17)),
        "inf": lambda: np.savez(path, image=_poked(np.inf, 5)),
        "-inf": lambda: np.savez(path, image=_poked(-np.inf, 0)),
        "too-big": lambda: np.savez(path, image=_images().astype(np.float64) + _big(9)),
        "empty": lambda: np.savez(path, image=np.zeros((0, 1, 8, 8), np.float32)),
        "label-range": lambda: np.savez(path, image=_images(), labels=np.where(np.arange(32) == 3, 10, labels)),
        "label-negative": lambda: np.savez(path, image=_images(), labels=np.where(np.arange(32) == 6, -1, labels)),
        "label-float": lambda: np.savez(path, image=_images(), labels=labels.astype(np.float32)),
        "label-scalar": lambda: np.savez(path, image=_images(), labels=np.int64(3)),
        "label-text": lambda: np.savez(path, image=_images(), labels=np.array(["cat"] * 32)),
        "label-nan": lambda: np.savez(path, image=_images(), labels=np.where(np.arange(32) == 4, np.nan, 1.0)),
        "text": lambda: path.write_text("image,label\n0.1,3\n"),
        "npy-as-npz": lambda: path.write_bytes(_npy_bytes()),
        "pickled": lambda: np.savez(path, image=np.array([object()] * 32, dtype=object)),
    }
    writers[kind]()


def _big(sample: int) -> np.ndarray:
    x = np.zeros((32, 1, 8, 8))
    x[sample, 0, 0, 0] = 1e300  # finite as float64, Inf as the model's float32
    return x


def _npy_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, _images())
    return buf.getvalue()


# (data flag, file kind, the one line printed after "edgeopt: error: ")
BAD_DATA = [
    ("--calibration", "nan", "cal.npz: input 'image' sample 17 holds NaN"),
    ("--calibration", "inf", "cal.npz: input 'image' sample 5 holds Inf"),
    ("--validation", "-inf", "cal.npz: input 'image' sample 0 holds -Inf"),
    ("--validation", "too-big", "cal.npz: input 'image' sample 9 holds 1e+300, beyond the range of float32"),
    ("--calibration", "empty", "cal.npz: input 'image' has no samples"),
    ("--validation", "label-range", "cal.npz: 'labels' sample 3 is 10, outside the classes 0..9 of output"),
    ("--validation", "label-negative", "cal.npz: 'labels' sample 6 is -1, outside the classes 0..9"),
    ("--validation", "label-float", "cal.npz: 'labels' are float32 but output 'logits' [N, 10] is a classifier's"),
    ("--validation", "label-scalar", "cal.npz: 'labels' is a single value"),
    ("--validation", "label-text", "cal.npz: 'labels' has dtype <U3"),
    ("--validation", "label-nan", "cal.npz: 'labels' sample 4 holds NaN"),
    ("--validation", "text", "cal.npz: not an .npz file: numpy.savez writes a zip archive"),
    ("--calibration", "npy-as-npz", "cal.npz: is an .npy array, not an .npz archive"),
    ("--calibration", "pickled", "cal.npz: array 'image' holds Python objects (pickled)"),
    ("--distill", "nan", "cal.npz: input 'image' sample 17 holds NaN"),
    ("--distill", "label-range", "cal.npz: 'labels' sample 3 is 10, outside the classes 0..9"),
]


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The converter's temporary directories go here, so a test can see that none is left."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


@pytest.mark.parametrize("flag,kind,line", BAD_DATA, ids=[f"{f[2:]}-{k}" for f, k, _ in BAD_DATA])
def test_bad_data_is_refused_before_any_work(digits_models, tmp_path, private_tmp, monkeypatch, flag, kind, line):
    """Exit 2, one line naming file, input and first bad sample; no output folder, no staging
    sibling, no temporary directory; and no pass ran (pruning would come before the distill step)."""
    from edgeopt.converters.passes.prune_structured import PruneStructured

    def no_work(*args, **kwargs):
        raise AssertionError("a pass ran before the data was checked")

    monkeypatch.setattr(PruneStructured, "_apply", no_work)
    data = tmp_path / "cal.npz"
    _write(data, kind)
    out = tmp_path / "out"
    extra = {"--calibration": ["--quantize", "int8"], "--distill": ["--prune-channels", "0.5"]}.get(flag, [])
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "-q", flag, data, *extra)
    assert res.code == 2, (res.code, res.err)
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.err, res.err
    assert lines[0].startswith("edgeopt: error: ") and line in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.npz", "tmp"]  # no out/, no .out.*.partial
    assert list(private_tmp.iterdir()) == []


def test_float64_data_is_cast_and_whole_number_csv_labels_are_classes(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, image=_images().astype(np.float64), labels=np.arange(32) % 10)
    ds = load_dataset(p, IMG, outputs=[LOGITS])
    assert ds.inputs["image"].dtype == np.float32 and ds.task == "classification"


@pytest.mark.parametrize("text,message", [
    ("ax,ay,az\n1,2,3\nnan,2,3\n", r"s.csv:3: column 'ax' holds NaN"),
    ("# a comment\nax,ay,az\n\n1,2,inf\n", r"s.csv:4: column 'az' holds Inf"),
    ("ax,ay,az,label\n1,2,3,0.5\n", r"s.csv:2: label 0.5 is not a whole number"),
])
def test_csv_refusals_name_the_line_of_the_file(tmp_path, text, message):
    p = tmp_path / "s.csv"
    p.write_text(text)
    with pytest.raises(UserInputError, match=message):
        load_dataset(p, [TensorSpec("w", ("batch", 3, 4), "float32")])


def test_binary_file_named_csv_is_refused(tmp_path):
    p = tmp_path / "s.csv"
    p.write_bytes(bytes(range(256)))
    with pytest.raises(UserInputError, match="s.csv: not a text CSV"):
        load_dataset(p, [TensorSpec("w", ("batch", 3, 4), "float32")])


def test_npz_named_npy_and_text_named_npy(tmp_path):
    p = tmp_path / "d.npy"
    np.savez(p.with_suffix(".npz"), image=_images())
    p.write_bytes(p.with_suffix(".npz").read_bytes())
    with pytest.raises(UserInputError, match=r"d.npy: is an .npz archive, not an .npy array \(rename it .npz\)"):
        load_dataset(p, IMG)
    p.write_text("1,2,3\n")
    with pytest.raises(UserInputError, match=r"d.npy: not an .npy file"):
        load_dataset(p, IMG)


def test_int_data_beyond_the_model_int_type(tmp_path):
    p = tmp_path / "d.npz"
    ids = np.zeros((4, 3), np.int64)
    ids[2, 1] = 2**40
    np.savez(p, ids=ids)
    with pytest.raises(UserInputError, match=r"input 'ids' sample 2 holds 1099511627776, beyond the range of int32"):
        load_dataset(p, [TensorSpec("ids", ("batch", 3), "int32")])


@pytest.mark.parametrize("labels,output,task", [
    (np.arange(4) % 10, LOGITS, "classification"),
    (np.array([True, False, True, True]), LOGITS, "classification"),
    (np.ones((4, 1), np.float32), VALUE, "regression"),
    (np.ones(4, np.float32), VALUE, "regression"),
    (np.arange(4), VALUE, "regression"),                           # integer targets of a regression output
    (np.ones((4, 10), np.float32), LOGITS, "regression"),          # float targets of exactly the output's shape
])
def test_label_task(labels, output, task):
    assert label_task("d.npz", labels, output) == task


@pytest.mark.parametrize("labels,output,message", [
    (np.ones((4, 10), np.int64), LOGITS, r"'labels' has shape \[4, 10\].*one-hot\? store labels.argmax\(1\)"),
    (np.array([0.5, 1, 2, 3], np.float32), LOGITS, "class labels must be integers; float labels are regression"),
    (np.ones((4, 3), np.float32), VALUE, r"'labels' have 3 value\(s\) per sample .* output 'value' \[N, 1\]"),
    (np.array([0, 1, 12, 13]), LOGITS, r"'labels' sample 2 is 12, outside the classes 0..9"),
])
def test_label_refusals(labels, output, message):
    with pytest.raises(UserInputError, match=message):
        label_task("d.npz", labels, output)
