"""Delta updates: what ``fleet publish`` makes and a device applies. The IMU model retrained in its head
only, as .onnx and .tflite: the delta is a small share of the full artifact and rebuilds it byte for
byte; a delta is refused for another base, damage or a wrong size; publish and revoke keep deltas with
their versions; a device takes a delta over the repository transport and falls back to the full
download whenever the delta is not the way (none published, a base it was not made from, tampered)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeopt.artifact import pack_artifact, unpack_artifact
from edgeopt.delta import CODEC, CODEC_XOR, DeltaError, apply_delta, make_delta
from edgeopt.fleet.repository import Repository

from conftest import ROOT, run_cli
from memory_bus import MemoryBus
from repo_helpers import RepoPair

pytest.importorskip("zstandard", reason="delta updates need zstandard (pip install 'edgeopt[agent]')")


@pytest.fixture(scope="module")
def imu_versions(tmp_path_factory):
    """IMU v1, a head-only retrain v2 (only the last layer's weights differ) and a whole-network fine-tune
    v3, converted for onnx and tflite."""
    import onnx
    from onnx import numpy_helper

    tmp = tmp_path_factory.mktemp("imu")
    subprocess.run([sys.executable, str(ROOT / "examples" / "imu.py"), "--out", str(tmp / "imu")], check=True,
                   capture_output=True)
    model = onnx.load(tmp / "imu" / "imu_cnn.onnx")
    head = [i for i in model.graph.initializer if numpy_helper.to_array(i).ndim == 2][-1]
    weights = numpy_helper.to_array(head).copy()
    weights += np.random.default_rng(1).normal(0, 0.01, weights.shape).astype(weights.dtype)
    head.CopyFrom(numpy_helper.from_array(weights, head.name))
    onnx.save(model, tmp / "imu" / "imu_cnn_v2.onnx")
    model = onnx.load(tmp / "imu" / "imu_cnn.onnx")  # v3: a fine-tune of the whole network — every float
    rng = np.random.default_rng(2)                   # weight moved by about 0.1 % of itself
    for init in model.graph.initializer:
        weights = numpy_helper.to_array(init)
        if weights.dtype == np.float32:
            moved = weights * (1 + rng.normal(0, 1e-3, weights.shape))
            init.CopyFrom(numpy_helper.from_array(moved.astype(np.float32), init.name))
    onnx.save(model, tmp / "imu" / "imu_cnn_v3.onnx")
    out = {}
    for target in ("onnx", "tflite"):
        for version, source in (("1", "imu_cnn.onnx"), ("2", "imu_cnn_v2.onnx"), ("3", "imu_cnn_v3.onnx")):
            art = tmp / f"{target}-v{version}"
            res = run_cli("convert", tmp / "imu" / source, "-o", art, "--target", target, "--name", "imu",
                          "--version", version, "-q", "--preprocessing", tmp / "imu" / "preprocessing.json",
                          "--validation", tmp / "imu" / "validation.npz")
            assert res.code == 0, res.err
            out[target, version] = art
    return out


def _packed(art: Path, tmp: Path) -> bytes:
    pack_artifact(art, tmp / f"{art.name}.tar")
    return (tmp / f"{art.name}.tar").read_bytes()


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_a_head_only_retrain_travels_as_a_small_delta_that_rebuilds_the_artifact(imu_versions, tmp_path, target):
    base, new = _packed(imu_versions[target, "1"], tmp_path), _packed(imu_versions[target, "2"], tmp_path)
    delta = make_delta(base, new)
    assert len(delta) <= 0.1 * len(new), (len(delta), len(new))
    assert apply_delta(base, delta, len(new)) == new


def test_a_delta_is_refused_for_a_wrong_size_damage_or_garbage(imu_versions, tmp_path):
    base, new = _packed(imu_versions["onnx", "1"], tmp_path), _packed(imu_versions["onnx", "2"], tmp_path)
    delta = make_delta(base, new)
    with pytest.raises(DeltaError, match="not the"):
        apply_delta(base, delta, len(new) - 1)
    with pytest.raises(DeltaError, match="does not apply"):
        apply_delta(base, delta[:-8], len(new))
    with pytest.raises(DeltaError):
        apply_delta(base, b"not a zstd frame", len(new))
    assert apply_delta(new, delta, len(new)) != new  # another base: the sha256 check catches it (below)


@pytest.fixture
def repo_with_deltas(imu_versions, tmp_path):
    repo = Repository.init(tmp_path / "repo")
    repo.publish(imu_versions["onnx", "1"])
    entry = repo.publish(imu_versions["onnx", "2"])
    return repo, entry


def test_publish_signs_a_delta_from_the_last_versions_and_revoke_takes_it_away(repo_with_deltas, imu_versions):
    repo, entry = repo_with_deltas
    assert [d["base_version"] for d in entry["deltas"]] == ["1"] and entry["deltas"][0]["length"] < 0.1 * entry["length"]
    assert [m["version"] for m in repo.list_models()] == ["1", "2"]  # a delta is no model
    (delta,) = repo.list_deltas()
    v1 = next(m for m in repo.list_models() if m["version"] == "1")
    assert (delta["version"], delta["base_sha256"], delta["full_sha256"], delta["full_length"]) == (
        "2", v1["sha256"], entry["sha256"], entry["length"])
    repo.revoke("imu", "2")
    assert repo.list_deltas() == [] and [m["version"] for m in repo.list_models()] == ["1"]


@pytest.fixture
def device(repo_with_deltas, imu_versions, tmp_path):
    """A device whose running artifact is imu@1, over the in-process repository transport."""
    repo, _ = repo_with_deltas
    bus = MemoryBus()
    pair = RepoPair(tmp_path, None, repo, bus=bus)
    pair.trust.refresh()
    running = _packed(imu_versions["onnx", "1"], tmp_path)
    yield pair, running
    bus.close()


def test_a_device_on_the_base_downloads_the_delta_only(device, tmp_path):
    pair, running = device
    target = pair.trust.lookup("imu", "2")
    path = pair.trust.download(target, base=lambda: running)
    assert unpack_artifact(path, tmp_path / "slot").manifest["version"] == "2"
    assert pair.trust.delta_stats["applied"] == 1
    assert pair.fetcher.stats["bytes_network"] <= 0.1 * target.length  # the delta, not the artifact


@pytest.mark.parametrize("case", ["another base", "no base", "tampered delta"])
def test_the_full_download_whenever_the_delta_is_not_the_way(device, repo_with_deltas, tmp_path, case):
    pair, running = device
    repo, _ = repo_with_deltas
    base = {"another base": lambda: running[:-1] + b"x", "no base": lambda: None}.get(case, lambda: running)
    if case == "tampered delta":
        (stored,) = (repo.root / "targets").glob("*.zst")
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF
        stored.write_bytes(bytes(data))
    target = pair.trust.lookup("imu", "2")
    path = pair.trust.download(target, base=base)
    assert unpack_artifact(path, tmp_path / "slot").manifest["version"] == "2"
    assert pair.trust.delta_stats["applied"] == 0
    assert pair.fetcher.stats["bytes_network"] >= target.length
    if case == "tampered delta":
        assert pair.trust.delta_stats["refused"] == 1


def test_publish_prints_its_deltas(imu_versions, tmp_path):
    Repository.init(tmp_path / "repo")
    assert run_cli("fleet", "publish", imu_versions["tflite", "1"], "--repo", tmp_path / "repo").code == 0
    res = run_cli("fleet", "publish", imu_versions["tflite", "2"], "--repo", tmp_path / "repo")
    assert res.code == 0 and "delta from imu@1:" in res.out and "% of the full artifact" in res.out, res.out
    res = run_cli("fleet", "publish", imu_versions["tflite", "3"], "--repo", tmp_path / "repo")
    assert res.code == 0, res.err
    lines = {line.split(":")[0].strip(): line for line in res.out.splitlines() if "delta from" in line}
    assert f"tensor XOR: {CODEC_XOR}" in lines["delta from imu@1"], res.out  # the whole-network fine-tune
    assert f"tensor XOR: {CODEC_XOR}" in lines["delta from imu@2"], res.out
    Repository.init(tmp_path / "repo2")
    assert run_cli("fleet", "publish", imu_versions["onnx", "1"], "--repo", tmp_path / "repo2").code == 0
    res = run_cli("fleet", "publish", imu_versions["onnx", "2"], "--repo", tmp_path / "repo2", "--json")
    assert [d["base_version"] for d in res.json()["deltas"]] == ["1"]  # one JSON document, deltas in it


def _edited_copy(src: Path, dest: Path, version: str, start: int, length: int) -> Path:
    """``src`` with ``length`` bytes of its model replaced from ``start``, as version ``version``."""
    import json
    import shutil

    from edgeopt.artifact import GOLDEN, REPORT, file_hashes

    shutil.copytree(src, dest)
    model = bytearray((dest / "model.onnx").read_bytes())
    model[start:start + length] = np.random.default_rng(7).bytes(length)
    (dest / "model.onnx").write_bytes(bytes(model))
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["version"] = version
    manifest["files"] = file_hashes(dest, ["model.onnx", GOLDEN, REPORT])
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_an_interrupted_delta_resumes_from_disk_after_a_restart(tmp_path):
    from repo_helpers import fake_artifact

    v1 = fake_artifact(tmp_path / "v1", "kws", "1", 2**20, seed=1)
    v2 = _edited_copy(v1, tmp_path / "v2", "2", 2**19, 300_000)  # a delta of ~300 KB: several chunks
    repo = Repository.init(tmp_path / "repo")
    repo.publish(v1)
    entry = repo.publish(v2)
    (delta,) = repo.list_deltas()
    assert 300_000 <= delta["length"] < 0.5 * entry["length"]
    running = _packed(v1, tmp_path)

    class _DiesInTheDelta:  # the agent is killed after 128 KiB of the delta
        def __init__(self, link):
            self.link = link

        def request(self, path, offset, length, timeout):
            if path.endswith(".zst") and offset >= 2**17:
                raise KeyboardInterrupt("killed")
            return self.link.request(path, offset, length, timeout)

    bus = MemoryBus()
    try:
        first = RepoPair(tmp_path, None, repo, bus=bus)
        first.trust.refresh()
        first.fetcher.link = _DiesInTheDelta(first.link)
        with pytest.raises(KeyboardInterrupt):
            first.trust.download(first.trust.lookup("kws", "2"), base=lambda: running)
        second = RepoPair(tmp_path, None, repo, bus=bus)  # same device directory: a restarted agent
        second.trust.refresh()
        before = second.fetcher.stats["bytes_network"]
        target = second.trust.lookup("kws", "2")
        path = second.trust.download(target, base=lambda: running)
        assert unpack_artifact(path, tmp_path / "slot").manifest["version"] == "2"
        assert second.trust.delta_stats["applied"] == 1 and second.fetcher.stats["bytes_resumed"] == 2**17
        assert second.fetcher.stats["bytes_network"] - before == delta["length"] - 2**17  # the rest of the delta
    finally:
        bus.close()


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_a_retrained_real_cnn_travels_as_a_small_delta(tmp_path, target):
    """The PP-OCR text-direction classifier from the rapidocr wheel (a MobileNetV3-style CNN): its last
    layer retrained, as .onnx and as .tflite the delta is at most a tenth of the artifact (0.17 % /
    0.20 % measured); every weight moved ~0.1 %, the tensor XOR delta is taken and is smaller than
    the binary one (20.1 % / 19.6 % against 32.9 % / 32.3 %)."""
    import onnx
    from onnx import numpy_helper

    from edgeopt.fleet.tensor_spans import chosen_delta

    from real_models import CORPUS, Unavailable, fetch

    model = next(m for m in CORPUS if m.key == "rapidocr_cls")
    try:
        source = fetch(model)
    except Unavailable as exc:
        pytest.skip(str(exc))
    graph = onnx.load(source)
    matmul = [n for n in graph.graph.node if n.op_type == "MatMul"][-1]  # the classifier's fully connected layer
    (const,) = [n for n in graph.graph.node if n.op_type == "Constant" and matmul.input[1] in n.output]
    value = next(a for a in const.attribute if a.name == "value")  # (a Paddle export: weights are Constant nodes)
    weights = numpy_helper.to_array(value.t).copy()
    weights += np.random.default_rng(1).normal(0, 0.01, weights.shape).astype(weights.dtype)
    value.t.CopyFrom(numpy_helper.from_array(weights, value.t.name))
    onnx.save(graph, tmp_path / "retrained.onnx")
    graph, rng = onnx.load(source), np.random.default_rng(1)
    tensors = [*graph.graph.initializer, *(a.t for n in graph.graph.node if n.op_type == "Constant"
                                           for a in n.attribute if a.name == "value")]
    for t in tensors:
        w = numpy_helper.to_array(t)
        if w.dtype == np.float32 and w.size > 1:
            t.CopyFrom(numpy_helper.from_array((w * (1 + rng.normal(0, 1e-3, w.shape))).astype(np.float32), t.name))
    onnx.save(graph, tmp_path / "fine_tuned.onnx")
    packed = []
    for version, onnx_file in (("1", source), ("2", tmp_path / "retrained.onnx"), ("3", tmp_path / "fine_tuned.onnx")):
        art = tmp_path / f"v{version}"
        res = run_cli("convert", onnx_file, "-o", art, "--target", target, "--name", "cls", "--version", version,
                      "-q", *model.flags)
        assert res.code == 0, res.err
        packed.append(_packed(art, tmp_path))
    base, head, whole = packed
    delta = make_delta(base, head)
    assert len(delta) <= 0.1 * len(head), (len(delta), len(head))
    assert apply_delta(base, delta, len(head)) == head
    codec, delta = chosen_delta(base, whole)
    assert codec == CODEC_XOR and len(delta) <= 0.8 * len(make_delta(base, whole)), len(delta)
    assert apply_delta(base, delta, len(whole), codec) == whole


def test_a_ten_megabyte_base_is_within_the_deltas_reach():
    """A delta reaches back over the whole base: with zstd's level-9 table sizes a 10 MB base was mostly
    out of reach (a head-only retrain came out at 56 % of the artifact; benchmarks/update.py)."""
    rng = np.random.default_rng(3)
    base = rng.bytes(10 * 2**20)
    new = base[:2**22] + rng.bytes(100_000) + base[2**22 + 100_000:]
    delta = make_delta(base, new)
    assert len(delta) <= 0.02 * len(new), len(delta)
    assert apply_delta(base, delta, len(new)) == new


def test_a_version_unlike_its_base_is_published_without_a_delta_and_says_so(tmp_path):
    from repo_helpers import fake_artifact

    Repository.init(tmp_path / "repo")
    assert run_cli("fleet", "publish", fake_artifact(tmp_path / "v1", "kws", "1", 2**16, seed=1),
                   "--repo", tmp_path / "repo").code == 0
    res = run_cli("fleet", "publish", fake_artifact(tmp_path / "v2", "kws", "2", 2**16, seed=2),
                  "--repo", tmp_path / "repo")
    assert res.code == 0, res.err
    assert "no delta from kws@1 (" in res.out and "not worth it): devices on it take the full artifact" in res.out
    assert Repository(tmp_path / "repo").list_deltas() == []


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_a_whole_network_fine_tune_travels_as_a_tensor_xor_delta(imu_versions, tmp_path, target):
    """Every weight moved a little: no byte run matches the base, so patch-from carries nearly all of
    the model; XOR with the base's tensors leaves the sign and exponent bytes zero. Measured on this
    model: 0.285 of the artifact against patch-from's 0.457 as .onnx, 0.292 against 0.459 as .tflite."""
    from edgeopt.fleet.tensor_spans import chosen_delta

    base, new = _packed(imu_versions[target, "1"], tmp_path), _packed(imu_versions[target, "3"], tmp_path)
    plain = make_delta(base, new)
    codec, delta = chosen_delta(base, new)
    assert codec == CODEC_XOR and len(delta) <= 0.8 * len(plain), (len(delta), len(plain))
    assert apply_delta(base, delta, len(new), codec) == new
    with pytest.raises(DeltaError):  # the XOR kind read as the other: refused, never a wrong artifact
        apply_delta(base, delta, len(new), CODEC)
    # a head-only retrain: the two kinds are about the same size, and the binary one is cheaper to apply
    head = _packed(imu_versions[target, "2"], tmp_path)
    codec, delta = chosen_delta(base, head)
    assert codec == CODEC and apply_delta(base, delta, len(head), codec) == head


def test_tensor_spans_are_where_the_formats_own_readers_find_the_weights(imu_versions):
    import onnx

    from edgeopt.converters.targets.tflite.flatbuffer import buffer_span, schema
    from edgeopt.fleet.tensor_spans import onnx_spans, tflite_spans

    data = (imu_versions["onnx", "1"] / "model.onnx").read_bytes()
    spans = onnx_spans(data)
    inits = [i for i in onnx.load_from_string(data).graph.initializer if i.raw_data]
    assert inits and all(data[spans[i.name][0]:spans[i.name][0] + spans[i.name][1]] == i.raw_data for i in inits)
    assert all(spans[i.name][2] == 4 for i in inits if i.data_type == onnx.TensorProto.FLOAT)
    # float_data (packed, not raw_data: what some exporters write, the rapidocr classifier among them),
    # in a Constant node of an If branch
    values = np.arange(6, dtype=np.float32) / 7
    const = onnx.helper.make_node("Constant", [], ["c"], value=onnx.helper.make_tensor("", 1, [6], values.tolist()))
    branch = onnx.helper.make_graph([const], "then", [], [onnx.helper.make_tensor_value_info("c", 1, [6])])
    node = onnx.helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("cond", 9, [])],
                                   [onnx.helper.make_tensor_value_info("y", 1, [6])])
    data = onnx.helper.make_model(graph).SerializeToString()
    found = list(onnx_spans(data).values())  # one in each branch
    assert len(found) == 2 and all((data[s:s + n], w) == (values.tobytes(), 4) for s, n, w in found)
    (tflite,) = imu_versions["tflite", "1"].glob("*.tflite")
    data = tflite.read_bytes()
    spans = tflite_spans(data)
    sub = schema().Model.GetRootAs(data, 0).Subgraphs(0)
    found = {f"0/{sub.Tensors(i).Name().decode()}": buffer_span(data, sub.Tensors(i).Buffer())
             for i in range(sub.TensorsLength()) if buffer_span(data, sub.Tensors(i).Buffer())[1]}
    assert found and all(spans[k][:2] == v for k, v in found.items()), (found, spans)


