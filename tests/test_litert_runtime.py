"""The litert runtime: interpreter choice (ai_edge_litert, else tflite_runtime), errors, quantized I/O specs."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from edgeopt.errors import MissingDependency, UserInputError
from edgeopt.runtime import open_runtime, runtime_for_format
from edgeopt.runtime.litert import LiteRtRuntime, interpreter_module

from onnx_models import chain
from tflite_harness import convert


def test_falls_back_to_tflite_runtime_when_ai_edge_litert_is_missing(monkeypatch):
    fake = types.ModuleType("tflite_runtime.interpreter")
    package = types.ModuleType("tflite_runtime")
    package.interpreter = fake
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # import fails
    monkeypatch.setitem(sys.modules, "tflite_runtime", package)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fake)
    assert interpreter_module() is fake


def test_neither_interpreter_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    with pytest.raises(MissingDependency, match=r"pip install 'edgeopt\[litert\]'"):
        interpreter_module()


def test_registered_for_tflite_and_rejects_a_corrupt_file(tmp_path):
    assert runtime_for_format("tflite") is LiteRtRuntime
    bad = tmp_path / "model.tflite"
    bad.write_bytes(b"TFL3" * 64)
    with pytest.raises(UserInputError, match="LiteRT cannot load the model"):
        open_runtime(bad)


def test_runs_with_and_without_xnnpack_and_reports_quantized_io(tmp_path):
    from edgeopt.data import Dataset

    model = chain([16, 8, 4])
    cal = Dataset({"x": np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)}, None, "random")
    conv = convert(model, tmp_path / "q", quantize="int8", calibration=cal)
    fast, plain = LiteRtRuntime(conv.path, threads=1), LiteRtRuntime(conv.path, threads=1, xnnpack=False)
    assert [s.dtype for s in fast.inputs + fast.outputs] == ["int8", "int8"]
    assert fast.inputs[0].quantization["scale"] > 0 and "zero_point" in fast.inputs[0].quantization
    x = cal.inputs["x"][:1]
    a, b = fast.run_float({"x": x})["y"], plain.run_float({"x": x})["y"]
    assert a.dtype == np.float32 and np.abs(a - b).max() <= fast.outputs[0].quantization["scale"]
    with pytest.raises(UserInputError, match="expects shape"):
        fast.run({"x": np.zeros((1, 15), np.int8)})
