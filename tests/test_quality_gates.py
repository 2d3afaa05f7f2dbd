"""Quality gates: a conversion that is far from the original says so (status: warning, one line why,
a hint; exit 0), and fails (exit 1, artifact kept, report failed) when the user set the threshold;
every report says which gates applied. Also: reports and manifests are strict JSON, golden
tolerances finite by construction."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from edgeopt.artifact import report_failures
from edgeopt.converters.compare import golden_tolerance
from edgeopt.converters.gates import (
    DEFAULT_MAX_ACCURACY_DROP,
    DEFAULT_MIN_COSINE,
    DEFAULT_MIN_TOP1_AGREEMENT,
    Thresholds,
    evaluate,
    hint,
)
from edgeopt.fsutil import atomic_write_json

from conftest import run_cli


def _strict(path) -> dict:
    def refuse(name):
        raise AssertionError(f"{path} holds {name}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _par(cosine=1.0, top1=1.0):
    return {"cosine": cosine, "top1_agreement": top1}


ACC_NONE = {"metric": None, "drop": None}


# -- the gate logic -------------------------------------------------------------------------------

@pytest.mark.parametrize("par,acc,thresholds,task,generated,warnings,failures", [
    # no labels: cosine and top-1 agreement, as warnings
    (_par(0.03, 1.0), ACC_NONE, Thresholds(), None, False, ["parity: cosine 0.0300 is below 0.9900"], []),
    (_par(0.9994, 0.9375), ACC_NONE, Thresholds(), None, False, ["parity: top-1 agreement 93.75% is below 98.00%"], []),
    (_par(0.9994, 0.991), ACC_NONE, Thresholds(), None, False, [], []),
    # random inputs: top-1 agreement is not gated by default, cosine still is
    (_par(0.9971, 0.953), ACC_NONE, Thresholds(), None, True, [], []),
    # class labels: the accuracy drop is the default gate, not parity
    (_par(0.84, 0.85), {"metric": "top1_percent", "drop": 13.4}, Thresholds(), "classification", False,
     ["accuracy: top-1 accuracy drop 13.40 points is above 1.00 points"], []),
    (_par(0.84, 0.85), {"metric": "top1_percent", "drop": 0.5}, Thresholds(), "classification", False, [], []),
    # regression labels: parity cosine by default; the MAE only with --max-accuracy-drop
    (_par(0.5, None), {"metric": "mae", "drop": 3.0}, Thresholds(), "regression", False,
     ["parity: cosine 0.5000 is below 0.9900"], []),
    (_par(1.0, None), {"metric": "mae", "drop": 3.0}, Thresholds(max_accuracy_drop=0.1), "regression", False,
     [], ["accuracy: increase of the mean absolute error 3 is above 0.1 (--max-accuracy-drop 0.1)"]),
    # flags turn a miss into a failure, whatever the labels
    (_par(0.95, 1.0), ACC_NONE, Thresholds(min_cosine=0.99), None, False, [],
     ["parity: cosine 0.9500 is below 0.9900 (--min-cosine 0.99)"]),
    (_par(1.0, 0.9), {"metric": "top1_percent", "drop": 0.0}, Thresholds(min_top1_agreement=0.95), "classification",
     False, [], ["parity: top-1 agreement 90.00% is below 95.00% (--min-top1-agreement 0.95)"]),
    (_par(1.0, 1.0), {"metric": "top1_percent", "drop": 2.0}, Thresholds(max_accuracy_drop=1.0), "classification",
     False, [], ["accuracy: top-1 accuracy drop 2.00 points is above 1.00 points (--max-accuracy-drop 1)"]),
])
def test_gates(par, acc, thresholds, task, generated, warnings, failures):
    result = evaluate(par, acc, thresholds, task, generated)
    assert len(result.warnings) == len(warnings) and len(result.failures) == len(failures), result
    for got, want in zip(result.warnings + result.failures, warnings + failures, strict=True):
        assert got.startswith(want), (got, want)
    assert result.checks and all(c["source"] in ("default", "--min-cosine", "--min-top1-agreement",
                                                  "--max-accuracy-drop") for c in result.checks)


def test_not_measured_is_not_a_pass_and_fails_an_explicit_gate():
    unmeasured = {"cosine": None, "top1_agreement": None}
    result = evaluate(unmeasured, ACC_NONE, Thresholds(), None, False)
    assert [c["outcome"] for c in result.checks] == ["not measured"] and not result.warnings
    result = evaluate(unmeasured, ACC_NONE, Thresholds(min_cosine=0.9), None, False)
    assert result.failures == ["--min-cosine 0.9: the cosine could not be measured"]


def test_hint_names_what_to_try_for_the_recipe():
    modes = ("none", "fp16", "int8", "int8-dynamic", "int4")
    assert hint("int8", modes, False, False) == ("try calibration data that looks like the real inputs "
                                                 "(--calibration); or a higher precision (--quantize fp16 / none)")
    assert "--int4-block-size 16" in hint("int4", modes, False, False)
    assert "--validation DATA" in hint("fp16", modes, False, True)
    assert "pruning ratio" in hint("none", modes, True, False)
    assert "edgeopt inspect" in hint("none", modes, False, False)


def test_defaults_sit_between_the_measured_healthy_and_broken_conversions():
    """The numbers docs/converter.md quotes from benchmarks/parity_gates.py."""
    healthy_cosine, broken_cosine = 0.9974, 0.842
    healthy_top1, broken_top1 = 0.991, 0.851
    healthy_drop, broken_drop = 0.54, 13.4
    assert broken_cosine < DEFAULT_MIN_COSINE < healthy_cosine
    assert broken_top1 < DEFAULT_MIN_TOP1_AGREEMENT < healthy_top1
    assert healthy_drop < DEFAULT_MAX_ACCURACY_DROP < broken_drop


# -- through the CLI ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unlabelled(digits_models, tmp_path_factory):
    """Real held-out digits without labels, and a calibration set of zeros (unrepresentative)."""
    root = tmp_path_factory.mktemp("gates")
    with np.load(digits_models["validation"]) as npz:
        np.savez(root / "val.npz", image=npz["image"])
    np.savez(root / "zeros.npz", image=np.zeros((64, 1, 8, 8), np.float32))
    return root


def test_badly_calibrated_int8_without_labels_is_a_warning(digits_models, unlabelled, tmp_path):
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "--quantize", "int8", "-q",
                  "--calibration", unlabelled / "zeros.npz", "--validation", unlabelled / "val.npz")
    assert res.code == 0, res.err
    report = _strict(out / "report.json")
    assert report["status"] == "warning" and report["failures"] == []
    assert report["warnings"][0].startswith("parity: cosine 0.8") and "default gate: no class labels" in \
        report["warnings"][0]
    assert [(c["metric"], c["source"], c["outcome"]) for c in report["gates"]] == [
        ("cosine", "default", "warning"), ("top1_agreement", "default", "warning")]
    assert "calibration data that looks like the real inputs" in report["hint"]
    status = [ln for ln in res.out.splitlines() if ln.startswith("status:")]
    assert len(status) == 1 and status[0].startswith("status: warning: parity: cosine"), res.out
    assert any(ln.startswith("hint: try calibration data") for ln in res.out.splitlines())
    assert report_failures(report) == []  # a warning does not stop `fleet publish`


def test_min_cosine_makes_it_a_failure_and_keeps_the_artifact(digits_models, unlabelled, tmp_path):
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "--quantize", "int8", "-q",
                  "--calibration", unlabelled / "zeros.npz", "--validation", unlabelled / "val.npz",
                  "--min-cosine", "0.99", "--min-top1-agreement", "0.95", "--no-mixed-precision")
    assert res.code == 1, res.err
    assert "--min-cosine 0.99" in res.err and "(artifact kept, report marked failed)" in res.err
    report = _strict(out / "report.json")
    assert report["status"] == "failed" and len(report["failures"]) == 2
    assert [(c["source"], c["outcome"]) for c in report["gates"]] == [
        ("--min-cosine", "failed"), ("--min-top1-agreement", "failed")]
    assert report_failures(report) == report["failures"]  # `fleet publish` refuses it without --allow-failed


def test_healthy_conversion_with_labels_passes_the_accuracy_gate(digits_models, tmp_path):
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "--quantize", "int8", "-q",
                  "--calibration", digits_models["calibration"], "--validation", digits_models["validation"])
    assert res.code == 0, res.err
    report = _strict(out / "report.json")
    assert report["status"] == "ok" and report["warnings"] == [] and report["hint"] is None
    assert report["validation"]["labels"] == "classification"
    assert [(c["gate"], c["metric"], c["source"], c["outcome"]) for c in report["gates"]] == [
        ("accuracy", "top1_percent_drop", "default", "pass")]


def test_max_accuracy_drop_without_labels_is_refused_before_any_work(digits_models, unlabelled, tmp_path):
    out = tmp_path / "out"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "-q",
                  "--validation", unlabelled / "val.npz", "--max-accuracy-drop", "1")
    assert res.code == 2 and not out.exists()
    assert res.err.strip() == (f"edgeopt: error: --max-accuracy-drop needs labels in the validation data: "
                               f"{unlabelled / 'val.npz'} has no 'labels' array (or gate on parity with "
                               f"--min-cosine / --min-top1-agreement)")


def _near_tie_classifier() -> onnx.ModelProto:
    """x[N, 64] @ W[64, 4]: four nearly identical columns, so the top class hangs on differences far
    below INT4's rounding step, while the logits (and their cosine) barely change."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((64, 1)).astype(np.float32)
    w = base + 0.01 * rng.standard_normal((64, 4)).astype(np.float32)
    graph = h.make_graph([h.make_node("MatMul", ["x", "w"], ["logits"], name="fc")], "near_tie",
                         [h.make_tensor_value_info("x", T.FLOAT, ["N", 64])],
                         [h.make_tensor_value_info("logits", T.FLOAT, ["N", 4])],
                         initializer=[numpy_helper.from_array(w, "w")])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def _regressor() -> onnx.ModelProto:
    """y[N, 1] = x[N, 8] @ w: a regression-shaped output."""
    w = np.linspace(-1, 1, 8, dtype=np.float32).reshape(8, 1)
    graph = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "reg",
                         [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", 1])],
                         initializer=[numpy_helper.from_array(w, "w")])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_int4_flipping_top_classes_is_a_warning_though_cosine_is_high(tmp_path):
    model = tmp_path / "tie.onnx"
    onnx.save(_near_tie_classifier(), model)
    val = tmp_path / "val.npz"
    np.savez(val, x=np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32))
    out = tmp_path / "out"
    res = run_cli("convert", model, "-o", out, "--target", "onnx", "--quantize", "int4", "--validation", val,
                  "--int4-block-size", "16", "-q")
    assert res.code == 0, res.err
    report = _strict(out / "report.json")
    assert report["parity"]["cosine"] > DEFAULT_MIN_COSINE > 0  # cosine alone would call this fine
    assert report["parity"]["top1_agreement"] < DEFAULT_MIN_TOP1_AGREEMENT
    assert report["status"] == "warning"
    assert len(report["warnings"]) == 1 and report["warnings"][0].startswith("parity: top-1 agreement")
    assert "a higher precision (--quantize int8-dynamic / int8 / fp16 / none)" in report["hint"]


