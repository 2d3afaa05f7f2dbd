"""The command line: lazy start-up, help, profiles, inspect, bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_cli, run_cli_subprocess
from onnx_models import save, with_custom_op

HEAVY = ("numpy", "onnx", "onnxruntime", "torch", "tvm", "coremltools", "ai_edge_litert", "onnxslim")


def test_help_imports_no_heavy_toolchain():
    """`edgeopt --help` stays fast because it imports none of the heavy packages (measured in
    benchmarks/cli_startup.py; here we check the cause, not the clock)."""
    code = ("import sys\nfrom edgeopt.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Commands:" in out
    assert out.strip().splitlines()[-1] == "HEAVY="


@pytest.mark.parametrize("command", ["agent", "fleet", "keys", "inspect", "profiles"])
def test_command_help_imports_no_heavy_package(command):
    """These commands import what pulls numpy, onnx or python-tuf only when they run (the lazy imports
    tests/test_layering.py allows in sdk/cli/), so their --help stays as light as `edgeopt --help`."""
    code = ("import sys\nfrom edgeopt.cli import main\n"
            f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
            f"print('HEAVY=' + ','.join(m for m in {HEAVY + ('tuf', 'cryptography')!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Usage:" in out
    assert out.strip().splitlines()[-1] == "HEAVY="


def test_console_script_help_and_version():
    res = run_cli_subprocess("--help")
    assert res.code == 0
    for cmd in ("convert", "inspect", "bench", "profiles"):
        assert cmd in res.out
    res = run_cli_subprocess("--version")
    assert res.code == 0 and res.out.startswith("edgeopt ")


def test_convert_help_comes_from_the_param_declarations():
    from edgeopt.converters.recipe import RECIPE_KEYS

    res = run_cli("convert", "--help")
    assert res.code == 0
    text = "".join(res.out.split()).lower()  # click wraps lines (and at hyphens)
    assert "minmax|entropy|percentile" in text
    assert "weightsperquantizationblock" in text
    for p in RECIPE_KEYS:
        if p.name != "mixed_precision":  # its flag is the inverse, --no-mixed-precision
            assert "".join(p.help.split()).lower() in text, p.name


def test_usage_error_exits_2():
    res = run_cli("convert")
    assert res.code == 2 and "Missing argument" in res.err
    assert run_cli("nonsense").code == 2


def test_profiles_list_and_show():
    res = run_cli("profiles", "list", "--json")
    names = {p["name"] for p in res.json()}
    assert {"raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano", "nxp-imx8m-plus", "coral-dev-board-mini",
            "iphone-15", "x86-64-gateway"} <= names
    for p in res.json():
        assert p["ram_bytes"] > 0 and p["cores"] >= 1 and p["formats"] and p["default_recipe"]["target"]
        assert p["model_ram_budget_bytes"] <= p["ram_bytes"]
    shown = run_cli("profiles", "show", "raspberry-pi-4", "--json").json()
    assert shown["arch"] == "aarch64" and shown["tvm_target"]["mtriple"] == "aarch64-linux-gnu"
    assert "cortex-a72" in run_cli("profiles", "show", "raspberry-pi-4").out
    assert "raspberry-pi-5" in run_cli("profiles").out
    res = run_cli("profiles", "show", "jetson-orin")
    assert res.code == 2 and "did you mean 'jetson-orin-nano'" in res.err


def test_inspect_reports_ops_params_and_target_support(digits_models, tmp_path):
    info = run_cli("inspect", digits_models["cnn"], "--json").json()
    assert info["params"] > 40_000 and info["ops"]["Conv"] == 3
    assert info["inputs"][0]["name"] == "image" and info["inputs"][0]["shape"] == ["batch", 1, 8, 8]
    assert info["targets"]["onnx"]["supported"] is True
    custom = save(with_custom_op(), tmp_path / "custom.onnx")
    info = run_cli("inspect", custom, "--json").json()
    assert info["targets"]["onnx"] == {"supported": False, "unsupported": {"com.example:FancyOp": ["fancy_1"]}}
    table = run_cli("inspect", custom).out
    assert "FancyOp" in table and "fancy_1" in table


def test_bench_sweeps_batches_on_an_artifact(digits_models, tmp_path):
    out = tmp_path / "art"
    assert run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "-q").code == 0
    res = run_cli("bench", out, "--batch", "1,8", "--rounds", "2", "--min-round-time", "0.02", "--json")
    assert res.code == 0, res.err
    rows = res.json()["results"]
    assert [r["batch"] for r in rows] == [1, 8]
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] and r["throughput_per_s"] > 0 and r["threads"] == 1
    assert "p95" in run_cli("bench", digits_models["cnn"], "--batch", "2", "--rounds", "1",
                            "--min-round-time", "0.01").out


def test_bench_skips_batch_sizes_a_fixed_batch_model_cannot_take(digits_models, tmp_path):
    out = tmp_path / "fixed"
    assert run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "-q",
                   "--input-shape", "image:4,1,8,8").code == 0
    rows = run_cli("bench", out, "--batch", "1,4", "--rounds", "1", "--min-round-time", "0.01", "--json").json()["results"]
    assert "fixed batch of 4" in rows[0]["skipped"] and rows[1]["batch"] == 4 and rows[1]["p50_ms"] > 0


@pytest.mark.parametrize("arg", ["0", "1,x", ""])
def test_bench_rejects_bad_batches(digits_models, arg):
    assert run_cli("bench", digits_models["cnn"], "--batch", arg).code == 2


def test_bench_on_unknown_format(tmp_path):
    p = tmp_path / "model.bin"
    p.write_bytes(b"x")
    res = run_cli("bench", p)
    assert res.code == 2 and "unknown model format" in res.err


def test_json_report_from_convert(digits_models, tmp_path):
    res = run_cli("convert", digits_models["cnn"], "-o", tmp_path / "a", "--target", "onnx", "-q", "--json",
                  "--validation", digits_models["validation"])
    assert res.code == 0
    report = res.json()
    assert report == json.loads((tmp_path / "a" / "report.json").read_text())
    assert np.isclose(report["accuracy"]["drop"], 0.0)


def test_target_options_belong_to_their_target(monkeypatch):
    from edgeopt.cli import convert as convert_cli
    from edgeopt.errors import UserInputError
    from edgeopt.params import Param

    tune = Param("tune", int, 0, "tuning trials")
    monkeypatch.setattr(convert_cli, "_target_params", lambda: {"tune": [("tvm", tune)]})
    assert convert_cli._chosen_target_params("tvm", {"tune": 8}) == {"tune": 8}
    assert convert_cli._chosen_target_params("onnx", {"tune": None}) == {}
    with pytest.raises(UserInputError, match="--tune applies to target tvm, not onnx"):
        convert_cli._chosen_target_params("onnx", {"tune": 8})


@pytest.mark.parametrize("command", [["inspect", "model.onnx"], ["convert", "model.onnx", "-o", "out"]])
def test_a_command_whose_extra_is_missing_names_the_extra_in_one_line(command, tmp_path):
    """What an install with only the `agent` extra sees (the real one: tests/device/): no traceback."""
    (tmp_path / "model.onnx").write_bytes(b"")
    code = ("import sys\nsys.modules['onnx'] = None  # what an install without onnx looks like\n"
            f"from edgeopt.cli import main\nmain({command!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "EDGEOPT_DEBUG"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"edgeopt: error: 'edgeopt {command[0]}' needs the Python package 'onnx', which is "
                                   "not installed; install it with: pip install 'edgeopt[convert]'")
