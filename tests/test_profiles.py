"""Board profiles give their defaults per target: `--profile raspberry-pi-4 --target tvm` does not
inherit the tflite INT8 recipe (which demands calibration data and buys TVM no speed)."""

from __future__ import annotations

import pytest

from edgeopt.converters.pipeline import ConvertOptions, resolve_recipe
from edgeopt.errors import UserInputError
from edgeopt.profiles import load_profile, profile_names

from conftest import run_cli


def _recipe(profile: str, target: str | None = None, quantize: str | None = None) -> tuple[str, str]:
    _, target_name, mode = resolve_recipe(ConvertOptions(model="m.onnx", output="out", profile=profile,
                                                         target=target, quantize=quantize))
    return target_name, mode


def test_a_profile_default_applies_to_the_target_it_was_chosen_for():
    assert _recipe("raspberry-pi-4") == ("tflite", "int8")
    assert _recipe("raspberry-pi-4", "onnx") == ("onnx", "int8")
    assert _recipe("raspberry-pi-4", "tvm") == ("tvm", "none")  # was int8: tflite's default, needing calibration
    assert _recipe("raspberry-pi-4", "tvm", "int8") == ("tvm", "int8")  # the flag still wins


@pytest.mark.parametrize("name", profile_names())
def test_every_shipped_profile_has_a_default_for_each_of_its_formats(name):
    profile = load_profile(name)
    assert profile.default_target in profile.formats
    for fmt in profile.formats:
        mode = profile.default_quantize_for(fmt)
        assert mode in ("none", "fp16", "int8", "int8-dynamic", "int16x8", "int4"), (fmt, mode)
        if fmt == "tvm":
            assert mode == "none"  # TVM lowers int8 as rounding around float32 compute (docs/tvm.md)


def test_profiles_show_lists_the_default_per_target():
    shown = run_cli("profiles", "show", "raspberry-pi-4", "--json").json()["default_recipe"]
    assert shown["target"] == "tflite" and shown["quantize"] == "int8"
    assert shown["quantize_by_target"] == {"tflite": "int8", "onnx": "int8", "tvm": "none"}
    assert "tvm: none" in run_cli("profiles", "show", "raspberry-pi-4").out


BOARD = """name = "board"
description = "a board"
formats = ["onnx", "tvm"]
[cpu]
arch = "aarch64"
cores = 4
[memory]
ram = "1 GiB"
storage = "8 GB"
model_ram_budget = "256 MiB"
model_storage_budget = "1 GiB"
[default_recipe]
target = "onnx"
quantize = "int8"
"""


@pytest.mark.parametrize("entry, message", [
    ('tflite = { quantize = "int8" }', "'tflite' is not one"),
    ('tvm = { quantise = "none" }', "expected { quantize"),
    ('tvm = "none"', "unknown key"),
])
def test_a_bad_per_target_entry_is_named(tmp_path, entry, message):
    path = tmp_path / "board.toml"
    path.write_text(BOARD + entry + "\n")
    with pytest.raises(UserInputError, match=f"default_recipe.{entry.split()[0]}: .*{message}"):
        load_profile(str(path))


def test_a_profile_without_per_target_entries_keeps_one_default_for_all(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(BOARD)
    assert load_profile(str(path)).default_quantize_for("tvm") == "int8"
    path.write_text(BOARD + 'tvm = { quantize = "none" }\n')
    assert load_profile(str(path)).default_quantize_for("tvm") == "none"
