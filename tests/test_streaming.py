"""Batch axes and recurrent state (issue 15): which axis stacks samples in each input and output,
which inputs are a state the model hands back, and stateful models converted on ONNX Runtime,
LiteRT and TVM, validated as one stream against ONNX Runtime running the original step by step."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from edgeopt.agent.model import load_model
from edgeopt.agent.statedir import StateDir
from edgeopt.agent.windowing import WindowBatch, WindowBlock
from edgeopt.converters.streaming import (
    input_axes,
    output_axes,
    parse_batch_axis,
    parse_state,
    state_pairs,
)
from edgeopt.errors import UserInputError
from edgeopt.golden_vectors import check_artifact
from edgeopt.runtime import open_runtime
from edgeopt.specs import TensorSpec

from agent_harness import AgentProcess, base_config, results_from_jsonl
from conftest import run_cli
from onnx_models import chain, gru_stateful, lstm_stateful, save


def _spec(name, shape, axis=0):
    return TensorSpec(name, tuple(shape), "float32", batch_axis=axis)


# -- batch axes ----------------------------------------------------------------------------------------------------

def test_batch_axis_follows_the_batch_symbol_wherever_it_is():
    # silero-vad: input [batch, 512], state [2, batch, 128], sr a scalar
    inputs = [_spec("input", ["batch", 512]), _spec("state", [2, "batch", 128]), TensorSpec("sr", [], "int64")]
    assert input_axes(inputs, {}) == {"input": 0, "state": 1, "sr": None}


def test_an_unnamed_dynamic_dim_is_the_batch():
    # silero_vad.onnx declares input [?, ?] and state [2, ?, 128] without symbols
    inputs = [_spec("input", [None, None]), _spec("state", [2, None, 128]), TensorSpec("sr", (), "int64")]
    assert input_axes(inputs, {}) == {"input": 0, "state": 1, "sr": None}
    # a named dynamic dim that is not the batch (a CRNN's image width) is not taken for one
    crnn = [_spec("image", [1, 1, 64, "image_width"])]
    assert input_axes(crnn, {}) == {"image": 0}


def test_fixed_shape_model_batch_is_the_first_inputs_leading_size():
    inputs = [_spec("input", [1, 576]), _spec("state", [2, 1, 128]), _spec("gain", [4])]
    assert input_axes(inputs, {}) == {"input": 0, "state": 1, "gain": None}


def test_batch_axis_given_wins_and_is_checked():
    inputs = [_spec("x", ["N", 8]), _spec("h", [3, 4, 8])]
    assert input_axes(inputs, {"h": 1})["h"] == 1
    assert input_axes(inputs, {"h": None})["h"] is None
    with pytest.raises(UserInputError, match=r"--batch-axis h:3: input 'h' has 3 dims"):
        input_axes(inputs, {"h": 3})
    with pytest.raises(UserInputError, match=r"no input 'hh'.*did you mean 'h'"):
        input_axes(inputs, {"hh": 1})


@pytest.mark.parametrize("text, expected", [("state:1", ("state", 1)), ("sr:none", ("sr", None)),
                                            ("a:b:0", ("a:b", 0))])
def test_parse_batch_axis(text, expected):
    assert parse_batch_axis(text) == expected


@pytest.mark.parametrize("text", ["state", "state:-1", "state:x", ":1"])
def test_parse_batch_axis_refuses(text):
    with pytest.raises(UserInputError, match="expected NAME:AXIS"):
        parse_batch_axis(text)


def test_output_axis_of_a_state_is_its_inputs_and_an_unknowable_one_is_asked_for():
    inputs = [_spec("x", [4, 3]), _spec("state", [2, 4, 5], axis=1)]
    outputs = [_spec("y", [4, 2]), _spec("stateN", [2, 4, 5]), _spec("odd", [7, 4])]
    with pytest.raises(UserInputError, match=r"output 'odd' \[7, 4\]: its batch axis cannot be told.*"
                                             r"--batch-axis odd:K"):
        output_axes(outputs, outputs, inputs, {}, [("state", "stateN")])
    axes = output_axes(outputs, outputs, inputs, {"odd": 1}, [("state", "stateN")])
    assert axes == {"y": 0, "stateN": 1, "odd": 1}


# -- state pairs ---------------------------------------------------------------------------------------------------

def test_state_pairs_by_name_and_shape():
    inputs = [_spec("x", ["N", 4, 3]), _spec("h", [1, "N", 6]), _spec("c", [1, "N", 6]), _spec("gain", [1])]
    outputs = [_spec("y", ["N", 3]), _spec("hn", [1, "N", 6]), _spec("cn", [1, "N", 6]), _spec("gainn", [2])]
    assert state_pairs(inputs, outputs, {}) == [("h", "hn"), ("c", "cn")]  # gain/gainn: shapes differ
    gru = [_spec("x", [1, 4, 3]), _spec("state", [2, 1, 5])]
    assert state_pairs(gru, [_spec("y", [1, 5]), _spec("stateN", [2, 1, 5])], {}) == [("state", "stateN")]
    assert state_pairs(gru[:1], [_spec("y", [1, 5])], {}) == []


def test_state_given_is_checked():
    inputs = [_spec("x", [1, 3]), _spec("mem", [1, 5])]
    outputs = [_spec("y", [1, 3]), _spec("mem_next", [1, 5])]
    assert state_pairs(inputs, outputs, {"mem": "mem_next"}) == [("mem", "mem_next")]
    with pytest.raises(UserInputError, match=r"--state mem=y: input 'mem' \[1, 5\] and output 'y' \[1, 3\] differ"):
        state_pairs(inputs, outputs, {"mem": "y"})
    with pytest.raises(UserInputError, match=r"no output 'mem_nxt'.*did you mean 'mem_next'"):
        state_pairs(inputs, outputs, {"mem": "mem_nxt"})
    with pytest.raises(UserInputError, match="expected INPUT=OUTPUT"):
        parse_state("mem")


# -- stateful models end to end ------------------------------------------------------------------------------------

STEPS = 40


def _stream(n=STEPS, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 4, 3)).astype(np.float32)


def _ort_step_by_step(model_path, xs, state_shapes, pairs, carry=True):
    """The reference: ONNX Runtime on the original model, one step per call, state carried."""
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    state = {i: np.zeros(shape, np.float32) for i, shape in state_shapes.items()}
    ys = []
    for x in xs:
        out = dict(zip(names, sess.run(names, {"x": x[None], **state}), strict=True))
        ys.append(out[names[0]][0])
        if carry:
            state = {i: out[o] for i, o in pairs}
    return np.stack(ys)


def _artifact_step_by_step(artifact, xs, pairs):
    """The converted model through edgeopt's runtime, one step per call, carrying its own state."""
    rt = open_runtime(artifact)
    specs = {s.name: s for s in rt.inputs}
    state = {i: np.zeros(specs[i].concrete_shape(1), np.float32) for i, _ in pairs}
    ys = []
    for x in xs:
        out = rt.run_float({"x": x[None], **state})
        ys.append(out[rt.outputs[0].name][0])
        state = {i: out[o] for i, o in pairs}
    return np.stack(ys)


