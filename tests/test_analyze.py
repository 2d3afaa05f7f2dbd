"""`edgeopt analyze` (issue 17 point 1, ONNX Runtime QDQ) and `convert --keep-float`: the ranking
is real — keeping its top node in float recovers what the all-INT8 model lost — on the trained
digits CNN, with ONNX Runtime's real quantizer and runtime."""

from __future__ import annotations

import json

import onnx
import pytest

from edgeopt.converters.passes.mixed_precision import Budget, fewest_float_nodes

from conftest import run_cli


@pytest.fixture(scope="module")
def analysis(digits_models, tmp_path_factory):
    png = tmp_path_factory.mktemp("analyze") / "sensitivity.png"
    res = run_cli("analyze", digits_models["cnn"], "--calibration", digits_models["calibration"],
                  "--validation", digits_models["validation"], "--validation-samples", "48", "--json",
                  "--plot", png)
    assert res.code == 0, res.err
    return json.loads(res.out), png


def test_every_quantized_node_is_ranked_most_sensitive_first(analysis, digits_models):
    result, _ = analysis
    layers = result["layers"]
    sensitivities = [row["sensitivity"] for row in layers]
    assert sensitivities == sorted(sensitivities, reverse=True)
    names = {n.name for n in onnx.load(str(digits_models["cnn"])).graph.node}
    ops = {row["op"] for row in layers}
    assert {"Conv", "Gemm"} <= ops and all(row["node"] in names for row in layers)
    assert all(row.keys() >= {"node", "op", "sensitivity", "cosine", "max_abs_err", "top1_agreement"}
               for row in layers)
    assert result["validation"]["samples"] == 48 and result["calibration"]["samples"] > 0
    base = result["float_vs_int8"]["cosine"]
    # each node alone costs at most about what all of them together cost
    assert 0.9 < base < 1.0 and layers[0]["cosine"] >= base - 1e-4
    assert layers[0]["sensitivity"] > 10 * layers[-1]["sensitivity"]


def test_keeping_the_top_node_float_recovers_the_int8_loss(analysis, digits_models, tmp_path):
    """The most sensitive node, kept in float by --keep-float, lifts the cosine of the INT8 model more
    than keeping the least sensitive one does."""
    result, _ = analysis
    first, last = result["layers"][0]["node"], result["layers"][-1]["node"]
    cosines = {}
    for node in (first, last):
        res = run_cli("convert", digits_models["cnn"], "-o", tmp_path / node.strip("/").replace("/", "_"),
                      "--target", "onnx", "--quantize", "int8", "--calibration", digits_models["calibration"],
                      "--validation", digits_models["validation"], "--keep-float", node, "--json", "-q")
        assert res.code == 0, res.err
        report = json.loads(res.out)
        assert report["pass_details"]["quantize-int8"]["kept_float"] == [node]
        cosines[node] = report["parity"]["cosine"]
    assert cosines[first] > cosines[last]
    assert cosines[first] > result["float_vs_int8"]["cosine"]


def test_the_chart_is_a_png(analysis):
    _, png = analysis
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_keep_float_node_and_a_mode_that_cannot_keep_one_are_refused(digits_models, tmp_path):
    common = ("--quantize", "int8", "--calibration", digits_models["calibration"], "-q")
    res = run_cli("convert", digits_models["cnn"], "-o", tmp_path / "a", "--target", "onnx", *common,
                  "--keep-float", "no/such/node")
    assert res.code == 2 and "--keep-float: no node named 'no/such/node'" in res.err
    assert not (tmp_path / "a").exists()
    res = run_cli("convert", digits_models["cnn"], "-o", tmp_path / "b", "--target", "coreml", "--quantize", "int4",
                  "--minimum-deployment-target", "iOS18", "--keep-float", "/0/Conv", "-q")
    assert res.code == 2 and "--keep-float /0/Conv: target 'coreml' does not use it with --quantize int4" in res.err


def test_analyze_needs_calibration_data(digits_models, tmp_path):
    res = run_cli("analyze", digits_models["cnn"], "--calibration", tmp_path / "missing.npz")
    assert res.code == 2 and f"not found: {tmp_path / 'missing.npz'}" in res.err


def test_min_cosine_keeps_the_fewest_sensitive_nodes_float(analysis, digits_models, tmp_path):
    """--min-cosine above what all-INT8 reaches: the pass ranks the nodes, searches the ranking, and
    ships the mixed model; the report says which nodes, and the gate holds on the validation set. The
    budget is halfway from the all-INT8 cosine to 1 (which the all-INT8 model reaches depends on the
    CPU: 7-bit weights without VNNI)."""
    budget = 1 - (1 - analysis[0]["float_vs_int8"]["cosine"]) / 2
    common = ("--target", "onnx", "--quantize", "int8", "--calibration", digits_models["calibration"],
              "--validation", digits_models["validation"], "--json", "-q")
    res = run_cli("convert", digits_models["cnn"], "-o", tmp_path / "mixed", *common, "--min-cosine", f"{budget:.9f}")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    mixed = report["pass_details"]["quantize-int8"]["mixed_precision"]
    assert mixed["cosine_all_int8"] < budget <= mixed["cosine"] and report["parity"]["cosine"] >= budget
    assert 1 <= len(mixed["kept_float"]) < mixed["candidates"]
    assert report["pass_details"]["quantize-int8"]["kept_float"] == mixed["kept_float"]
    assert mixed["quantizations"] <= 2 + mixed["candidates"].bit_length()  # bisection, not a sweep
    assert report["status"] == "ok"
    # a budget the all-INT8 model meets keeps nothing float
    res = run_cli("convert", digits_models["cnn"], "-o", tmp_path / "plain", *common, "--min-cosine", "0.9")
    assert res.code == 0, res.err
    plain = json.loads(res.out)["pass_details"]["quantize-int8"]["mixed_precision"]
    assert plain["kept_float"] == [] and plain["cosine"] == plain["cosine_all_int8"] >= 0.9