def test_tensor_spans_of_files_that_are_not_models_are_none(tmp_path):
    from edgeopt.fleet.tensor_spans import tensor_spans

    from repo_helpers import fake_artifact

    art = fake_artifact(tmp_path / "v1", "kws", "1", 4096, seed=1)  # model.onnx: random bytes
    (art / "model.tflite").write_bytes(b"\\0\\0\\0\\0TFL3" + bytes(range(256)) * 4)
    assert tensor_spans(_packed(art, tmp_path)) == {}


def test_an_xor_delta_with_a_damaged_header_or_unknown_codec_is_refused(imu_versions, tmp_path):
    import struct

    from edgeopt.fleet.tensor_spans import chosen_delta

    base, new = _packed(imu_versions["onnx", "1"], tmp_path), _packed(imu_versions["onnx", "3"], tmp_path)
    codec, delta = chosen_delta(base, new)
    assert codec == CODEC_XOR
    beyond = bytearray(delta)
    struct.pack_into("<Q", beyond, 9 + 8, len(base))  # the first region's base offset past the base's end
    too_many = bytearray(delta)
    struct.pack_into("<I", too_many, 5, 2**31)
    for bad, why in ((bytes(beyond), "outside"), (bytes(too_many), "too many"), (delta[:12], "cut short"),
                     (b"EOXD", "no XOR delta header")):
        with pytest.raises(DeltaError, match=why):
            apply_delta(base, bad, len(new), codec)
    with pytest.raises(DeltaError, match="unknown delta codec"):
        apply_delta(base, delta, len(new), "bsdiff9")