MODELS = {
    # batch on axis 1 of h and c, a dynamic batch
    "lstm": (lstm_stateful, {"h": (1, 1, 6), "c": (1, 1, 6)}, [("h", "hn"), ("c", "cn")]),
    # one [2, N, H] state, fixed batch 1
    "gru": (gru_stateful, {"state": (2, 1, 5)}, [("state", "stateN")]),
}


@pytest.fixture(scope="module")
def stateful_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("stateful")
    np.savez(root / "stream.npz", x=_stream())
    return root, {name: save(build(), root / f"{name}.onnx") for name, (build, _, _) in MODELS.items()}


TARGETS = ["onnx", "tflite", "tvm"]


@pytest.fixture(scope="module")
def stateful_artifacts(stateful_files):
    """(name, target) → (artifact directory, the convert report), each converted once."""
    root, models = stateful_files
    built = {}
    for name in MODELS:
        for target in TARGETS:
            out = root / f"{name}-{target}"
            res = run_cli("convert", models[name], "-o", out, "--target", target, "--validation",
                          root / "stream.npz", "-q", "--json")
            built[name, target] = (out, res)
    return built


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_stateful_model_runs_as_a_stream_on_every_target(stateful_files, stateful_artifacts, name, target):
    _, models = stateful_files
    _, state_shapes, pairs = MODELS[name]
    out, res = stateful_artifacts[name, target]
    assert res.code == 0, res.err
    report = res.json()
    assert report["status"] == "ok"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["state"] == [{"input": i, "output": o} for i, o in pairs]
    axes = {s["name"]: s["batch_axis"] for s in manifest["inputs"] + manifest["outputs"]}
    for i, o in pairs:
        assert axes[i] == axes[o] == 1
    assert axes["x"] == 0
    # Parity in the report is the stream's: over all steps, each model carrying its own state.
    assert report["parity"]["max_abs_err"] <= 1e-4
    xs = _stream()
    expected = _ort_step_by_step(models[name], xs, state_shapes, pairs)
    got = _artifact_step_by_step(out, xs, pairs)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
    # The state matters: without it the outputs differ (else this test could not tell).
    stateless = _ort_step_by_step(models[name], xs, state_shapes, pairs, carry=False)
    assert np.abs(stateless - expected).max() > 1e-2
    # The golden vectors feed each step the state the original carried to it, samples along axis 0.
    with np.load(out / "golden.npz") as golden:
        k = manifest["golden"]["count"]
        h, hn = pairs[0]
        assert golden[f"input:{h}"].shape[0] == k
        np.testing.assert_allclose(golden[f"input:{h}"][1:], golden[f"output:{hn}"][:-1], atol=1e-4)
        assert np.abs(golden[f"input:{h}"][1:]).max() > 0
    result = check_artifact(out)
    assert result.ok, result.reason


