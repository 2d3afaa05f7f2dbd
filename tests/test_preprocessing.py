"""The manifest's preprocessing: defaults from the input shape, options checked against it."""

from __future__ import annotations

import json

import pytest

from edgeopt.converters.preprocessing import parse_normalize, resolve_preprocessing
from edgeopt.errors import UserInputError
from edgeopt.specs import TensorSpec

from conftest import run_cli


def spec(*shape):
    return [TensorSpec("x", ("batch", *shape), "float32")]


def test_defaults_come_from_the_input_shape():
    assert resolve_preprocessing(spec(3, 64), {}) == {
        "window": 64, "hop": 64, "layout": "channels_first", "channels": None, "sample_rate_hz": None,
        "normalization": None}
    assert resolve_preprocessing(spec(128, 6), {})["layout"] == "channels_last"
    assert resolve_preprocessing(spec(128, 6), {})["window"] == 128
    one = resolve_preprocessing(spec(100), {})
    assert (one["window"], one["layout"]) == (100, "channels_last")


def test_channel_names_pick_the_layout_and_normalization_broadcasts():
    got = resolve_preprocessing(spec(8, 8), {"channels": list("abcdefgh"), "hop": 4, "layout": "channels_last",
                                             "normalization": {"mean": 1, "std": [2]}})
    assert got["layout"] == "channels_last" and got["hop"] == 4
    assert got["normalization"] == {"mean": [1.0] * 8, "std": [2.0] * 8}
    assert resolve_preprocessing(spec(20, 3), {"channels": ["x", "y", "z"]})["layout"] == "channels_last"


@pytest.mark.parametrize("given,message", [
    ({"channels": ["a", "b"]}, "2 channels do not fit input 'x'"),
    ({"window": 32}, "window 32 does not match input 'x'"),
    ({"hop": 0}, "hop must be a positive integer"),
    ({"normalization": {"mean": [0, 0], "std": [1, 1]}}, "2 mean values for 3 channels"),
    ({"normalization": {"mean": [0], "std": [0]}}, "std must be > 0"),
    ({"layout": "nct"}, "layout must be one of"),
    ({"windw": 3}, "unknown key"),
    ({"channels": ["a", "a", "b"]}, "distinct names"),
])
def test_bad_preprocessing_is_named(given, message):
    with pytest.raises(UserInputError, match=message):
        resolve_preprocessing(spec(3, 64), given)


def test_image_models_keep_nulls_and_reject_options():
    image = [TensorSpec("image", ("batch", 1, 8, 8), "float32")]
    assert set(resolve_preprocessing(image, {}).values()) == {None}
    with pytest.raises(UserInputError, match=r"'image' \[batch, 1, 8, 8\]"):
        resolve_preprocessing(image, {"hop": 2})


def test_parse_normalize():
    assert parse_normalize("0:1, 2.5:0.5") == {"mean": [0.0, 2.5], "std": [1.0, 0.5]}
    with pytest.raises(UserInputError, match="--normalize"):
        parse_normalize("1,2")


def test_convert_writes_preprocessing_into_the_manifest(imu_model, tmp_path):
    manifest = json.loads((imu_model["artifact"] / "manifest.json").read_text())
    pre = manifest["preprocessing"]
    assert (pre["window"], pre["hop"], pre["layout"], pre["channels"]) == (64, 32, "channels_first", ["ax", "ay", "az"])
    assert pre["sample_rate_hz"] == 50.0 and len(pre["normalization"]["std"]) == 3
    out = tmp_path / "flags"
    res = run_cli("convert", imu_model["model"], "-o", out, "--target", "onnx", "-q", "--preprocessing",
                  imu_model["preprocessing"], "--hop", "16", "--normalize", "0:2")
    assert res.code == 0, res.err
    pre = json.loads((out / "manifest.json").read_text())["preprocessing"]
    assert pre["hop"] == 16 and pre["normalization"] == {"mean": [0.0] * 3, "std": [2.0] * 3}
    assert pre["channels"] == ["ax", "ay", "az"]  # from the file, not overridden


def test_convert_rejects_preprocessing_that_does_not_fit_before_writing(imu_model, tmp_path):
    out = tmp_path / "bad"
    res = run_cli("convert", imu_model["model"], "-o", out, "--target", "onnx", "-q", "--channels", "ax,ay")
    assert res.code == 2 and "2 channels do not fit input 'imu'" in res.err
    assert not out.exists() and not list(tmp_path.iterdir())
