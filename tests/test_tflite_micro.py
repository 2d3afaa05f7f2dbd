"""TFLite Micro profiles (runtime = "tflite-micro"): the digits CNN and the IMU model convert for the
microcontroller profiles with the arena measured in TFLite Micro's own interpreter (the tflite-micro
wheel), its outputs within one quantum of LiteRT's, the fit split into flash and RAM, and the C++
sources — the model array, an op resolver with exactly the model's ops and a golden-vector self-test —
compiled with g++ (-fsyntax-only) against stub headers that declare the TFLite Micro API those files
use (the real headers are not on any registry this machine reaches: docs/tflite-micro.md). A model
with an operator TFLite Micro lacks is refused naming its ONNX node, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgeopt.artifact import TamperedArtifact, open_artifact
from edgeopt.golden_vectors import check_artifact

from conftest import run_cli

pytest.importorskip("tflite_micro", reason="TFLite Micro profiles need the tflite-micro wheel "
                                           "(pip install 'edgeopt[micro]')")

MCU_PROFILES = ["arduino-nano-33-ble-sense", "stm32h743zi-nucleo", "esp32-s3-wroom-1-n8r8"]


@pytest.fixture(scope="module")
def digits_micro(digits_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("micro") / "digits"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--profile", "arduino-nano-33-ble-sense",
                  "--calibration", digits_models["calibration"], "--validation", digits_models["validation"],
                  "-q", "--json")
    assert res.code == 0, res.err
    return out, res.json()


@pytest.mark.parametrize("profile", MCU_PROFILES[1:])
def test_the_digits_cnn_converts_for_the_other_microcontrollers(digits_models, profile, tmp_path):
    res = run_cli("convert", digits_models["cnn"], "-o", tmp_path / "digits", "--profile", profile,
                  "--calibration", digits_models["calibration"], "--validation", digits_models["validation"],
                  "-q", "--json")
    assert res.code == 0, res.err
    report = res.json()
    assert report["fit"]["profile"] == profile and report["fit"]["ok"] is True
    assert report["fit"]["arena_bytes"] >= report["pass_details"]["tflite-micro"]["arena_measured_bytes"] > 0


def test_the_digits_cnn_converts_for_a_microcontroller_with_its_arena_measured(digits_micro):
    out, report = digits_micro
    micro = report["pass_details"]["tflite-micro"]
    assert micro["arena_measured_bytes"] > 0 and micro["arena_bytes"] >= micro["arena_measured_bytes"] * 1.1
    fit = report["fit"]
    assert fit["arena_bytes"] == micro["arena_bytes"] and fit["ok"] is True
    assert fit["flash_bytes"] == fit["model_bytes"] + fit["code_bytes_estimate"] == (
        (out / "model.tflite").stat().st_size + 64 * 1024)
    parity = micro["parity_vs_litert"]
    assert parity["samples"] > 100 and parity["max_abs_quanta"] <= 1
    assert parity["identical"] == (parity["values_differing"] == 0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {f"micro/{n}" for n in ("model_data.h", "model_data.cc", "op_resolver.h", "model_selftest.h",
                                   "model_selftest.cc")} <= set(manifest["files"])
    assert check_artifact(out).ok  # the sources are hashed with the model: a changed array is caught


def test_a_changed_model_array_fails_the_artifact_check(digits_micro, tmp_path):
    out, _ = digits_micro
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    cc = copy / "micro" / "model_data.cc"
    cc.write_text(cc.read_text().replace("0x", "0X", 1))
    with pytest.raises(TamperedArtifact, match="model_data.cc"):
        open_artifact(copy).verify()


def test_the_arena_figure_is_what_tflite_micro_needs(digits_micro):
    """The measured arena runs the model; a few bytes less does not (RecordingMicroAllocator's total is
    exact on this host)."""
    from tflite_micro import runtime

    out, report = digits_micro
    measured = report["pass_details"]["tflite-micro"]["arena_measured_bytes"]
    model = (out / "model.tflite").read_bytes()
    interpreter = runtime.Interpreter.from_bytes(model, arena_size=measured)
    details = interpreter.get_input_details(0)
    interpreter.set_input(np.zeros(details["shape"], details["dtype"]), 0)
    interpreter.invoke()
    with pytest.raises(RuntimeError):
        runtime.Interpreter.from_bytes(model, arena_size=measured - 64)


def test_the_model_array_is_the_tflite_byte_for_byte_and_the_resolver_names_its_ops(digits_micro):
    from edgeopt.converters.targets.tflite.flatbuffer import builtin_op_names

    out, report = digits_micro
    cc = (out / "micro" / "model_data.cc").read_text()
    body = cc[cc.index("{") + 1:cc.index("};")]
    assert bytes(int(b, 16) for b in re.findall(r"0x([0-9a-f]{2})", body)) == (out / "model.tflite").read_bytes()
    assert f"g_model_len = {(out / 'model.tflite').stat().st_size};" in cc
    header = (out / "micro" / "model_data.h").read_text()
    assert f"kTensorArenaSize = {report['pass_details']['tflite-micro']['arena_bytes']};" in header
    ops = sorted(set(builtin_op_names(out / "model.tflite")))
    resolver = (out / "micro" / "op_resolver.h").read_text()
    assert f"MicroMutableOpResolver<{len(ops)}>" in resolver
    assert sorted(re.findall(r"// (\w+)\n", resolver)) == ops
    assert "resolver.AddConv2D()" in resolver and "resolver.AddFullyConnected()" in resolver


def test_the_selftest_golden_outputs_are_tflite_micros(digits_micro):
    """The self-test's expected outputs are what TFLite Micro computes for its inputs."""
    from tflite_micro import runtime

    out, _ = digits_micro
    cc = (out / "micro" / "model_selftest.cc").read_text()

    def table(name):
        block = cc[cc.index(f"{name}["):]
        block = block[block.index("= {") + 3:block.index("};")]
        return [np.array([int(v) for v in row.split(",")]) for row in re.findall(r"\{([^{}]*)\}", block)]

    inputs, outputs = table("kGolden_input0"), table("kGolden_output0")
    assert len(inputs) == len(outputs) == 3
    interpreter = runtime.Interpreter.from_bytes((out / "model.tflite").read_bytes(), arena_size=2**20)
    details = interpreter.get_input_details(0)
    for x, y in zip(inputs, outputs, strict=True):
        interpreter.set_input(x.reshape(details["shape"]).astype(np.int8), 0)
        interpreter.invoke()
        assert np.array_equal(interpreter.get_output(0).reshape(-1), y)