def test_dynamic_batch_along_axis_1_batches_streams(stateful_files, tmp_path):
    """A dynamic-batch LSTM artifact takes several streams in one call: h and c stacked along axis 1;
    the self-test runs the golden vectors one by one and as one batch, which must agree."""
    _, models = stateful_files
    out = tmp_path / "art"
    assert run_cli("convert", models["lstm"], "-o", out, "--target", "onnx", "-q").code == 0
    rt = open_runtime(out)
    assert rt.fixed_batch is None and [s.batch_axis for s in rt.inputs] == [0, 1, 1]
    xs, hs = _stream(3), np.random.default_rng(1).standard_normal((3, 1, 6)).astype(np.float32)
    cs = np.zeros_like(hs)
    together = rt.run_float({"x": xs, "h": np.moveaxis(hs, 0, 1), "c": np.moveaxis(cs, 0, 1)})
    for i in range(3):
        one = rt.run_float({"x": xs[i:i + 1], "h": hs[i][:, None], "c": cs[i][:, None]})
        np.testing.assert_allclose(together["y"][i], one["y"][0], atol=1e-5)
        np.testing.assert_allclose(together["hn"][:, i], one["hn"][:, 0], atol=1e-5)
    assert check_artifact(out).ok
    res = run_cli("bench", out, "--batch", "1,3", "--rounds", "1", "--min-round-time", "0.01", "--json")
    assert res.code == 0, res.err
    assert [r["batch"] for r in res.json()["results"]] == [1, 3]


def test_int8_stateful_model_calibrates_along_the_stream(stateful_files, tmp_path):
    root, models = stateful_files
    out = tmp_path / "art"
    res = run_cli("convert", models["gru"], "-o", out, "--target", "onnx", "--quantize", "int8",
                  "--calibration", root / "stream.npz", "-q", "--json")
    assert res.code == 0, res.err
    assert res.json()["parity"]["cosine"] >= 0.99
    assert check_artifact(out).ok


def test_a_data_file_holding_the_state_is_refused(stateful_files, tmp_path):
    root, models = stateful_files
    data = tmp_path / "with_state.npz"
    np.savez(data, x=_stream(), h=np.zeros((STEPS, 1, 6), np.float32))
    res = run_cli("convert", models["lstm"], "-o", tmp_path / "art", "--target", "onnx", "--validation", data)
    assert res.code == 2
    assert res.err.strip().splitlines()[-1] == (
        f"edgeopt: error: {data}: array 'h' is the model's recurrent state, which each sample takes from the one "
        f"before (zeros at the start): leave it out; samples are steps of one stream")
    assert not (tmp_path / "art").exists()


