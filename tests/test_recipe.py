"""Recipes as files (issue 17 point 4): a TOML recipe converts exactly as the same flags do, an
artifact's manifest reproduces it byte for byte, flags win over a recipe and ``--set`` changes one of
its keys, every key is checked against the declarations (an unknown one named with the closest), and
the recipe keys and ``edgeopt convert``'s options carry the same names."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from edgeopt import registry
from edgeopt.cli.convert import RECIPE_FLAGS, convert_cmd
from edgeopt.converters.pipeline import ConvertOptions
from edgeopt.converters.recipe import (
    RECIPE_KEYS,
    RECIPE_TABLES,
    apply_recipe,
    load_recipe,
    reference_markdown,
    set_value,
)
from edgeopt.converters.settings import PASS_OPTIONS
from edgeopt.errors import UserInputError

from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent

RECIPE = """\
target = "onnx"
quantize = "int8"
max_accuracy_drop = 2.0
name = "digits-recipe"
version = "7"

[passes.quantize-int8]
calibration_method = "percentile"
per_channel = false
"""


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def convert(digits_models, out: Path, *args) -> dict:
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--calibration", digits_models["calibration"],
                  "--validation", digits_models["validation"], "-q", "--json", *args)
    assert res.code == 0, res.err
    return json.loads((out / "manifest.json").read_text())


def test_a_recipe_converts_as_its_flags_do_and_the_manifest_reproduces_it(tmp_path, digits_models):
    (tmp_path / "int8.toml").write_text(RECIPE)
    by_file = convert(digits_models, tmp_path / "file", "--recipe", tmp_path / "int8.toml")
    by_flags = convert(digits_models, tmp_path / "flags", "--target", "onnx", "--quantize", "int8",
                       "--max-accuracy-drop", "2.0", "--name", "digits-recipe", "--version", "7",
                       "--calibration-method", "percentile", "--set", "quantize-int8.per_channel=false")
    assert by_file["recipe"] == by_flags["recipe"] and by_file["settings"] == by_flags["settings"]
    assert sha(tmp_path / "file" / "model.onnx") == sha(tmp_path / "flags" / "model.onnx")
    assert by_file["settings"] == {"target": "onnx", "quantize": "int8", "max_accuracy_drop": 2.0,
                                   "name": "digits-recipe", "version": "7",
                                   "passes": {"quantize-int8": {"calibration_method": "percentile",
                                                                "per_channel": False}}}
    int8 = next(r for r in by_file["recipe"] if r["pass"] == "quantize-int8")["params"]
    assert int8["calibration_method"] == "percentile" and int8["per_channel"] is False

    again = convert(digits_models, tmp_path / "again", "--recipe", tmp_path / "file" / "manifest.json")
    assert sha(tmp_path / "again" / "model.onnx") == sha(tmp_path / "file" / "model.onnx")
    assert (again["name"], again["version"], again["settings"]) == ("digits-recipe", "7", by_file["settings"])


def test_flags_win_over_the_recipe_and_set_changes_it(tmp_path, digits_models):
    (tmp_path / "int8.toml").write_text(RECIPE)
    m = convert(digits_models, tmp_path / "a", "--recipe", tmp_path / "int8.toml", "--calibration-method", "minmax",
                "--version", "8", "--set", "name=other", "--set", "passes.quantize-int8.per_channel=true")
    assert (m["name"], m["version"]) == ("other", "8")
    assert m["settings"]["passes"]["quantize-int8"] == {"calibration_method": "minmax", "per_channel": True}
    # a setting of the recipe that the conversion would not use is refused, as a flag would be
    res = run_cli("convert", digits_models["cnn"], "-o", tmp_path / "c", "--recipe", tmp_path / "int8.toml",
                  "--quantize", "fp16", "-q")
    assert res.code == 2 and "calibration-method percentile: target 'onnx' does not use it with --quantize fp16" \
        in res.err
    res = run_cli("convert", digits_models["cnn"], "-o", tmp_path / "b", "--recipe", tmp_path / "int8.toml",
                  "--set", "targets.onnx.x=1", "-q")
    assert res.code == 2 and "int8.toml: [targets.onnx] has no parameter 'x'" in res.err
    assert not (tmp_path / "b").exists()


def test_set_without_a_recipe_reaches_target_parameters(tmp_path, digits_models):
    m = convert(digits_models, tmp_path / "t", "--target", "tflite", "--quantize", "int8",
                "--set", "targets.tflite.float_io=true")
    assert m["settings"]["targets"] == {"tflite": {"float_io": True}}
    assert all(i["dtype"] == "float32" for i in m["inputs"] + m["outputs"])


@pytest.mark.parametrize(("recipe", "message"), [
    ({"quantise": "int8"}, "unknown setting 'quantise' (did you mean 'quantize'?)"),
    ({"quantize": "int3"}, "parameter 'quantize' must be one of none, fp16, int8"),
    ({"min_cosine": "high"}, "'min_cosine' must be float, got 'high'"),
    ({"validation_samples": 1.5}, "'validation_samples' must be int, got 1.5"),
    ({"passes": {"quantise-int8": {}}}, "no pass 'quantise-int8' (did you mean 'quantize-int8'?)"),
    ({"passes": {"quantize-int8": {"calibraton_method": "minmax"}}},
     "[passes.quantize-int8] has no parameter 'calibraton_method' (did you mean 'calibration_method'?)"),
    ({"passes": {"quantize-int8": {"per_channel": "no"}}}, "'per_channel' must be bool, got 'no'"),
    ({"passes": {"distill": {"data": "train.npz"}}}, "a recipe holds settings, not data; give it with --distill"),
    ({"passes": {"distill": {"epochs": 3}}}, "the recipe distils ([passes.distill]): give the data with --distill"),
    ({"targets": {"tflight": {}}}, "no target 'tflight' (did you mean 'tflite'?)"),
    ({"target": "onnx", "targets": {"tflite": {"float_io": True}}}, "sets parameters of target 'tflite', but the "
                                                                    "target is 'onnx'"),
    ({"targets": {"tflite": {}, "tvm": {}}}, "parameters for several targets (tflite, tvm)"),
    ({"input_shapes": {"x": [1, 0]}}, "input_shapes.x must be a list of positive dims"),
    ({"batch_axes": {"x": "first"}}, 'batch_axes.x must be an axis or "none"'),
    ({"prune_channels": 0.5, "passes": {"prune-structured": {"ratio": 0.25}}}, "prune_channels is set twice"),
])
def test_every_key_is_checked_and_an_unknown_one_named(recipe, message):
    with pytest.raises(UserInputError) as err:
        apply_recipe(ConvertOptions(model=Path("m.onnx"), output=Path("out")), recipe, "r.toml")
    assert message in str(err.value) and str(err.value).startswith("r.toml: ")


def test_pass_parameters_that_are_options_land_in_their_fields():
    opts = apply_recipe(ConvertOptions(model=Path("m.onnx"), output=Path("out")), {
        "passes": {"canonicalize": {"input_shapes": {"x": [1, 64]}, "simplify": False},
                   "prune-structured": {"ratio": 0.5, "norm": "l2"}},
        "batch_axes": {"y": "none"}, "targets": {"tvm": {"batch": 4}}}, "r.toml", frozenset())
    assert opts.input_shapes == {"x": (1, 64)} and opts.prune_channels == 0.5 and opts.batch_axes == {"y": None}
    assert opts.pass_params == {"canonicalize": {"simplify": False}, "prune-structured": {"norm": "l2"}}
    assert (opts.target, opts.target_params) == ("tvm", {"batch": 4})


def test_set_parses_toml_values_and_short_keys():
    recipe: dict = {}
    for assignment in ("quantize=int8", "min_cosine=0.99", "version=7", "input_shapes.x=[1, 64]", "quantize-int8.keep_float="
                       '["/0/Conv", "/1/Gemm"]', "tflite.float_io=true", "passes.canonicalize.simplify=false"):
        set_value(recipe, assignment)
    assert recipe == {"quantize": "int8", "min_cosine": 0.99, "version": 7, "input_shapes": {"x": [1, 64]},
                      "passes": {"quantize-int8": {"keep_float": ["/0/Conv", "/1/Gemm"]},
                                 "canonicalize": {"simplify": False}},
                      "targets": {"tflite": {"float_io": True}}}
    opts = apply_recipe(ConvertOptions(model=Path("m.onnx"), output=Path("out")), recipe, "--set")
    assert opts.pass_params["quantize-int8"]["keep_float"] == "/0/Conv,/1/Gemm" and opts.version == "7"
    with pytest.raises(UserInputError, match="expected KEY=VALUE"):
        set_value({}, "quantize")


def test_bad_recipe_files_are_one_line_errors(tmp_path):
    (tmp_path / "bad.toml").write_text("target = \n")
    with pytest.raises(UserInputError, match=r"bad.toml: not valid TOML"):
        load_recipe(tmp_path / "bad.toml")
    with pytest.raises(UserInputError, match="no such file"):
        load_recipe(tmp_path / "none.toml")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({"schema": "edgeopt.manifest/1", "recipe": []}))
    with pytest.raises(UserInputError, match="records no settings"):
        load_recipe(tmp_path / "old")


def test_recipe_keys_and_convert_options_carry_the_same_names():
    options = {p.name for p in convert_cmd.params}
    fields = set(RECIPE_FLAGS.values())
    assert fields == {p.name for p in RECIPE_KEYS} | (set(RECIPE_TABLES) - {"preprocessing"}), \
        "a recipe key without a convert option, or the other way round"
    assert set(RECIPE_FLAGS) <= options
    target_params = {p.name for t in registry.names(registry.TARGETS) for p in registry.load(registry.TARGETS, t).params}
    # every other option is a pass parameter, a target parameter, the preprocessing, data, or output
    not_settings = {"model", "output", "calibration", "validation", "distill", "student", "force", "recipe",
                    "assignments", "as_json", "quiet", "log_file", "preprocessing_file", "hop", "layout",
                    "channels", "sample_rate", "normalize", "int4_block_size", "fp16_io", "no_simplify"}
    pass_flags = {flag.lstrip("-").replace("-", "_") for flag in PASS_OPTIONS.values()}
    assert options - set(RECIPE_FLAGS) - target_params - not_settings - pass_flags == set()


def test_docs_embed_the_generated_recipe_reference():
    page = (ROOT / "docs" / "converter.md").read_text()
    begin, end = "<!-- recipe-reference:begin -->\n", "<!-- recipe-reference:end -->"
    embedded = page[page.index(begin) + len(begin):page.index(end)]
    assert embedded == reference_markdown(), "docs/converter.md is out of date: paste reference_markdown()"


def test_the_python_api_takes_a_recipe(tmp_path, digits_models):
    import edgeopt

    (tmp_path / "int8.toml").write_text(RECIPE)
    result = edgeopt.convert(digits_models["cnn"], tmp_path / "api", recipe=tmp_path / "int8.toml",
                             calibration=digits_models["calibration"], validation=digits_models["validation"],
                             version="9")
    assert result.manifest["settings"]["passes"]["quantize-int8"]["calibration_method"] == "percentile"
    assert result.manifest["version"] == "9"  # the option given wins
    again = edgeopt.convert(digits_models["cnn"], tmp_path / "api2", recipe={"target": "onnx", "quantize": "fp16"})
    assert again.manifest["model"]["quantize"] == "fp16"