# The TFLite Micro API the generated files use, as its headers declare it (tensorflow/lite/micro at
# 90b983c). The op resolver's methods come from edgeopt's own list of them, RESOLVER_METHODS, so this
# checks the files are valid C++ using that API; the real headers need a TFLite Micro checkout.
STUBS = {
    "tensorflow/lite/c/common.h": """#pragma once
#include <cstddef>
#include <cstdint>
typedef enum { kTfLiteOk = 0, kTfLiteError = 1 } TfLiteStatus;
typedef union { int8_t* int8; uint8_t* uint8; int16_t* i16; int32_t* i32; float* f; } TfLitePtrUnion;
typedef struct { TfLitePtrUnion data; size_t bytes; } TfLiteTensor;
""",
    "tensorflow/lite/micro/micro_mutable_op_resolver.h": """#pragma once
#include "tensorflow/lite/c/common.h"
namespace tflite {
template <unsigned int tOpCount> class MicroMutableOpResolver {
 public:
%s
};
}  // namespace tflite
""",
    "tensorflow/lite/micro/micro_interpreter.h": """#pragma once
#include "tensorflow/lite/c/common.h"
namespace tflite {
class MicroInterpreter {
 public:
  TfLiteStatus AllocateTensors();
  TfLiteStatus Invoke();
  TfLiteTensor* input(size_t index);
  TfLiteTensor* output(size_t index);
  size_t arena_used_bytes() const;
};
}  // namespace tflite
""",
}