def test_float_labels_on_a_regression_output_give_mae_and_rmse(tmp_path):
    model = tmp_path / "reg.onnx"
    onnx.save(_regressor(), model)
    x = np.random.default_rng(2).standard_normal((40, 8)).astype(np.float32)
    val = tmp_path / "val.npz"
    np.savez(val, x=x, labels=(x @ np.linspace(-1, 1, 8)).astype(np.float32) + 0.1)
    out = tmp_path / "out"
    res = run_cli("convert", model, "-o", out, "--target", "onnx", "--quantize", "fp16", "--validation", val,
                  "--max-accuracy-drop", "0.01", "-q")
    assert res.code == 0, res.err
    report = _strict(out / "report.json")
    acc = report["accuracy"]
    assert acc["metric"] == "mae" and acc["original"] == pytest.approx(0.1, abs=1e-3)
    assert acc["rmse"]["original"] == pytest.approx(0.1, abs=1e-3) and report["validation"]["labels"] == "regression"
    assert [(c["metric"], c["source"]) for c in report["gates"]] == [("mae_increase", "--max-accuracy-drop"),
                                                                     ("cosine", "default")]
    res = run_cli("convert", model, "-o", tmp_path / "o2", "--target", "onnx", "--validation", val,
                  "--min-top1-agreement", "0.9", "-q")
    assert res.code == 2 and "--min-top1-agreement needs a classifier output shaped [N, C]" in res.err


