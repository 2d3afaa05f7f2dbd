from __future__ import annotations

import numpy as np
import pytest

from edgeopt.data import generate_inputs, load_dataset
from edgeopt.errors import UserInputError
from edgeopt.specs import TensorSpec

IMG = [TensorSpec("image", ("batch", 1, 8, 8), "float32")]
SENSOR_CF = [TensorSpec("window", ("batch", 3, 4), "float32")]  # [N, C, T]
SENSOR_CL = [TensorSpec("window", ("batch", 4, 3), "float32")]  # [N, T, C]


def test_npz_with_labels_and_float64_cast(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, image=np.ones((5, 1, 8, 8)), labels=np.arange(5))
    ds = load_dataset(p, IMG)
    assert len(ds) == 5 and ds.inputs["image"].dtype == np.float32
    assert ds.labels.tolist() == [0, 1, 2, 3, 4]
    assert len(ds.take(2)) == 2


def test_npy_for_one_input_model_only(tmp_path):
    p = tmp_path / "d.npy"
    np.save(p, np.zeros((3, 1, 8, 8), np.float32))
    assert len(load_dataset(p, IMG)) == 3
    two = IMG + [TensorSpec("mask", ("batch", 8), "float32")]
    with pytest.raises(UserInputError, match="one-input model.*image, mask"):
        load_dataset(p, two)


@pytest.mark.parametrize("arrays,message", [
    ({"image": np.zeros((2, 1, 8, 8), np.float32), "labels": np.arange(3)}, "'labels' has 3 entries"),
    ({"image": np.zeros((0, 1, 8, 8), np.float32)}, "no samples"),
    ({"image": np.zeros((2, 8, 8), np.float32)}, r"shape \[2, 8, 8\].*\[N, 1, 8, 8\]"),
    ({"image": np.zeros((2, 1, 8, 8), bool)}, "dtype bool"),
])
def test_npz_mismatches(tmp_path, arrays, message):
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    with pytest.raises(UserInputError, match=message):
        load_dataset(p, IMG)


def test_unreadable_and_unknown_formats(tmp_path):
    p = tmp_path / "d.npz"
    p.write_bytes(b"not a zip")
    with pytest.raises(UserInputError, match="not an .npz file: numpy.savez writes a zip archive"):
        load_dataset(p, IMG)
    np.savez(p, image=np.ones((5, 1, 8, 8), np.float32))
    p.write_bytes(p.read_bytes()[:100])  # a zip cut short
    with pytest.raises(UserInputError, match="not a readable .npz file"):
        load_dataset(p, IMG)
    q = tmp_path / "d.parquet"
    q.write_bytes(b"x")
    with pytest.raises(UserInputError, match="unsupported data format"):
        load_dataset(q, IMG)
    with pytest.raises(UserInputError, match="not found"):
        load_dataset(tmp_path / "missing.npz", IMG)


def _csv(tmp_path, text):
    p = tmp_path / "s.csv"
    p.write_text(text)
    return p


def test_csv_windows_channels_first_and_last(tmp_path):
    rows = "\n".join(f"{t},{10 + t},{20 + t},{t // 4}" for t in range(12))
    p = _csv(tmp_path, "ax,ay,az,label\n" + rows + "\n")
    cf = load_dataset(p, SENSOR_CF)
    assert cf.inputs["window"].shape == (3, 3, 4)
    np.testing.assert_array_equal(cf.inputs["window"][1, 0], [4, 5, 6, 7])  # channel ax, second window
    assert cf.labels.tolist() == [0, 1, 2]
    cl = load_dataset(p, SENSOR_CL)
    np.testing.assert_array_equal(cl.inputs["window"][0, :, 1], [10, 11, 12, 13])


def test_csv_without_header_and_hop(tmp_path):
    p = _csv(tmp_path, "\n".join(f"{t},{t},{t}" for t in range(8)))
    ds = load_dataset(p, SENSOR_CF, window_hop=2)
    assert len(ds) == 3 and ds.labels is None


@pytest.mark.parametrize("text,message", [
    ("a,b,c\n1,2,3\n4,5\n", r"s.csv:3: expected 3 columns, found 2"),
    ("a,b,c\n1,2,x\n", r"s.csv:2: non-numeric"),
    ("a,b\n1,2\n", "2 channel column"),
    ("a,b,c\n1,2,3\n", "fewer than one window"),
])
def test_csv_errors_name_the_line(tmp_path, text, message):
    with pytest.raises(UserInputError, match=message):
        load_dataset(_csv(tmp_path, text), SENSOR_CF)


def test_generated_inputs_match_specs():
    ds = generate_inputs(IMG + [TensorSpec("ids", ("batch", 4), "int64")], 6, seed=1)
    assert ds.inputs["image"].shape == (6, 1, 8, 8) and ds.inputs["ids"].dtype == np.int64
    assert ds.source == "generated"