FIRMWARE = """#include "model_data.h"
#include "model_selftest.h"
#include "op_resolver.h"
alignas(16) static uint8_t arena[kTensorArenaSize];
bool setup_model(tflite::MicroInterpreter& interpreter) {
  static ModelOpResolver resolver;
  if (!RegisterModelOps(resolver)) return false;
  (void)arena; (void)g_model; (void)g_model_len;
  return interpreter.AllocateTensors() == kTfLiteOk && RunModelSelfTest(interpreter);
}
"""


def _syntax_check(micro: Path, tmp: Path) -> subprocess.CompletedProcess:
    from edgeopt.converters.targets.tflite.micro import RESOLVER_METHODS

    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed")
    # the real headers where a TFLite Micro checkout is at hand: its root, flatbuffers' include/ and
    # gemmlowp, ':'-separated (docs/tflite-micro.md); else the stubs
    real = os.environ.get("EDGEOPT_TFLM_INCLUDE")
    methods = "\n".join(f"  TfLiteStatus {m}();" for m in RESOLVER_METHODS)
    for name, text in STUBS.items():
        (tmp / "stubs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "stubs" / name).write_text(text % methods if "%s" in text else text)
    (tmp / "firmware.cc").write_text(FIRMWARE)
    includes = [f"-I{d}" for d in (real.split(":") if real else [str(tmp / "stubs")])]
    return subprocess.run([gxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-DTF_LITE_STATIC_MEMORY",
                           *includes, "-I", str(micro), str(micro / "model_data.cc"), str(micro / "model_selftest.cc"),
                           str(tmp / "firmware.cc")], capture_output=True, text=True)


def test_the_generated_cpp_compiles(digits_micro, tmp_path):
    out, _ = digits_micro
    proc = _syntax_check(out / "micro", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("profile", MCU_PROFILES)
def test_the_imu_model_converts_for_every_microcontroller(imu_model, profile, tmp_path):
    out = tmp_path / "imu"
    res = run_cli("convert", imu_model["model"], "-o", out, "--profile", profile,
                  "--calibration", imu_model["calibration"], "--validation", imu_model["validation"],
                  "--preprocessing", imu_model["preprocessing"], "-q", "--json")
    assert res.code == 0, res.err
    report = res.json()
    assert report["fit"]["profile"] == profile and report["fit"]["ok"] is True
    assert report["pass_details"]["tflite-micro"]["parity_vs_litert"]["max_abs_quanta"] <= 1
    assert _syntax_check(out / "micro", tmp_path).returncode == 0


def _gelu_model(tmp_path: Path) -> tuple[Path, Path]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (16, 8)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 4)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="dense_1"),
         helper.make_node("Gelu", ["h"], ["g"], name="the_gelu"),
         helper.make_node("MatMul", ["g", "w2"], ["y"], name="dense_2")],
        "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w1, w2])
    model = tmp_path / "gelu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), model)
    np.savez(tmp_path / "cal.npz", x=rng.normal(0, 1, (32, 16)).astype(np.float32))
    return model, tmp_path / "cal.npz"


def test_a_model_with_an_op_tflite_micro_lacks_is_refused_naming_its_node(tmp_path):
    model, cal = _gelu_model(tmp_path)
    out = tmp_path / "out"
    res = run_cli("convert", model, "-o", out, "--profile", "arduino-nano-33-ble-sense", "--calibration", cal)
    assert res.code == 2, (res.out, res.err)
    assert "tflite-micro" in res.err and "GELU" in res.err and "'the_gelu'" in res.err, res.err
    assert len(res.err.strip().splitlines()) == 1
    assert not out.exists()


def test_what_tflite_micros_own_interpreter_refuses_is_named_from_its_log(tmp_path):
    """The ground truth behind the kernel table: the model run in TFLite Micro's interpreter, whose
    refusal reaches Python only in its C log — read for the operator, which names the ONNX node."""
    from edgeopt.converters.targets.tflite.micro import _probe
    from edgeopt.errors import UnsupportedOpsError

    model, cal = _gelu_model(tmp_path)
    res = run_cli("convert", model, "-o", tmp_path / "plain", "--target", "tflite", "--quantize", "int8",
                  "--calibration", cal, "-q")  # a .tflite for a phone or a Pi: GELU is fine there
    assert res.code == 0, res.err
    x = np.zeros((2, 1, 16), np.int8)
    with pytest.raises(UnsupportedOpsError, match=r"GELU\[TFLite Micro: no kernel\] \(node 'the_gelu'\)"):
        _probe(tmp_path / "plain" / "model.tflite", [x], 1, {"GELU": [("Gelu", "the_gelu")]})


