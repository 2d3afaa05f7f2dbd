"""The device self-test (``check_artifact`` → ``check_golden``) fails closed: a tolerance that is
missing or not a finite number, golden references that are missing or non-finite, can never let a
broken model pass (``err > NaN`` is never true)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeopt.artifact import GOLDEN, MANIFEST, file_hashes
from edgeopt.golden_vectors import check_artifact

from conftest import run_cli


@pytest.fixture(scope="module")
def good(digits_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("golden") / "good"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "onnx", "-q",
                  "--validation", digits_models["validation"])
    assert res.code == 0, res.err
    return out


def _copy(good, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(good, art)
    return art


def _edit_manifest(art, **golden):
    """Set (or, with None, remove) keys of the manifest's golden section, the way a hand or an old
    converter would write them: Python's json writes NaN as the bare token NaN."""
    manifest = json.loads((art / MANIFEST).read_text())
    for key, value in golden.items():
        if value is None:
            manifest["golden"].pop(key)
        else:
            manifest["golden"][key] = value
    (art / MANIFEST).write_text(json.dumps(manifest))


def _rehash(art):
    manifest = json.loads((art / MANIFEST).read_text())
    manifest["files"] = file_hashes(art, sorted(manifest["files"]))
    (art / MANIFEST).write_text(json.dumps(manifest))


def _scramble_weights(art):
    model = onnx.load(art / "model.onnx")
    rng = np.random.default_rng(3)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.size >= 64:
            init.CopyFrom(numpy_helper.from_array(rng.permutation(w.ravel()).reshape(w.shape), init.name))
    onnx.save(model, art / "model.onnx")
    _rehash(art)


def test_the_good_artifact_passes(good):
    result = check_artifact(good)
    assert result.ok, result.reason


def test_a_broken_model_with_nan_tolerances_fails(good, tmp_path):
    """The issue's case: NaN tolerances made a scrambled model pass its self-test."""
    art = _copy(good, tmp_path)
    _scramble_weights(art)
    _edit_manifest(art, atol=float("nan"), expected_atol=float("nan"))
    result = check_artifact(art)
    assert not result.ok and "golden.expected_atol is not a finite number (nan)" in result.reason


@pytest.mark.parametrize("golden,reason", [
    ({"atol": float("nan")}, "manifest golden.atol is not a finite number (nan)"),
    ({"atol": float("inf")}, "manifest golden.atol is not a finite number (inf)"),
    ({"atol": None}, "manifest golden.atol is missing"),
    ({"expected_atol": None}, "manifest golden.expected_atol is missing"),
    ({"expected_atol": "0.1"}, "manifest golden.expected_atol is not a finite number ('0.1')"),
    ({"atol": -1.0}, "manifest golden.atol is not a finite number (-1.0)"),
])
def test_a_missing_or_non_finite_tolerance_fails_closed(good, tmp_path, golden, reason):
    art = _copy(good, tmp_path)
    _edit_manifest(art, **golden)
    result = check_artifact(art)
    assert not result.ok and result.reason.startswith(reason), result.reason


def _edit_golden(art, change):
    with np.load(art / GOLDEN) as npz:
        arrays = {k: npz[k] for k in npz.files}
    change(arrays)
    np.savez(art / GOLDEN, **arrays)
    _rehash(art)


@pytest.mark.parametrize("change,reason", [
    (lambda a: a["output:logits"].__setitem__((0, 0), np.nan), "the original outputs for 'logits' hold NaN"),
    (lambda a: a.pop("output:logits"), "golden vectors hold no outputs to compare with"),
    (lambda a: a["input:image"].__setitem__((2, 0, 0, 0), np.inf), "input 'image' sample 2 holds NaN or Inf"),
    (lambda a: a.__setitem__("output:logits", a["output:logits"][:, :5]), "have shape [8, 5], the model gives"),
])
def test_broken_golden_vectors_fail_closed(good, tmp_path, change, reason):
    art = _copy(good, tmp_path)
    _edit_golden(art, change)
    result = check_artifact(art)
    assert not result.ok and reason in result.reason, result.reason
