"""Issue 17, automatic mixed precision, on the model the issue names: the digits MLP with one hidden
unit's incoming weights and bias scaled x1000 and its outgoing weights /1000 -- the same float function
(ReLU is positively homogeneous), a ruined activation range. Plain INT8 loses most of its accuracy;
`analyze` must rank the layers around that activation first, and `convert --max-accuracy-drop 1.0`
must meet the budget on onnx and tflite keeping at most two layers float. Accuracy and the kept layers
are recomputed from the written files with the real runtimes, on the held-out digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeopt.converters.targets.tflite.flatbuffer import read_model, schema
from edgeopt.runtime import run_batched
from edgeopt.runtime.litert import LiteRtRuntime
from edgeopt.runtime.onnxruntime import OnnxRuntime

from conftest import run_cli
from outlier_mlp import RUINED, make_outlier_mlp


@pytest.fixture(scope="module")
def outlier(digits_models, tmp_path_factory) -> dict[str, Path]:
    path = make_outlier_mlp(digits_models["mlp"], digits_models["validation"],
                            tmp_path_factory.mktemp("outlier") / "outlier_mlp.onnx")
    return {"model": path, "calibration": digits_models["calibration"], "validation": digits_models["validation"],
            "float": digits_models["mlp"]}


def _accuracy(path: Path, validation: Path) -> float:
    data = np.load(validation)
    runtime = LiteRtRuntime(path, threads=1) if path.suffix == ".tflite" else OnnxRuntime(path, threads=1)
    (name,) = [s.name for s in runtime.inputs]
    out = run_batched(runtime, {name: data["image"].astype(np.float32)})
    return float((next(iter(out.values())).argmax(1) == data["labels"]).mean() * 100)


def test_the_outlier_is_the_same_float_function(outlier):
    assert abs(_accuracy(outlier["model"], outlier["validation"]) - _accuracy(outlier["float"], outlier["validation"])) < 0.5


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_analyze_ranks_the_ruined_layers_first(outlier, target):
    """With the quantizer each target ships: ONNX Runtime's QDQ, and LiteRT's (run by LiteRT)."""
    res = run_cli("analyze", outlier["model"], "--target", target, "--calibration", outlier["calibration"],
                  "--validation", outlier["validation"], "--json")
    assert res.code == 0, res.err
    result = json.loads(res.out)
    assert result["target"] == target and result["float_vs_int8"]["cosine"] < 0.99
    layers = result["layers"]
    assert {row["node"] for row in layers[:2]} == set(RUINED)
    # Where the all-INT8 model's error stands at each layer (ONNX Runtime asked for the tensors; LiteRT
    # keeping them all). The first ruined Gemm's output is dominated by the one x1000 unit, which its range
    # represents well (cosine over the tensor hides the rest); the next layer, which divides that unit
    # back, shows what the coarse range did to the others.
    errors = {row["node"]: row["layer_error"] for row in layers}
    assert all(e is not None and 0 <= e <= 1 for e in errors.values())
    assert errors[RUINED[1]] > 0.1 and errors[RUINED[1]] > 10 * errors[RUINED[0]], errors
    assert layers[0]["sensitivity"] > 100 * layers[-1]["sensitivity"]


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_max_accuracy_drop_keeps_at_most_two_layers_float(outlier, target, tmp_path):
    out = tmp_path / target
    res = run_cli("convert", outlier["model"], "-o", out, "--target", target, "--quantize", "int8",
                  "--calibration", outlier["calibration"], "--validation", outlier["validation"],
                  "--max-accuracy-drop", "1.0", "--json", "-q")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    details = report["pass_details"]["quantize-int8" if target == "onnx" else "quantize-tflite"]["mixed_precision"]
    assert details["accuracy_drop_all_int8"] >= 5.0  # plain INT8 is ruined ...
    assert 1 <= len(details["kept_float"]) <= 2 and set(details["kept_float"]) <= set(RUINED)
    assert details["accuracy_drop"] <= 1.0 and report["status"] == "ok"
    assert details["quantizations"] <= 2 + details["candidates"].bit_length()
    # ... and the shipped file, run here on the held-out digits, meets the budget
    model = out / ("model.onnx" if target == "onnx" else "model.tflite")
    assert _accuracy(outlier["float"], outlier["validation"]) - _accuracy(model, outlier["validation"]) <= 1.0
    assert _float_layers(model) == len(details["kept_float"])
    # what the float layers cost, measured against the all-INT8 model side by side (not a threshold)
    latency = report["mixed_precision"]["latency"]
    assert latency["p50_ms"] > 0 and latency["p50_ms_all_int8"] > 0
    assert latency["slowdown_vs_all_int8"] == pytest.approx(latency["p50_ms"] / latency["p50_ms_all_int8"], rel=1e-2)


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_layers_kept_at_16_bits_meet_the_budget_at_int8_size(outlier, target, tmp_path):
    """kept_precision int16: the nodes kept out of INT8 get int16 activations and INT8 weights (ONNX
    Runtime's QDQ int16, LiteRT's 16x8) -- the budget held like float ones, at nearly the all-INT8 size."""
    out = tmp_path / target
    res = run_cli("convert", outlier["model"], "-o", out, "--target", target, "--quantize", "int8",
                  "--calibration", outlier["calibration"], "--validation", outlier["validation"],
                  "--max-accuracy-drop", "1.0", "--kept-precision", "int16", "--json", "-q")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    mixed = report["mixed_precision"]
    assert 1 <= len(mixed["kept"]) <= 2 and {k["node"] for k in mixed["kept"]} <= set(RUINED)
    assert {k["precision"] for k in mixed["kept"]} == {"int16 activations, int8 weights"}
    assert mixed["accuracy_drop"] <= 1.0 and report["status"] == "ok"
    assert mixed["size_increase"] < 1.1  # float-kept Gemms make this model 3.6x the all-INT8 one
    model = out / ("model.onnx" if target == "onnx" else "model.tflite")
    assert _accuracy(outlier["float"], outlier["validation"]) - _accuracy(model, outlier["validation"]) <= 1.0
    assert _float_layers(model) == 0
    if target == "onnx":  # 16-bit QuantizeLinear in the file, opset 21
        graph = onnx.load(str(model)).graph
        inits = {i.name: i for i in graph.initializer}
        zero_points = [inits[n.input[2]].data_type for n in graph.node if n.op_type == "QuantizeLinear"]
        assert {onnx.TensorProto.INT16, onnx.TensorProto.UINT16} & set(zero_points)
    else:  # int16 tensors in the .tflite
        sub = read_model(model.read_bytes()).subgraphs[0]
        assert any(t.type == schema().TensorType.INT16 for t in sub.tensors)


def test_kept_precision_is_refused_where_it_would_change_nothing(outlier, tmp_path):
    common = ("--quantize", "int8", "--calibration", outlier["calibration"], "--kept-precision", "int16", "-q")
    res = run_cli("convert", outlier["model"], "-o", tmp_path / "a", "--target", "onnx", *common)
    assert res.code == 2 and "--kept-precision applies to the nodes target 'onnx' keeps out of INT8" in res.err
    res = run_cli("convert", outlier["model"], "-o", tmp_path / "b", "--target", "tvm", *common, "--keep-float", RUINED[0])
    assert res.code == 2 and "TVM's ONNX importer takes no 16-bit QuantizeLinear" in res.err
    res = run_cli("convert", outlier["model"], "-o", tmp_path / "c", "--target", "coreml", "--quantize", "int8",
                  "--kept-precision", "int16", "--keep-float", RUINED[0], "-q")
    assert res.code == 2 and "target 'coreml' does not use it" in res.err
    assert not any((tmp_path / d).exists() for d in "abc")


def _float_layers(model: Path) -> int:
    """Weight layers that compute in float in the written model."""
    if model.suffix == ".onnx":
        graph = onnx.load(str(model)).graph
        dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        return sum(1 for n in graph.node if n.op_type == "Gemm" and n.input[0] not in dequantized)
    s = schema()
    m = read_model(model.read_bytes())
    sub = m.subgraphs[0]
    fc = [op for op in sub.operators
          if max(m.operatorCodes[op.opcodeIndex].builtinCode, m.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode)
          == s.BuiltinOperator.FULLY_CONNECTED]
    return sum(1 for op in fc if sub.tensors[op.inputs[1]].type == s.TensorType.FLOAT32)


def test_keep_float_by_hand_on_tflite(outlier, tmp_path):
    common = ("--target", "tflite", "--quantize", "int8", "--calibration", outlier["calibration"],
              "--validation", outlier["validation"], "--json", "-q")
    res = run_cli("convert", outlier["model"], "-o", tmp_path / "a", *common, "--keep-float", ",".join(RUINED))
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["pass_details"]["quantize-tflite"]["mixed_precision"]["kept_float"] == list(RUINED)
    assert _float_layers(tmp_path / "a" / "model.tflite") == 2 and report["accuracy"]["drop"] <= 1.0
    res = run_cli("convert", outlier["model"], "-o", tmp_path / "b", *common, "--keep-float", "no/such/node")
    assert res.code == 2 and "--keep-float: no node named 'no/such/node'" in res.err
    assert not (tmp_path / "b").exists()


def test_float_io_keeps_the_budget_a_check_on_tflite(outlier, tmp_path):
    """LiteRT's quantizer, which leaves layers float, writes integer I/O: with float_io=true the budget is
    only checked (the all-INT8 model fails it), and --keep-float is refused."""
    common = ("--target", "tflite", "--quantize", "int8", "--calibration", outlier["calibration"], "--validation",
              outlier["validation"], "--float-io", "--json", "-q")
    res = run_cli("convert", outlier["model"], "-o", tmp_path / "a", *common, "--max-accuracy-drop", "1.0")
    assert res.code == 1
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["mixed_precision"] is None and any("only checked" in n for n in report["notes"])
    res = run_cli("convert", outlier["model"], "-o", tmp_path / "b", *common, "--keep-float", RUINED[0])
    assert res.code == 2 and "--keep-float with --float-io" in res.err


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_a_missed_gate_carries_the_analysis(outlier, target, tmp_path):
    """Issue 17: the same analysis appears in a convert report whenever a quality gate fails -- here the
    default accuracy gate, no budget given, so `edgeopt analyze`'s ranking; its top nodes are the ruined pair."""
    res = run_cli("convert", outlier["model"], "-o", tmp_path / "a", "--target", target, "--quantize", "int8",
                  "--calibration", outlier["calibration"], "--validation", outlier["validation"])
    assert res.code == 0, res.err
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["status"] == "warning" and report["analysis"]["source"].startswith("edgeopt analyze")
    assert {r["node"] for r in report["analysis"]["layers"][:2]} == set(RUINED)
    assert "most sensitive to INT8" in res.out and "--keep-float" in res.out


def test_keep_float_with_a_budget_no_prefix_meets_ships_only_the_named_nodes_float(outlier, tmp_path):
    """A budget nothing meets (LiteRT's integer I/O alone costs more), with --keep-float: the search
    fails and the model shipped keeps exactly the named node float, not the search's last try."""
    res = run_cli("convert", outlier["model"], "-o", tmp_path / "a", "--target", "tflite", "--quantize", "int8",
                  "--calibration", outlier["calibration"], "--validation", outlier["validation"], "--keep-float",
                  RUINED[0], "--min-cosine", "0.99999999", "-q")
    assert res.code == 1
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert any("only the --keep-float nodes float" in n for n in report["notes"])
    assert _float_layers(tmp_path / "a" / "model.tflite") == 1