def test_a_microcontroller_profile_needs_full_integer_int8(digits_models, tmp_path):
    for flags in (["--quantize", "fp16"], ["--quantize", "int8", "--float-io"]):
        res = run_cli("convert", digits_models["cnn"], "-o", tmp_path / "out", "--profile", "stm32h743zi-nucleo",
                      "--calibration", digits_models["calibration"], *flags)
        assert res.code == 2 and "TFLite Micro, which needs a full-integer model" in res.err, res.err
        assert not (tmp_path / "out").exists()


def test_an_arena_over_the_boards_ram_is_a_failed_fit_naming_both(digits_models, tmp_path):
    # a board of the user's own: the shipped profile with 4 KiB left for the arena
    text = (Path(__file__).parents[1] / "hardware" / "profiles" / "arduino-nano-33-ble-sense.toml").read_text()
    board = tmp_path / "tiny-board.toml"
    board.write_text(text.replace('name = "arduino-nano-33-ble-sense"', 'name = "tiny-board"')
                     .replace('model_ram_budget = "160 KiB"', 'model_ram_budget = "4 KiB"'))
    res = run_cli("convert", digits_models["cnn"], "-o", tmp_path / "out", "--profile", board,
                  "--calibration", digits_models["calibration"], "-q", "--json")
    assert res.code == 1, res.err
    fit = res.json()["fit"]
    assert fit["ok"] is False and fit["ram_budget_bytes"] == 4096
    (problem,) = fit["problems"]
    assert f"tensor arena {fit['arena_bytes']} B (measured in TFLite Micro" in problem and "4096 B of tiny-board" in problem


def test_a_microcontroller_profile_without_its_code_size_or_with_another_runtime_is_refused(tmp_path):
    text = (Path(__file__).parents[1] / "hardware" / "profiles" / "stm32h743zi-nucleo.toml").read_text()
    for bad, why in ((text.replace('code_bytes = "64 KiB"', ""), "a [tflite_micro] table with code_bytes"),
                     (text.replace('runtime = "tflite-micro"', 'runtime = "zephyr"'), "'zephyr' is not one of")):
        board = tmp_path / "board.toml"
        board.write_text(bad)
        res = run_cli("profiles", "show", board)
        assert res.code == 2 and why in res.err, res.err


def test_optimize_for_a_microcontroller_tries_full_integer_int8_only(tmp_path):
    from edgeopt.converters.optimize import OptimizeOptions, candidates
    from edgeopt.errors import UserInputError
    from edgeopt.profiles import load_profile

    board = load_profile("esp32-s3-wroom-1-n8r8")
    given = dict(model=tmp_path / "m.onnx", output=tmp_path / "o", profile=board.name, validation=tmp_path / "v.npz")
    found = candidates(OptimizeOptions(**given, calibration=tmp_path / "c.npz"), board)
    assert found and {(c.target, c.quantize) for c in found} == {("tflite", "int8")}
    with pytest.raises(UserInputError, match="needs calibration data"):
        candidates(OptimizeOptions(**given), board)


def test_without_the_tflite_micro_wheel_a_microcontroller_profile_says_what_to_install(digits_models, tmp_path):
    import subprocess
    import sys

    code = ("import sys; sys.modules['tflite_micro'] = None\n"  # as if not installed
            "from edgeopt.cli import main\n"
            f"sys.argv = ['edgeopt', 'convert', {str(digits_models['cnn'])!r}, '-o', {str(tmp_path / 'out')!r}, "
            f"'--profile', 'arduino-nano-33-ble-sense', '--calibration', {str(digits_models['calibration'])!r}]\n"
            "main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tflite_micro" in lines[0] and "edgeopt[micro]" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