def test_state_flag_pairs_what_names_do_not_tell(tmp_path):
    """chain() has no state; --state on a model whose input and output shapes differ is refused, and
    --batch-axis on an unknown tensor names the ones there are."""
    model = save(chain([4, 3]), tmp_path / "m.onnx")
    res = run_cli("convert", model, "-o", tmp_path / "a", "--target", "onnx", "--state", "x=y")
    assert res.code == 2 and "--state x=y: input 'x'" in res.err and "differ in shape or type" in res.err
    res = run_cli("convert", model, "-o", tmp_path / "a", "--target", "onnx", "--batch-axis", "z:1")
    assert res.code == 2 and "--batch-axis: the model has no input or output 'z'" in res.err
    res = run_cli("convert", model, "-o", tmp_path / "a", "--target", "onnx", "--batch-axis", "x")
    assert res.code == 2 and "expected NAME:AXIS" in res.err
    assert not (tmp_path / "a").exists()


# -- in the agent --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_agent_carries_each_sources_state(stateful_files, stateful_artifacts, tmp_path, name, target):
    """The real agent, two sources batched together: every window's output equals ONNX Runtime running
    the original model over that source's windows one by one with the state carried."""
    _, models = stateful_files
    _, state_shapes, pairs = MODELS[name]
    artifact, res = stateful_artifacts[name, target]
    assert res.code == 0, res.err
    StateDir(tmp_path / "state").install(artifact)
    streams = {"a": _stream(30, seed=1), "b": _stream(23, seed=2)}  # windows [T=4, C=3], hop = window
    sources = []
    for src, windows in streams.items():
        np.save(tmp_path / f"{src}.npy", windows.reshape(-1, 3))
        sources.append({"type": "npy", "name": src, "path": str(tmp_path / f"{src}.npy"), "replay": "fast"})
    cfg = base_config(tmp_path, source=sources, sink=[{"type": "jsonl", "path": str(tmp_path / "out.jsonl")}],
                      agent={"exit_when_sources_end": True}, batching={"overflow": "block", "max_batch": 8})
    agent = AgentProcess(tmp_path, cfg)
    assert agent.communicate(timeout=60) == 0, agent.err
    assert agent.status()["telemetry"]["state_resets"] == 0  # no window dropped: no source's state reset
    results = results_from_jsonl(tmp_path / "out.jsonl")
    for src, windows in streams.items():
        mine = sorted((r for r in results if r["source"] == src), key=lambda r: r["seq"])
        assert [r["seq"] for r in mine] == list(range(len(windows)))
        assert all(set(r["outputs"]) == {"y"} for r in mine)  # the state stays inside the agent
        got = np.array([r["outputs"]["y"] for r in mine])
        expected = _ort_step_by_step(models[name], windows, state_shapes, pairs)
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_a_gap_in_a_sources_windows_resets_its_state(stateful_files, stateful_artifacts):
    _, models = stateful_files
    _, state_shapes, pairs = MODELS["lstm"]
    model = load_model(stateful_artifacts["lstm", "onnx"][0], None)
    xs = _stream(6)

    def block(seqs):
        seqs = np.array(seqs)
        return WindowBlock("a", seqs, seqs * 1.0, seqs + 0.5, xs[seqs])

    first, _ = model.infer(WindowBatch([block([0, 1, 2])]))
    after_gap, _ = model.infer(WindowBatch([block([4, 5])]))  # window 3 was dropped
    assert model.state_resets == 1
    expected = _ort_step_by_step(models["lstm"], xs[[0, 1, 2]], state_shapes, pairs)
    np.testing.assert_allclose(first["y"], expected, atol=1e-5)
    np.testing.assert_allclose(after_gap["y"], _ort_step_by_step(models["lstm"], xs[[4, 5]], state_shapes, pairs),
                               atol=1e-5)


def test_install_model_takes_a_stateful_sensor_model(stateful_artifacts, tmp_path):
    res = run_cli("agent", "install-model", stateful_artifacts["gru", "tflite"][0], "--state-dir", tmp_path / "s")
    assert res.code == 0, res.err