# -- strict JSON, finite tolerances ---------------------------------------------------------------

def _sqrt_model() -> onnx.ModelProto:
    """y = sqrt(x): NaN for negative inputs, in the original and in the converted model alike."""
    graph = h.make_graph([h.make_node("Sqrt", ["x"], ["y"], name="root")], "sqrt",
                         [h.make_tensor_value_info("x", T.FLOAT, ["N", 4])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_nan_outputs_on_some_samples_give_strict_json_and_finite_tolerances(tmp_path):
    model = tmp_path / "sqrt.onnx"
    onnx.save(_sqrt_model(), model)
    x = np.abs(np.random.default_rng(3).standard_normal((16, 4))).astype(np.float32)
    x[10] = -1.0  # finite data; the model itself gives NaN for this sample
    val = tmp_path / "val.npz"
    np.savez(val, x=x)
    out = tmp_path / "out"
    res = run_cli("convert", model, "-o", out, "--target", "onnx", "--validation", val, "-q")
    assert res.code == 1 and "NaN or Inf outputs" in res.err
    report, manifest = _strict(out / "report.json"), _strict(out / "manifest.json")
    assert report["parity"]["finite"] is False and report["parity"]["nonfinite_samples"] == 1
    assert report["parity"]["cosine"] == pytest.approx(1.0)  # measured on the 15 finite samples
    golden = manifest["golden"]
    assert all(isinstance(golden[k], float) and np.isfinite(golden[k]) for k in ("atol", "expected_atol"))


def test_golden_tolerance_is_none_when_no_sample_was_finite():
    par = {"outputs": {"y": {"max_abs_err": None, "output_scale": None, "cosine": None}}}
    assert golden_tolerance(par, False) == {"atol": None, "cosine_min": None, "expected_atol": None}


def test_json_writer_refuses_nan_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"golden.atol is not a finite number"):
        atomic_write_json(tmp_path / "m.json", {"golden": {"atol": float("nan")}})
    with pytest.raises(ValueError, match=r"x\[1\] is not a finite number"):
        atomic_write_json(tmp_path / "m.json", {"x": [1.0, float("inf")]})
    assert not list(tmp_path.iterdir())
