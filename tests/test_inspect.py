"""`edgeopt inspect` answers what `edgeopt convert` will do (issue 15): it canonicalises with the same
--input-shape / --input-value / --batch-axis first, lists layers by the node names --prune-layer
takes with their parameters and MACs, finds state pairs and batch axes, says where convert would
stop, and takes an artifact directory."""

from __future__ import annotations

from conftest import run_cli
from onnx_models import dynamic_dims, if_on_sample_rate, lstm_stateful, save


def test_inspect_canonicalises_like_convert(tmp_path):
    model = save(if_on_sample_rate(), tmp_path / "m.onnx")
    raw = run_cli("inspect", model, "--json").json()
    assert "If" in raw["ops"] and [i["name"] for i in raw["inputs"]] == ["x", "rate"]
    assert raw["targets"]["tflite"]["supported"] is False  # If on a runtime input: no .tflite for it
    frozen = run_cli("inspect", model, "--input-value", "rate=16000", "--json").json()
    assert frozen["canonicalized"] and "If" not in frozen["ops"]
    assert [i["name"] for i in frozen["inputs"]] == ["x"]
    assert frozen["targets"]["tflite"] == {"supported": True, "unsupported": {}}
    # what convert then does with the same flag
    res = run_cli("convert", model, "-o", tmp_path / "art", "--target", "tflite", "--input-value", "rate=16000", "-q")
    assert res.code == 0, res.err


def test_inspect_lists_layers_for_prune_layer(digits_models, tmp_path):
    info = run_cli("inspect", digits_models["cnn"], "--json").json()
    convs = [row for row in info["layers"] if row["op"] == "Conv"]
    assert len(convs) == 3 and all(row["params"] > 0 and row["macs"] > 0 for row in convs)
    assert sum(row["macs"] for row in info["layers"] if row["macs"]) == info["macs"]
    table = run_cli("inspect", digits_models["cnn"]).out
    assert all(row["name"] in table for row in convs)
    # the names are the ones convert's --prune-layer takes
    res = run_cli("convert", digits_models["cnn"], "-o", tmp_path / "p", "--target", "onnx", "--prune-channels",
                  "0.25", "--prune-layer", f"{convs[0]['name']}=0.5", "-q")
    assert res.code == 0, res.err


def test_inspect_says_where_convert_would_stop_and_reads_state_and_axes(tmp_path):
    dyn = save(dynamic_dims(), tmp_path / "dyn.onnx")
    info = run_cli("inspect", dyn, "--json").json()
    assert not info["canonicalized"]
    assert any(n.startswith("convert would stop here: input 'x' has dynamic dim") for n in info["notes"])
    assert run_cli("inspect", dyn, "--input-shape", "x:1,3,16", "--json").json()["canonicalized"]
    lstm = save(lstm_stateful(), tmp_path / "lstm.onnx")
    info = run_cli("inspect", lstm, "--json").json()
    assert info["state"] == [{"input": "h", "output": "hn"}, {"input": "c", "output": "cn"}]
    assert {t["name"]: t["batch_axis"] for t in info["inputs"]} == {"x": 0, "h": 1, "c": 1}
    res = run_cli("inspect", lstm, "--batch-axis", "hh:1")  # refused as convert refuses it
    assert res.code == 2 and "--batch-axis: the model has no input or output 'hh'" in res.err


def test_inspect_takes_an_artifact_and_a_profile(tmp_path):
    lstm = save(lstm_stateful(), tmp_path / "lstm.onnx")
    out = tmp_path / "art"
    assert run_cli("convert", lstm, "-o", out, "--target", "onnx", "-q").code == 0
    info = run_cli("inspect", out, "--json").json()
    assert info["artifact"]["format"] == "onnx" and info["artifact"]["status"] == "ok"
    assert info["state"] == [{"input": "h", "output": "hn"}, {"input": "c", "output": "cn"}]
    assert any(row["op"] == "LSTM" for row in info["layers"])
    res = run_cli("inspect", out, "--input-shape", "x:1,4,3")
    assert res.code == 2 and "is an artifact" in res.err
    board = run_cli("inspect", lstm, "--profile", "raspberry-pi-4", "--json").json()
    assert board["targets"]["coreml"]["board"] == "raspberry-pi-4 does not run coreml models"
    assert "board" not in board["targets"]["onnx"]