def test_no_mixed_precision_only_checks_and_is_refused_where_it_means_nothing(analysis, digits_models, tmp_path):
    budget = 1 - (1 - analysis[0]["float_vs_int8"]["cosine"]) / 2  # all-INT8 misses it
    common = ("--quantize", "int8", "--calibration", digits_models["calibration"], "-q")
    res = run_cli("convert", digits_models["cnn"], "-o", tmp_path / "a", "--target", "onnx", *common,
                  "--validation", digits_models["validation"], "--min-cosine", f"{budget:.9f}", "--no-mixed-precision")
    assert res.code == 1  # the gate, unassisted
    assert "mixed_precision" not in json.loads((tmp_path / "a" / "report.json").read_text())["pass_details"][
        "quantize-int8"]
    for extra in (("--target", "onnx"), ("--target", "coreml", "--min-cosine", "0.9")):
        res = run_cli("convert", digits_models["cnn"], "-o", tmp_path / "b", *extra, *common, "--no-mixed-precision")
        assert res.code == 2 and res.err.startswith("edgeopt: error: --no-mixed-precision applies with --min-cosine")


@pytest.mark.parametrize("answer", [1, 2, 3, 10, 37, 64])
def test_the_search_gallops_from_the_top_then_bisects(tmp_path, answer):
    """Pure logic, a fake quantizer: the prefix length that first meets the budget is found in
    O(log k) quantizations, and a longer prefix that misses again (not monotonic, as on the PP-OCRv4
    detector) does not hide a short one that meets it."""
    ranking = [f"n{i}" for i in range(64)]
    excluded: list[int] = []

    def quantize(path, nodes_to_quantize=None, nodes_to_exclude=()):
        excluded.append(len(nodes_to_exclude))

    def score(path):
        k = excluded[-1]
        meets = k >= answer and not (answer < 20 and 2 * answer <= k < 3 * answer)  # a dip after the answer
        return {"cosine": 0.995 if meets else 0.985}

    found = fewest_float_nodes(quantize, score, ranking, Budget(min_cosine=0.99), tmp_path / "out.onnx")
    assert found["kept_float"] == ranking[:answer] and found["cosine"] == 0.995
    assert excluded[-1] == answer  # the chosen model is the one left at out
    assert found["quantizations"] <= 2 * answer.bit_length() + 2
    assert fewest_float_nodes(quantize, lambda p: {"cosine": 0.5}, ranking, Budget(min_cosine=0.99),
                              tmp_path / "o.onnx") is None


def test_coreml_ranks_each_compressed_weight_by_the_error_coremltools_gives_it(digits_models, tmp_path):
    """--target coreml: Core ML's INT8 compresses weights only, and nothing runs Core ML here, so the ranking
    is each weight's own error -- computed with numpy, and equal to what a real conversion's compressed
    weights carry (decompressed from the package, pass_details.coreml.compressed_weights)."""
    pytest.importorskip("coremltools")
    import numpy as np
    from onnx import numpy_helper

    model = onnx.load(str(digits_models["cnn"]))
    inits = {i.name: i for i in model.graph.initializer}
    weights = [n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
               and n.input[1] in inits and numpy_helper.to_array(inits[n.input[1]]).size >= 512]
    victim = weights[0]
    w = numpy_helper.to_array(inits[victim]).copy()
    w.flat[0] = 50 * np.abs(w).max()  # one outlier: its channel's scale grows, the channel's other values round coarsely
    inits[victim].CopyFrom(numpy_helper.from_array(w, victim))
    path = tmp_path / "outlier.onnx"
    onnx.save(model, str(path))

    res = run_cli("analyze", path, "--target", "coreml", "--json")
    assert res.code == 0, res.err
    result = json.loads(res.out)
    assert result["target"] == "coreml" and result["float_vs_int8"] is None
    layers = result["layers"]
    assert len(layers) == len(weights) and layers[0]["weight"] == victim
    assert layers[0]["sensitivity"] > 10 * layers[-1]["sensitivity"]

    res = run_cli("convert", path, "-o", tmp_path / "ml", "--target", "coreml", "--quantize", "int8",
                  "--compute-precision", "fp32", "-q")
    assert res.code in (0, 1), res.err
    compressed = json.loads((tmp_path / "ml" / "report.json").read_text())["pass_details"]["coreml"]["compressed_weights"]
    assert sorted(r["max_abs_err"] for r in layers) == pytest.approx(sorted(c["max_abs_err"] for c in compressed),
                                                                     rel=1e-3)


def test_coreml_analysis_reads_no_data_and_the_others_need_calibration(digits_models):
    res = run_cli("analyze", digits_models["cnn"], "--target", "coreml", "--calibration", digits_models["calibration"])
    assert res.code == 2 and "--target coreml" in res.err and "would not be read" in res.err
    res = run_cli("analyze", digits_models["cnn"], "--target", "tflite")
    assert res.code == 2 and "--target tflite needs --calibration" in res.err
