"""Quantize modes as values (converters/modes.py): the facts each consumer asks of ``--quantize X``, and
the settings a mode takes from its passes' parameters — only the ones a target honours."""

from __future__ import annotations

import pytest

from edgeopt.converters.modes import MODES, QUANTIZE_MODES, quantize_mode
from edgeopt.converters.passes.quantize import QuantizeInt4, QuantizeInt8Static
from edgeopt.converters.targets import get_target


def test_the_modes_and_their_facts():
    assert QUANTIZE_MODES == ("none", "fp16", "int8", "int8-dynamic", "int16x8", "int4")
    assert {m for m in MODES if MODES[m].integer} == {"int8", "int8-dynamic", "int16x8", "int4"}
    assert {m: MODES[m].activation_bytes for m in MODES if MODES[m].calibrated} == {"int8": 1, "int16x8": 2}
    assert [m for m in MODES if not MODES[m].compresses] == ["none"]


def test_a_mode_takes_its_own_settings_and_no_other():
    given = {"quantize-int8": {"calibration_method": "entropy", "block_size": 64},
             "quantize-int4": {"block_size": 128, "calibration_method": "percentile"}}
    assert quantize_mode("int8", given).calibration_method == "entropy"
    assert quantize_mode("int8", given).block_size is None        # int8 has no blocks
    assert quantize_mode("int16x8", given).calibration_method == "entropy"
    assert quantize_mode("int4", given).block_size == 128
    assert quantize_mode("int4", given).calibration_method is None  # int4 calibrates nothing
    # the defaults are the ONNX Runtime passes' own (the parameters the settings are given as)
    assert quantize_mode("int4").block_size == QuantizeInt4.param("block_size").default
    assert quantize_mode("int8").calibration_method == QuantizeInt8Static.param("calibration_method").default
    assert quantize_mode("fp16", given) is MODES["fp16"]


@pytest.mark.parametrize("target,quantize,expected", [
    ("tflite", "int4", 64), ("coreml", "int4", 64), ("onnx", "int4", 64), ("tflite", "int8", None)])
def test_every_target_reads_the_int4_block_size_from_the_mode(target, quantize, expected):
    t = get_target(target)(pass_params={"quantize-int4": {"block_size": 64}})
    assert t.mode_for(quantize).block_size == expected


def test_a_target_builds_its_mode_from_the_settings_it_honours_only():
    # Core ML's int8 compresses weights: it has no calibrator, so a calibration method given is not its
    # (and is refused as unused before any work by the settings check); the mode keeps its default
    given = {"quantize-int8": {"calibration_method": "entropy"}}
    assert get_target("coreml")(pass_params=given).mode_for("int8").calibration_method == "minmax"
    assert get_target("onnx")(pass_params=given).mode_for("int8").calibration_method == "entropy"


@pytest.mark.parametrize("target,quantize,expected", [
    ("tflite", "int8", 1), ("tflite", "int16x8", 2), ("tflite", "fp16", 4), ("onnx", "int8", 1),
    ("onnx", "int4", 4), ("tvm", "int8", 4), ("coreml", "int8", 2)])
def test_activation_bytes_come_from_the_mode_where_the_runtime_computes_in_integers(target, quantize, expected):
    t = get_target(target)()
    assert t.activation_bytes(t.mode_for(quantize)) == expected


def test_core_ml_computes_at_its_compute_precision():
    t = get_target("coreml")(compute_precision="fp32")
    assert t.activation_bytes(t.mode_for("int8")) == 4
