"""-q keeps the toolchains' log lines off the terminal (Python logging, warnings, and what native code
writes to file descriptor 2), --log-file collects them, and the device agent's log carries no ONNX
Runtime telemetry warnings. Real subprocesses, since native output bypasses Python's streams."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent_harness import AgentProcess, base_config
from onnx_models import chain, save

EDGEOPT = str(Path(sys.executable).parent / "edgeopt")


def _edgeopt(*args, env=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "EDGEOPT_DEBUG"}
    return subprocess.run([EDGEOPT, *map(str, args)], capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save(chain([8, 16, 4]), tmp_path_factory.mktemp("quiet") / "tiny.onnx")


def test_int4_under_q_prints_no_onnx_runtime_info_and_log_file_gets_it(tiny, tmp_path):
    """ONNX Runtime's int4 quantizer configures the root logger at INFO when imported and logs each MatMul."""
    res = _edgeopt("convert", tiny, "-o", tmp_path / "a", "--target", "onnx", "--quantize", "int4", "-q")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    log = tmp_path / "convert.log"
    res = _edgeopt("convert", tiny, "-o", tmp_path / "b", "--target", "onnx", "--quantize", "int4", "-q",
                   "--log-file", log)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert "INFO onnxruntime.quantization.matmul_nbits_quantizer: start to quantize" in log.read_text()


def test_tflite_fp16_on_a_model_of_many_tensors_draws_no_progress_bar_under_q(tmp_path):
    """litert-quantizer draws a tqdm bar on stderr from 100 tensors on, whatever it is asked."""
    pytest.importorskip("litert_quantizer")
    from onnx import numpy_helper

    model = chain([8] * 121)  # 120 MatMuls: 240 tensors to transform
    for init in model.graph.initializer:  # outputs stay finite through 120 layers
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 0.35, init.name))
    path = save(model, tmp_path / "deep.onnx")
    res = _edgeopt("convert", path, "-o", tmp_path / "out", "--target", "tflite", "--quantize", "fp16", "-q")
    assert res.returncode == 0 and res.stderr == "", res.stderr


def test_tvm_native_and_python_warnings_stay_off_the_terminal_under_q(tiny, tmp_path):
    """Two real sources of TVM noise: LLVM's C++ warning for a CPU feature it does not know (written to
    fd 2 once per kernel) and the Relax ONNX front end's Python warning for a dotted input name."""
    pytest.importorskip("tvm")
    import onnx

    model = onnx.load(tiny)
    model.graph.input[0].name = "input.1"
    for node in model.graph.node:
        node.input[:] = ["input.1" if i == "x" else i for i in node.input]
    dotted = tmp_path / "dotted.onnx"
    onnx.save(model, dotted)
    profile = tmp_path / "board.toml"
    from importlib import resources

    shipped = resources.files("edgeopt.hardware").joinpath("profiles", "x86-64-gateway.toml").read_text()
    profile.write_text(shipped.replace('mcpu = "tremont"', 'mcpu = "tremont", mattr = ["+notafeature"]'))
    log = tmp_path / "tvm.log"
    args = ("convert", dotted, "--profile", profile, "--target", "tvm", "--quantize", "none")

    res = _edgeopt(*args, "-o", tmp_path / "quiet", "-q", "--log-file", log)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    text = log.read_text()
    assert "WARNING edgeopt.toolchain.tvm: '+notafeature' is not a recognized feature for this target" in text
    assert "WARNING py.warnings: UserWarning: Renaming name input.1 to input_1" in text

    res = _edgeopt(*args, "-o", tmp_path / "loud")  # without -q: shown, one line each, after the step
    assert res.returncode == 0, res.stderr
    lines = res.stderr.strip().splitlines()
    assert any(line.startswith("edgeopt.toolchain.tvm: WARNING: '+notafeature'") and line.endswith(")")
               for line in lines), res.stderr
    assert len(lines) == 2, res.stderr


def test_the_agent_log_has_no_onnx_runtime_telemetry_warning(tmp_path, imu_model):
    """Under systemd (ProtectHome, DynamicUser) the cache directory is not writable; ONNX Runtime then
    warned "Failed to persist telemetry device ID" on every start."""
    from edgeopt.agent.statedir import StateDir

    StateDir(tmp_path / "state").install(imu_model["artifact"])
    csv = tmp_path / "run.csv"
    csv.write_text("ax,ay,az\n" + "".join(f"{i % 7 / 7:.3f},0.1,0.9\n" for i in range(128)))
    cfg = base_config(tmp_path, agent={"exit_when_sources_end": True},
                      source=[{"type": "csv", "name": "f", "path": str(csv), "replay": "fast"}],
                      sink=[{"type": "jsonl", "path": str(tmp_path / "out.jsonl")}])
    unwritable = {"HOME": "/proc/nonexistent", "XDG_CACHE_HOME": "/proc/nonexistent/cache"}
    agent = AgentProcess(tmp_path, cfg, env=unwritable)
    assert agent.communicate() == 0, agent.err
    assert "Failed to persist telemetry" not in agent.err and ":onnxruntime:" not in agent.err, agent.err
    assert all(line.startswith("edgeopt-agent: ") for line in agent.err.splitlines()), agent.err
