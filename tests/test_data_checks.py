"""Data checks: every data file (calibration, validation, distillation) is checked before any work —
non-finite values, no samples, dtype and shape, labels against the model's outputs — and a bad one
gives one line naming the file, the input and the first bad sample, exit 2, nothing written."""

from __future__ import annotations

import numpy as np
import pytest

from edgeopt.data import label_task, load_dataset
from edgeopt.errors import UserInputError
from edgeopt.specs import TensorSpec

IMG = [TensorSpec("image", ("batch", 1, 8, 8), "float32")]
LOGITS = TensorSpec("logits", ("batch", 10), "float32")
VALUE = TensorSpec("value", ("batch", 1), "float32")


def _images(n: int = 32) -> np.ndarray:
    return np.random.default_rng(0).random((n, 1, 8, 8), dtype=np.float32)


# The bad data files refused through the CLI (NaN, Inf, empty, labels out of range, a text file named
# .npz ...) are rows of the bad-input table in tests/test_bad_input.py.


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
