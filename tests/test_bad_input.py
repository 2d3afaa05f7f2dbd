"""Bad input: one-line error naming the culprit, exit 2, nothing left in the output location."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_cli
from onnx_models import save, with_custom_op


def _assert_clean_failure(res, tmp_path, out, *needles):
    assert res.code == 2, (res.code, res.err)
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeopt: error: "), res.err
    assert "Traceback" not in res.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == [], leftovers


def test_missing_model_file(tmp_path):
    out = tmp_path / "out"
    res = run_cli("convert", tmp_path / "nope.onnx", "-o", out, "--target", "onnx")
    _assert_clean_failure(res, tmp_path, out, "model file not found", "nope.onnx")


def test_non_onnx_bytes(tmp_path):
    bad = tmp_path / "photo.onnx"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    out = tmp_path / "out"
    res = run_cli("convert", bad, "-o", out, "--target", "onnx")
    _assert_clean_failure(res, tmp_path, out, "photo.onnx", "not")


def test_truncated_onnx_file(digits_models, tmp_path):
    data = digits_models["cnn"].read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    res = run_cli("convert", cut, "-o", out, "--target", "onnx")
    _assert_clean_failure(res, tmp_path, out, "cut.onnx")


def test_op_no_target_supports_is_named_with_its_node(tmp_path):
    model = save(with_custom_op(), tmp_path / "custom.onnx")
    out = tmp_path / "out"
    res = run_cli("convert", model, "-o", out, "--target", "onnx")
    _assert_clean_failure(res, tmp_path, out, "com.example:FancyOp", "fancy_1")


@pytest.mark.parametrize("case,needles", [
    ("wrong_name", ["cal.npz", "'pixels'", "image"]),
    ("wrong_shape", ["cal.npz", "'image'", "[16, 1, 9, 9]", "[N, 1, 8, 8]"]),
    ("wrong_dtype", ["cal.npz", "'image'", "int64", "float32"]),
])
def test_calibration_data_mismatch(digits_models, tmp_path, case, needles):
    cal = tmp_path / "cal.npz"
    if case == "wrong_name":
        np.savez(cal, pixels=np.zeros((16, 1, 8, 8), np.float32))
    elif case == "wrong_shape":
        np.savez(cal, image=np.zeros((16, 1, 9, 9), np.float32))
    else:
        np.savez(cal, image=np.zeros((16, 1, 8, 8), np.int64))
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "--quantize", "int8",
                  "--calibration", cal)
    _assert_clean_failure(res, tmp_path, out, *needles)


def test_calibration_set_too_small(digits_models, tmp_path):
    cal = tmp_path / "cal.npz"
    np.savez(cal, image=np.zeros((3, 1, 8, 8), np.float32))
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "--quantize", "int8",
                  "--calibration", cal)
    _assert_clean_failure(res, tmp_path, out, "3 samples", "at least 16")


def test_int8_without_calibration_data(digits_models, tmp_path):
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "--quantize", "int8")
    _assert_clean_failure(res, tmp_path, out, "--calibration")


def test_existing_output_dir_is_refused_and_untouched(digits_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx")
    assert res.code == 2 and "already exists" in res.err and "--force" in res.err
    assert len(res.err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_unknown_profile_suggests_the_closest(digits_models, tmp_path):
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--profile", "raspbery-pi-4")
    _assert_clean_failure(res, tmp_path, out, "unknown profile 'raspbery-pi-4'", "did you mean 'raspberry-pi-4'")


def test_unknown_target_lists_the_available_ones(digits_models, tmp_path):
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onxx")
    _assert_clean_failure(res, tmp_path, out, "unknown target 'onxx'", "did you mean 'onnx'")


def test_target_the_profile_cannot_run(digits_models, tmp_path):
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--profile", "iphone-15", "--target", "onnx")
    _assert_clean_failure(res, tmp_path, out, "iphone-15", "coreml")


def test_dynamic_dim_left_unresolved_suggests_input_shape(tmp_path):
    from onnx_models import dynamic_dims

    model = save(dynamic_dims(), tmp_path / "dyn.onnx")
    out = tmp_path / "out"
    res = run_cli("convert", model, "-o", out, "--target", "onnx")
    _assert_clean_failure(res, tmp_path, out, "input 'x'", "--input-shape x:N,3,")
    # and fixing it works
    res = run_cli("convert", model, "-o", out, "--target", "onnx", "--input-shape", "x:1,3,16", "-q")
    assert res.code == 0, res.err


def test_malformed_input_shape_flag(digits_models, tmp_path):
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "--input-shape", "image=1,1,8,8")
    _assert_clean_failure(res, tmp_path, out, "--input-shape", "NAME:d0,d1")


def test_failure_during_the_work_leaves_nothing(digits_models, tmp_path, monkeypatch):
    """A failure after the staging directory exists (here: in validation) removes it again."""
    from edgeopt.converters import pipeline
    from edgeopt.errors import UserInputError

    def broken(*args, **kwargs):
        raise UserInputError("validation exploded")

    monkeypatch.setattr(pipeline, "_validate", broken)
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx")
    _assert_clean_failure(res, tmp_path, out, "validation exploded")


def test_disk_full_is_an_environment_error_and_leaves_nothing(digits_models, tmp_path, monkeypatch):
    import errno

    from edgeopt.converters.targets.onnx import OnnxTarget

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(OnnxTarget, "_compile", full)
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx")
    _assert_clean_failure(res, tmp_path, out, "no space left on device")