def test_a_device_applies_a_tensor_xor_delta(imu_versions, tmp_path):
    repo = Repository.init(tmp_path / "repo")
    repo.publish(imu_versions["onnx", "1"])
    entry = repo.publish(imu_versions["onnx", "3"])
    assert [d["codec"] for d in entry["deltas"]] == [CODEC_XOR]
    bus = MemoryBus()
    try:
        pair = RepoPair(tmp_path, None, repo, bus=bus)
        pair.trust.refresh()
        running = _packed(imu_versions["onnx", "1"], tmp_path)
        target = pair.trust.lookup("imu", "3")
        path = pair.trust.download(target, base=lambda: running)
        assert path.read_bytes() == _packed(imu_versions["onnx", "3"], tmp_path)
        assert pair.trust.delta_stats["applied"] == 1
        assert pair.trust.delta_stats["bytes"] == entry["deltas"][0]["length"] < 0.5 * target.length
        assert pair.fetcher.stats["bytes_network"] < 0.5 * target.length  # the delta, and no artifact
    finally:
        bus.close()


def test_spans_that_overlap_leave_the_binary_delta(imu_versions, tmp_path, monkeypatch):
    from edgeopt.fleet import tensor_spans as ts

    base, new = _packed(imu_versions["onnx", "1"], tmp_path), _packed(imu_versions["onnx", "3"], tmp_path)
    real = ts.tensor_spans

    def overlapping(archive):
        spans = real(archive)
        (key, (start, length, width)), *_ = spans.items()
        return spans | {("model.onnx", "copy"): (start + 1, length, width)}  # a reader gone wrong

    monkeypatch.setattr(ts, "tensor_spans", overlapping)
    codec, delta = ts.chosen_delta(base, new)
    assert codec == CODEC and apply_delta(base, delta, len(new)) == new
