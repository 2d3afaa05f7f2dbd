"""The aarch64 TVM library, run under qemu-user in an emulated aarch64 Python with the aarch64 TVM
runtime (built by tools/make_aarch64_emulation_env.sh), reproduces the original model's outputs
on the artifact's golden vectors (the outputs ONNX Runtime gave the source model)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from tvm_models import export, sample_inputs

ENV = Path(os.environ.get("EDGEOPT_AARCH64_ENV", ROOT / "build" / "qemu-aarch64"))
QEMU = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
GOLDEN_CHECK = ROOT / "converters" / "targets" / "tvm" / "golden_check.py"

pytestmark = [
    pytest.mark.skipif(QEMU is None, reason="qemu-user is not installed (Debian: apt-get install qemu-user-static)"),
    pytest.mark.skipif(not (ENV / "sysroot" / "usr" / "bin" / "python3.11").exists(),
                       reason=f"no emulated aarch64 Python + TVM runtime at {ENV}: "
                              f"run tools/make_aarch64_emulation_env.sh (about 500 MB)"),
    pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None,
                       reason="needs aarch64-linux-gnu-gcc (Debian package gcc-aarch64-linux-gnu)"),
]


def _run_on_emulated_aarch64(artifact: Path) -> dict:
    proc = subprocess.run([QEMU, "-L", str(ENV / "sysroot"), str(ENV / "sysroot/usr/bin/python3.11"),
                           str(GOLDEN_CHECK), str(artifact)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ENV / "site")})
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cnn", "lstm"])
def test_aarch64_library_matches_onnx_runtime_under_qemu(kind, digits_models, tmp_path):
    import numpy as np

    if kind == "cnn":
        path, val = digits_models["cnn"], digits_models["validation"]
    else:
        path, name, shape = export(kind, tmp_path / f"{kind}.onnx")
        val = tmp_path / "val.npz"
        np.savez(val, **{name: sample_inputs(shape, 16)})
    out = tmp_path / "pi4"
    res = run_cli("convert", path, "-o", out, "--target", "tvm", "--profile", "raspberry-pi-4",
                  "--quantize", "none", "--validation", val, "-q")
    assert res.code == 0, res.err
    result = _run_on_emulated_aarch64(out)
    assert result["machine"] == "aarch64"
    assert result["samples"] == 8
    # golden outputs are ONNX Runtime's outputs of the source model on the golden inputs
    assert max(result["max_abs_err"].values()) <= 1e-4, result
    assert result["ok"]
