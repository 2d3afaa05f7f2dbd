"""Core ML target, bad input: one line naming the culprit, exit 2, nothing left behind — and the
refusals happen before any conversion work."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from conftest import run_cli
from onnx_models import save


def _assert_clean_failure(res, tmp_path, out, *needles):
    assert res.code == 2, (res.code, res.err)
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeopt: error: "), res.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")] == []


def _model(nodes, inputs, outputs, inits=(), opset=17):
    model = h.make_model(h.make_graph(nodes, "bad", inputs, outputs, initializer=list(inits)),
                         opset_imports=[h.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _fast_fail(monkeypatch):
    """Fail the test if conversion work starts (the refusal must come before it)."""
    from edgeopt.converters.targets.coreml import CoreMLTarget

    def no_work(*args, **kwargs):
        raise AssertionError("compile started before the input was rejected")

    monkeypatch.setattr(CoreMLTarget, "_compile", no_work)


def test_ops_without_a_core_ml_lowering_are_named_with_their_nodes(tmp_path, monkeypatch):
    _fast_fail(monkeypatch)
    nodes = [h.make_node("Relu", ["x"], ["a"], name="relu"),
             h.make_node("CumSum", ["a", "axis"], ["b"], name="running_total"),
             h.make_node("Resize", ["b", "", "scales"], ["y"], name="upsample_cubic", mode="cubic")]
    inits = [numpy_helper.from_array(np.array(1, np.int64), "axis"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    model = save(_model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 2, 4, 4])],
                        [h.make_tensor_value_info("y", T.FLOAT, [1, 2, 8, 8])], inits), tmp_path / "m.onnx")
    out = tmp_path / "out"
    res = run_cli("convert", model, "-o", out, "--target", "coreml")
    _assert_clean_failure(res, tmp_path, out, "target 'coreml' does not support", "CumSum (node 'running_total')",
                          "Resize with mode='cubic' (node 'upsample_cubic')")


def test_weights_computed_at_run_time_are_named(tmp_path, monkeypatch):
    _fast_fail(monkeypatch)
    nodes = [h.make_node("Conv", ["x", "w"], ["y"], name="conv_dynamic_weight")]
    model = save(_model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 2, 5, 5]),
                                h.make_tensor_value_info("w", T.FLOAT, [3, 2, 3, 3])],
                        [h.make_tensor_value_info("y", T.FLOAT, [1, 3, 3, 3])]), tmp_path / "m.onnx")
    out = tmp_path / "out"
    res = run_cli("convert", model, "-o", out, "--target", "coreml")
    _assert_clean_failure(res, tmp_path, out, "Conv with a computed input 'w'", "conv_dynamic_weight")


def test_integer_inputs_are_named(tmp_path, monkeypatch):
    _fast_fail(monkeypatch)
    nodes = [h.make_node("Cast", ["ids"], ["f"], to=T.FLOAT, name="to_float"),
             h.make_node("Relu", ["f"], ["y"], name="relu")]
    model = save(_model(nodes, [h.make_tensor_value_info("ids", T.INT64, [1, 4])],
                        [h.make_tensor_value_info("y", T.FLOAT, [1, 4])]), tmp_path / "m.onnx")
    out = tmp_path / "out"
    res = run_cli("convert", model, "-o", out, "--target", "coreml")
    _assert_clean_failure(res, tmp_path, out, "input of type int64", "'ids'")


@pytest.fixture()
def digits_cnn(digits_models):
    return digits_models["cnn"]


def test_int4_is_refused_for_a_profile_that_cannot_run_it(digits_cnn, tmp_path, monkeypatch):
    _fast_fail(monkeypatch)
    out = tmp_path / "out"
    res = run_cli("convert", digits_cnn, "-o", out, "--profile", "iphone-15", "--quantize", "int4")
    _assert_clean_failure(res, tmp_path, out, "--quantize int4", "iOS 18", "iOS17 (from profile 'iphone-15')",
                          "--minimum-deployment-target iOS18")


def test_int4_is_refused_for_an_ios16_profile_file(digits_cnn, tmp_path, monkeypatch):
    _fast_fail(monkeypatch)
    board = tmp_path / "iphone-13.toml"
    board.write_text('''name = "iphone-13"
description = "iPhone 13 on iOS 16"
formats = ["coreml"]
[cpu]
arch = "arm64"
cores = 6
[memory]
ram = "4 GiB"
storage = "128 GB"
model_ram_budget = "512 MiB"
model_storage_budget = "1 GiB"
[default_recipe]
target = "coreml"
quantize = "int4"
[coreml]
minimum_deployment_target = "iOS16"
''')
    out = tmp_path / "out"
    res = run_cli("convert", digits_cnn, "-o", out, "--profile", board)
    _assert_clean_failure(res, tmp_path, out, "--quantize int4", "iOS16 (from profile 'iphone-13')")


@pytest.mark.parametrize("flags,needles", [
    (["--quantize", "int4", "--minimum-deployment-target", "iOS16"],
     ["--quantize int4", "iOS16 (from --minimum-deployment-target)"]),
    (["--quantize", "int8", "--minimum-deployment-target", "iOS15"], ["--quantize int8", "iOS 16", "iOS15"]),
    (["--quantize", "int8", "--palettize", "6"], ["one way at a time", "--quantize int8 and --palettize 6"]),
    (["--quantize", "int4", "--palettize", "4", "--minimum-deployment-target", "iOS18"],
     ["--quantize int4 and --palettize 4"]),
    (["--quantize", "fp16", "--compute-precision", "fp32"], ["--quantize fp16", "--compute-precision fp16"]),
    (["--quantize", "int8-dynamic"], ["does not offer --quantize int8-dynamic"]),
    (["--palettize", "5"], ["--palettize"]),
    (["--sparse-min-zeros", "0"], ["--sparse-min-zeros", "(0.0, 1.0]"]),
    (["--minimum-deployment-target", "iOS 19"], ["--minimum-deployment-target", "iOS18"]),
    (["--max-accuracy-drop", "1"], ["--max-accuracy-drop", "Core ML prediction needs macOS"]),
])
def test_flag_combinations_that_cannot_work_are_refused(digits_cnn, tmp_path, monkeypatch, flags, needles):
    import sys

    if "--max-accuracy-drop" in flags and sys.platform == "darwin":
        pytest.skip("Core ML runs here: the accuracy gate applies")
    _fast_fail(monkeypatch)
    out = tmp_path / "out"
    res = run_cli("convert", digits_cnn, "-o", out, "--target", "coreml", *flags)
    if res.code == 2 and res.err.startswith("Usage"):  # click rejected a choice itself
        assert any(n in res.err for n in needles) and not out.exists(), res.err
        return
    _assert_clean_failure(res, tmp_path, out, *needles)


def test_a_flag_of_another_target_is_refused(digits_cnn, tmp_path):
    out = tmp_path / "out"
    res = run_cli("convert", digits_cnn, "-o", out, "--target", "onnx", "--palettize", "6")
    _assert_clean_failure(res, tmp_path, out, "--palettize applies to target coreml, not onnx")


def test_profile_deployment_target_can_be_overridden_for_int4(digits_cnn, tmp_path):
    """The refusal above says what to do; doing it works (iphone-15 profile, iOS18 override)."""
    import json

    out = tmp_path / "out"
    res = run_cli("convert", digits_cnn, "-o", out, "--profile", "iphone-15", "--quantize", "int4",
                  "--minimum-deployment-target", "iOS18", "-q")
    assert res.code == 0, res.err
    report = json.loads((out / "report.json").read_text())
    assert report["pass_details"]["coreml"]["deployment_target_from"] == "--minimum-deployment-target"
    assert report["fit"]["profile"] == "iphone-15" and report["fit"]["ok"] is True
    assert report["pass_details"]["coreml"]["verification"]["compressed_weights_ok"] is True
