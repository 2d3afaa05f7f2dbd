from __future__ import annotations

import numpy as np
import pytest

from edgeopt.converters.fit import fit_check, peak_activation_elements
from edgeopt.converters.validate import Parity, accuracy, parity
from edgeopt.errors import UserInputError
from edgeopt.profiles import load_profile, parse_size
from edgeopt.runtime import from_model_dtype, run_batched, to_model_dtype
from edgeopt.runtime.onnxruntime import OnnxRuntime
from edgeopt.specs import TensorSpec

from onnx_models import chain, save


def test_parity_metrics():
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    got = ref + np.array([[0.1, 0, 0], [0, 0, -0.3]])
    p = parity([ref], [got], ["y"])
    assert p["max_abs_err"] == pytest.approx(0.3) and p["mean_abs_err"] == pytest.approx(0.4 / 6)
    assert p["top1_agreement"] == 1.0 and 0.99 < p["cosine"] < 1.0 and p["finite"]
    flipped = parity([ref], [ref[:, ::-1]], ["y"])
    assert flipped["top1_agreement"] == 0.0
    assert parity([ref], [ref * np.nan], ["y"])["finite"] is False


@pytest.mark.parametrize("shape", [(37, 10), (9, 3, 20, 20)])
def test_parity_is_the_same_in_chunks_as_at_once(monkeypatch, shape):
    """Parity accumulates over chunks of samples (bounded memory); the numbers equal one pass over all
    samples, with non-finite samples left out the same way."""
    import edgeopt.converters.validate as validate

    rng = np.random.default_rng(3)
    ref = rng.standard_normal(shape).astype(np.float32)
    got = ref + rng.normal(0, 0.05, shape).astype(np.float32)
    got[4] = np.nan
    whole = parity([ref], [got], ["y"])
    monkeypatch.setattr(validate, "PARITY_CHUNK_ELEMENTS", 25)  # a few samples per chunk
    chunked = parity([ref], [got], ["y"])
    r, g = (a.reshape(len(a), -1).astype(np.float64)[np.arange(len(a)) != 4] for a in (ref, got))
    assert whole["nonfinite_samples"] == chunked["nonfinite_samples"] == 1 and not chunked["finite"]
    assert chunked["max_abs_err"] == pytest.approx(np.abs(r - g).max())
    assert chunked["mean_abs_err"] == pytest.approx(np.abs(r - g).mean())
    assert chunked["cosine"] == pytest.approx(float(r.ravel() @ g.ravel() / np.linalg.norm(r) / np.linalg.norm(g)))
    for key in ("max_abs_err", "mean_abs_err", "cosine", "worst_sample_cosine", "top1_agreement"):
        assert chunked[key] == pytest.approx(whole[key]), key


def test_parity_fed_batch_by_batch_is_parity_at_once():
    """``Parity`` takes a validation run's outputs a batch at a time (two outputs, uneven batches)."""
    rng = np.random.default_rng(4)
    refs = [rng.standard_normal((23, 5)).astype(np.float32), rng.standard_normal((23, 2, 7)).astype(np.float32)]
    gots = [r + rng.normal(0, 0.1, r.shape).astype(np.float32) for r in refs]
    gots[1][7] = np.inf
    whole = parity(refs, gots, ["scores", "boxes"])
    acc = Parity(["scores", "boxes"])
    for start, stop in ((0, 3), (3, 4), (4, 23)):
        acc.add([r[start:stop] for r in refs], [g[start:stop] for g in gots])
    batched = acc.result()
    assert batched["outputs"].keys() == whole["outputs"].keys() and batched["nonfinite_samples"] == 1
    for key in ("max_abs_err", "mean_abs_err", "cosine", "worst_sample_cosine", "top1_agreement", "finite"):
        assert batched[key] == pytest.approx(whole[key]), key
        for name in ("scores", "boxes"):
            assert batched["outputs"][name][key] == pytest.approx(whole["outputs"][name][key]), (name, key)
    with pytest.raises(ValueError, match="output 'boxes': shape"):
        acc.add([refs[0][:1], refs[1][:1]], [gots[0][:1], gots[1][:1, :1]])


def test_accuracy_top1_and_mae():
    logits = np.eye(4)
    labels = np.array([0, 1, 2, 0])
    a = accuracy(labels, logits, logits[[0, 1, 0, 0]])
    assert a == {"metric": "top1_percent", "original": 75.0, "converted": 75.0, "drop": 0.0}
    b = accuracy(labels, logits, logits[[1, 1, 2, 3]])
    assert b["drop"] == pytest.approx(25.0)
    r = accuracy(np.array([1.0, 2.0]), np.array([[1.0], [2.0]]), np.array([[1.5], [2.0]]))
    assert r["metric"] == "mae" and r["drop"] == pytest.approx(0.25)
    assert accuracy(None, logits, logits)["metric"] is None


def test_peak_activation_liveness():
    # x[1,100] → t1[1,10] → t2[1,1000] → y[1,10]: the peak is t1 + t2 alive at the second MatMul
    assert peak_activation_elements(chain([100, 10, 1000, 10])) == 1010
    assert peak_activation_elements(chain([5, 5])) == 10


def test_fit_check_against_profile():
    pi = load_profile("raspberry-pi-4")
    assert fit_check(10, 10, pi)["ok"] is True
    bad = fit_check(10, 2 * 2**30, pi)
    assert bad["ok"] is False and "RAM budget" in bad["problems"][0]
    assert fit_check(10, 10, None)["ok"] is None


def test_parse_size():
    assert parse_size("4 GiB", "x") == 4 * 2**30 and parse_size("512MB", "x") == 512 * 10**6
    assert parse_size(100, "x") == 100
    with pytest.raises(UserInputError, match="not a size"):
        parse_size("lots", "where")


def test_profile_files_with_errors(tmp_path):
    bad = tmp_path / "b.toml"
    bad.write_text("name = 'b'\n[[")
    with pytest.raises(UserInputError, match="invalid TOML"):
        load_profile(str(bad))
    bad.write_text("name = 'b'\ndescription = 'x'\n")
    with pytest.raises(UserInputError, match="missing"):
        load_profile(str(bad))


def test_quantized_io_round_trip():
    spec = TensorSpec("x", ("batch", 4), "int8", {"scale": 0.5, "zero_point": -3})
    q = to_model_dtype(spec, np.array([[0.0, 1.0, 100.0, -100.0]], np.float32))
    assert q.dtype == np.int8 and q.tolist() == [[-3, -1, 127, -128]]
    np.testing.assert_allclose(from_model_dtype(spec, q), [[0.0, 1.0, 65.0, -62.5]])


def test_runtime_checks_feeds_and_batches(tmp_path):
    path = save(chain([4, 3]), tmp_path / "m.onnx")
    rt = OnnxRuntime(path, threads=1)
    assert rt.fixed_batch == 1
    with pytest.raises(UserInputError, match="missing input"):
        rt.run({})
    with pytest.raises(UserInputError, match=r"expects shape \[1, 4\], got \[1, 5\]"):
        rt.run({"x": np.zeros((1, 5), np.float32)})
    with pytest.raises(UserInputError, match="expects dtype float32, got int32"):
        rt.run({"x": np.zeros((1, 4), np.int32)})
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    out = run_batched(rt, {"x": x})["y"]  # five calls of batch 1
    single = np.concatenate([rt.run({"x": x[i:i + 1]})["y"] for i in range(5)])
    np.testing.assert_array_equal(out, single)


def test_runtime_rejects_unloadable_model(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(b"garbage")
    with pytest.raises(UserInputError, match="cannot load"):
        OnnxRuntime(p)
