"""`edgeopt convert --target coreml` on the digits CNN (trained), a MobileNet-style CNN and an LSTM
sensor model, in fp32, fp16, int8, int4 and 6-bit palettized variants.

The variants are built for iOS 18 (INT4 needs it), so each is compared with the fp16 package of
the same deployment target: at iOS 16 Core ML's lstm op runs in float32 only, and the "fp16" LSTM
package would keep float32 weights. The digits CNN is also converted with the iOS 16 / 17
encodings (affine INT8, packed lookup tables, sparse masks) and through the iphone-15 profile.

Everything is checked from the files the command wrote: the saved .mlpackage is reloaded with
coremltools, every compressed weight is decompressed from it and compared with the same weight in
the saved fp16 package, and the numbers the package computes are compared with ONNX Runtime on the
source model through tests/mil_reference.py (Core ML itself only runs on macOS: see
test_coreml_runtime_parity_on_macos).
"""

from __future__ import annotations

import json
import shutil
import struct
import sys

import arch_models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mil_reference import run_package

from conftest import run_cli

pytestmark = pytest.mark.slow

IOS18 = ["--minimum-deployment-target", "iOS18"]
VARIANTS = {
    "fp32": ["--compute-precision", "fp32", *IOS18],
    "fp16": IOS18,
    "int8": ["--quantize", "int8", *IOS18],
    "int4": ["--quantize", "int4", *IOS18],
    "palettize6": ["--palettize", "6", *IOS18],
}
# iOS 16 / 17 encodings, on the digits CNN only
OLDER_OS_VARIANTS = {
    "int8-iphone15": ["--profile", "iphone-15"],           # the profile's recipe: int8, iOS17
    "palettize6-ios16": ["--palettize", "6"],               # the default deployment target, iOS16
    "sparse-ios16": ["--prune-sparsity", "0.5"],            # the pruning pass, then Core ML sparse weights
}
MAX_SIZE_RATIO = {"int8": 0.55, "int4": 0.35, "palettize6": 0.45}  # of the fp16 package
CONSTEXPR_OP = {"int8": "constexpr_blockwise_shift_scale", "int4": "constexpr_blockwise_shift_scale",
                "palettize6": "constexpr_lut_to_dense", "int8-iphone15": "constexpr_affine_dequantize",
                "palettize6-ios16": "constexpr_lut_to_dense", "sparse-ios16": "constexpr_sparse_to_dense"}


@pytest.fixture(scope="module")
def source_models(digits_models, tmp_path_factory):
    """name → (onnx path, validation .npz, input name)."""
    root = tmp_path_factory.mktemp("coreml-src")
    mobilenet = arch_models.export(arch_models.mobilenet_style(), root / "mobilenet.onnx",
                                   arch_models.sample((2, 3, 32, 32)))
    np.savez(root / "mobilenet_val.npz", x=arch_models.sample((24, 3, 32, 32), seed=1))
    lstm = arch_models.export(arch_models.lstm_sensor(), root / "lstm.onnx", arch_models.sample((2, 50, 6)))
    np.savez(root / "lstm_val.npz", x=arch_models.sample((24, 50, 6), seed=1))
    return {"digits-cnn": (digits_models["cnn"], digits_models["validation"], "image"),
            "mobilenet": (mobilenet, root / "mobilenet_val.npz", "x"),
            "lstm": (lstm, root / "lstm_val.npz", "x")}


@pytest.fixture(scope="module")
def converted(source_models, tmp_path_factory):
    """(model, variant) → artifact directory, every variant converted once through the CLI."""
    root = tmp_path_factory.mktemp("coreml-out")
    out = {}
    jobs = [(m, v, f) for m in source_models for v, f in VARIANTS.items()]
    jobs += [("digits-cnn", v, f) for v, f in OLDER_OS_VARIANTS.items()]
    for model, variant, flags in jobs:
        path, validation, _ = source_models[model]
        dest = root / f"{model}-{variant}"
        target = [] if "--profile" in flags else ["--target", "coreml"]
        res = run_cli("convert", path, "-o", dest, *target, "--validation", validation, "-q", *flags)
        assert res.code == 0, (model, variant, res.err)
        out[(model, variant)] = dest
    return out


def _ct():
    from edgeopt.runtime.coreml import import_coremltools

    return import_coremltools()


def _saved_program(artifact):
    from edgeopt.converters.targets.coreml.verify import load_saved_program

    return load_saved_program(artifact / "model.mlpackage")


CASES = [(m, v) for m in ("digits-cnn", "mobilenet", "lstm") for v in VARIANTS]


@pytest.mark.parametrize("model,variant", CASES)
def test_package_reloads_and_matches_its_manifest(converted, source_models, model, variant):
    artifact = converted[(model, variant)]
    manifest = json.loads((artifact / "manifest.json").read_text())
    report = json.loads((artifact / "report.json").read_text())
    assert manifest["model"] == {"file": "model.mlpackage", "format": "coreml", "runtime": "coreml",
                                 "quantize": {"int8": "int8", "int4": "int4"}.get(variant, "none"),
                                 "io_transposes": {}}  # Core ML keeps the ONNX layout
    assert report["status"] == "ok" and report["artifact"]["format"] == "coreml"

    spec = _ct().utils.load_spec(str(artifact / "model.mlpackage"))
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.specificationVersion == 9  # iOS18
    src = onnx.load(str(source_models[model][0]))
    feature_shapes = {f.name: list(f.type.multiArrayType.shape) for f in spec.description.input}
    feature_shapes.update({f.name: list(f.type.multiArrayType.shape) for f in spec.description.output})
    for kind, onnx_io in (("inputs", src.graph.input), ("outputs", src.graph.output)):
        listed = manifest[kind]
        assert [t["name"] for t in listed] == [vi.name for vi in onnx_io]
        for entry, vi in zip(listed, onnx_io, strict=True):
            onnx_dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            assert entry["shape"] == [1, *onnx_dims[1:]]  # the dynamic batch is fixed to 1
            assert entry["dtype"] == "float32"
            assert feature_shapes[entry["name"]] == entry["shape"]

    # fp32 keeps every tensor in float32; the others compute in float16
    from coremltools.converters.mil.mil import types

    _, program = _saved_program(artifact)
    dtypes = {types.builtin_to_string(v.dtype) for op in program.functions["main"].operations for v in op.outputs
              if op.op_type not in ("const",) and not op.op_type.startswith("constexpr")}
    has_fp16 = "fp16" in dtypes
    assert has_fp16 == (variant != "fp32"), dtypes


@pytest.mark.parametrize("model,variant", CASES)
def test_package_computes_what_the_onnx_model_computes(converted, source_models, model, variant):
    """The saved program, evaluated op by op (tests/mil_reference.py), against ONNX Runtime."""
    path, validation, name = source_models[model]
    x = np.load(validation)[name][:4 if model == "mobilenet" else 8]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {name: x})[0]
    got = np.concatenate([next(iter(run_package(converted[(model, variant)] / "model.mlpackage",
                                                {name: x[i:i + 1]}).values())) for i in range(len(x))])
    scale = float(np.abs(ref).max())
    err = float(np.abs(ref - got).max())
    tolerance = {"fp32": 1e-4, "fp16": 2e-2, "int8": 5e-2, "palettize6": 1e-1, "int4": 3e-1}[variant]
    assert err <= tolerance * max(scale, 1e-3), (err, scale)
    cosine = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cosine >= {"fp32": 0.999999, "fp16": 0.9999, "int8": 0.999, "palettize6": 0.995, "int4": 0.97}[variant]


def test_compressed_digits_cnn_still_classifies(converted, source_models, digits_split):
    """Held-out digits: every variant's package, evaluated from the saved file, agrees with the
    original on nearly every image."""
    path, _, name = source_models["digits-cnn"]
    x = digits_split.x_val[:48]
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {name: x})[0].argmax(1)
    for variant in [*VARIANTS, *OLDER_OS_VARIANTS]:
        package = converted[("digits-cnn", variant)] / "model.mlpackage"
        got = np.array([next(iter(run_package(package, {name: x[i:i + 1]}).values())).argmax() for i in range(len(x))])
        assert (got == ref).mean() >= 0.95, variant


def _size(artifact) -> int:
    from edgeopt.fsutil import tree_size

    return tree_size(artifact / "model.mlpackage")


@pytest.mark.parametrize("variant", sorted(MAX_SIZE_RATIO))
@pytest.mark.parametrize("model", ["mobilenet", "lstm", "digits-cnn"])
def test_compressed_package_size_against_fp16(converted, model, variant):
    ratio = _size(converted[(model, variant)]) / _size(converted[(model, "fp16")])
    assert ratio <= MAX_SIZE_RATIO[variant], f"{model} {variant}: {ratio:.3f}x the fp16 package"


def _compressed_ops(artifact):
    _, program = _saved_program(artifact)
    return [op for op in program.functions["main"].operations if op.op_type.startswith("constexpr_")]


def _fp32_reference(fp32_program):
    """The fp32 package's weights by (consuming op, input). coremltools' float16 pass renames each op
    it converts "<name>_cast_fp16"; the fp32 package keeps the plain names, so list both."""
    from edgeopt.converters.targets.coreml.compression import weights_by_consumer

    reference = weights_by_consumer(fp32_program)
    reference.update({(f"{op}_cast_fp16", param): w for (op, param), w in list(reference.items())})
    return reference


WEIGHT_CASES = [(m, v) for m in ("digits-cnn", "mobilenet", "lstm") for v in sorted(MAX_SIZE_RATIO)]
WEIGHT_CASES += [("digits-cnn", v) for v in OLDER_OS_VARIANTS]


@pytest.mark.parametrize("model,variant", WEIGHT_CASES)
def test_every_compressed_weight_matches_the_weight_it_replaces(converted, model, variant):
    """Decompress each weight from the saved compressed package (edgeopt's numpy formulas, checked
    against coremltools' own decompression) and compare it with the same weight in the saved fp32
    package, within its quantization error (plus float16 rounding)."""
    from edgeopt.converters.targets.coreml.compression import weights_by_consumer
    from edgeopt.converters.targets.coreml.verify import check_compressed_weights, decompress

    artifact = converted[(model, variant)]
    ops = _compressed_ops(artifact)
    assert ops and {op.op_type for op in ops} == {CONSTEXPR_OP[variant]}
    _, fp32_program = _saved_program(converted[(model, "fp32")])
    reference = _fp32_reference(fp32_program)
    _, program = _saved_program(artifact)
    records = check_compressed_weights(program, reference)  # raises on any weight outside its bound
    assert len(records) == len(ops) and all(r["ok"] and r["max_err_over_bound"] <= 1.0 for r in records)

    # Every weight of at least 512 elements that feeds a conv / linear / lstm got compressed
    # (INT4 skips only tensors whose input axis no block of >= 4 divides, e.g. depthwise kernels).
    compressed = set()
    for used_by in (u for r in records for u in r["used_by"]):
        op, param = used_by.rsplit(".", 1)
        compressed.add(f"{op.removesuffix('_cast_fp16')}.{param}")
    big = {(op, param) for (op, param), w in weights_by_consumer(fp32_program).items() if w.size >= 512 and w.ndim >= 2}
    missed = {f"{op}.{param}" for op, param in big} - compressed
    if variant == "int4":
        missed = {m for m in missed if reference[tuple(m.rsplit(".", 1))].shape[1] >= 4}
    if variant != "sparse-ios16":  # sparse storage is only for the tensors pruning left mostly zeros (below)
        assert not missed, missed
    else:
        # the zeros are the pruning pass's, to the weight: every layer it left >= 25% zeros is stored sparse
        report = json.loads((artifact / "report.json").read_text())
        pruned = sorted(round(layer["sparsity"], 4) for layer in report["pass_details"]["prune-unstructured"]["layers"]
                        .values() if layer["sparsity"] >= 0.25)
        assert pruned and sorted(r["sparsity"] for r in records) == pruned

    # coremltools' decompression of the same saved file agrees with edgeopt's
    ct_dense = _ct().optimize.coreml.decompress_weights(
        _ct().models.MLModel(str(artifact / "model.mlpackage"), skip_model_load=True))
    ct_consts = {op.name: op.outputs[0].val for op in ct_dense._mil_program.functions["main"].operations
                 if op.op_type == "const"}
    for op in ops:
        values = {k: v.val for k, v in op.inputs.items()}
        mine, _ = decompress(op.op_type, values)
        theirs = ct_consts.get(op.name)
        assert theirs is not None, op.name
        np.testing.assert_allclose(mine, np.asarray(theirs, np.float64), rtol=1e-3, atol=1e-6)


def test_int8_weight_reproduces_the_onnx_initializer(converted, source_models):
    """Tie the check to the source file: the digits CNN's first fully connected layer, decompressed
    from the int8 package, is the ONNX initializer within half a quantization step (+ fp16)."""
    from edgeopt.converters.targets.coreml.verify import decompress

    src = onnx.load(str(source_models["digits-cnn"][0]))
    gemm = next(n for n in src.graph.node if n.op_type == "Gemm")
    init = {i.name: onnx.numpy_helper.to_array(i) for i in src.graph.initializer}[gemm.input[1]]
    trans_b = {a.name: a.i for a in gemm.attribute}.get("transB", 0)
    weight = init if trans_b else init.T  # Core ML linear: [out, in]
    op = next(op for op in _compressed_ops(converted[("digits-cnn", "int8-iphone15")])
              if op.outputs[0].shape == weight.shape)
    values = {k: v.val for k, v in op.inputs.items()}
    dense, encoding = decompress(op.op_type, values)
    assert encoding == "int8 affine, axis 0"
    step = np.abs(np.asarray(values["scale"], np.float64)).reshape(-1, 1)
    levels = np.abs(np.asarray(values["quantized_data"], np.float64) - np.asarray(values["zero_point"]).reshape(-1, 1))
    # half a step, + the float16 rounding of the stored scale at this level (near-dead rows have
    # subnormal float16 scales), + the float16 rounding of the weight itself
    scale_rounding = levels * np.spacing(step.astype(np.float16)).astype(np.float64)
    assert np.all(np.abs(dense - weight) <= 0.5 * step + scale_rounding + 2**-10 * np.abs(weight) + 2**-24)
    assert np.abs(dense - weight).max() > 0  # it really is quantized


def test_report_lists_the_structural_verification(converted):
    report = json.loads((converted[("mobilenet", "int4")] / "report.json").read_text())
    details = report["pass_details"]["coreml"]
    assert details["minimum_deployment_target"] == "iOS18"
    assert details["compression"]["scheme"] == "int4" and details["compression"]["block_size"] == 32
    verification = details["verification"]
    assert verification["compressed_weights_checked"] == len(_compressed_ops(converted[("mobilenet", "int4")]))
    assert verification["compressed_weights_ok"] is True
    # Core ML cannot run here: nothing is claimed that was not measured
    if sys.platform != "darwin":
        assert report["parity"]["max_abs_err"] is None and report["latency"]["p50_ms"] is None
        assert report["accuracy"]["converted"] is None
        assert any("Core ML prediction needs macOS" in n for n in report["notes"])
        manifest = json.loads((converted[("mobilenet", "int4")] / "manifest.json").read_text())
        assert manifest["golden"]["atol"] is None and manifest["golden"]["count"] == 8


def test_artifact_hashes_and_golden_vectors(converted, source_models):
    from edgeopt.artifact import open_artifact

    artifact = open_artifact(converted[("lstm", "int8")])
    artifact.verify()
    assert any(name.startswith("model.mlpackage/") and name.endswith("weight.bin") for name in artifact.manifest["files"])
    inputs, outputs = artifact.golden()
    path, _, name = source_models["lstm"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(outputs["y"], sess.run(None, {name: inputs[name]})[0], rtol=1e-5, atol=1e-6)


def test_batch_size_fixes_the_dynamic_batch(digits_models, tmp_path):
    out = tmp_path / "b4"
    res = run_cli("convert", digits_models["cnn"], "-o", out, "--target", "coreml", "--batch-size", "4",
                  "--compute-precision", "fp32", "-q")
    assert res.code == 0, res.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [4, 1, 8, 8] and manifest["outputs"][0]["shape"] == [4, 10]
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    want = ort.InferenceSession(str(digits_models["cnn"]), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    np.testing.assert_allclose(run_package(out / "model.mlpackage", {"image": x})["logits"], want, atol=1e-4)


def _blob_data_offset(package, op_name: str, attribute: str) -> tuple[int, int]:
    """(offset, size) of an op attribute's data inside weight.bin: each blob starts with a 64-byte
    header (sentinel, type, size in bytes, data offset)."""
    spec = _ct().utils.load_spec(str(package))
    block = next(iter(spec.mlProgram.functions["main"].block_specializations.values()))
    op = next(o for o in block.operations if o.outputs and o.outputs[0].name == op_name)
    header = op.attributes[attribute].blobFileValue.offset
    raw = (package / "Data/com.apple.CoreML/weights/weight.bin").read_bytes()[header:header + 24]
    _sentinel, _dtype, size, offset = struct.unpack("<IIQQ", raw)
    return offset, size


def test_a_corrupted_compressed_weight_is_caught(converted, tmp_path):
    """Flip bytes of one quantized tensor in the saved weight file: verification names the tensor."""
    from edgeopt.converters.targets.coreml.verify import PackageVerificationError, check_compressed_weights

    package = tmp_path / "model.mlpackage"
    shutil.copytree(converted[("digits-cnn", "int8-iphone15")] / "model.mlpackage", package)
    target = max(_compressed_ops(converted[("digits-cnn", "int8-iphone15")]),
                 key=lambda op: np.prod(op.outputs[0].shape))
    offset, size = _blob_data_offset(package, target.name, "quantized_data")  # iOS 17: stored on the op itself
    weights = package / "Data/com.apple.CoreML/weights/weight.bin"
    blob = bytearray(weights.read_bytes())
    blob[offset:offset + min(size, 64)] = bytes((b + 60) % 256 for b in blob[offset:offset + min(size, 64)])
    weights.write_bytes(bytes(blob))

    from edgeopt.converters.targets.coreml.verify import load_saved_program

    _, fp32_program = _saved_program(converted[("digits-cnn", "fp32")])
    _, program = load_saved_program(package)
    reference = _fp32_reference(fp32_program)
    check_compressed_weights(load_saved_program(converted[("digits-cnn", "int8-iphone15")] / "model.mlpackage")[1],
                             reference)  # the untouched copy passes
    with pytest.raises(PackageVerificationError, match=f"'{target.name}' does not reproduce its source"):
        check_compressed_weights(program, reference)


def test_coreml_runtime_parity_on_macos(converted, source_models):
    """Core ML itself runs the package: golden vectors and parity against ONNX Runtime (macOS only)."""
    if sys.platform != "darwin":
        pytest.skip("Core ML prediction requires macOS (the Core ML framework); this host cannot run the package")
    from edgeopt.artifact import open_artifact
    from edgeopt.runtime.coreml import CoreMLRuntime

    for variant in ("fp32", "fp16", "int8", "int8-iphone15"):
        artifact = open_artifact(converted[("digits-cnn", variant)])
        report = artifact.report()
        assert report["parity"]["top1_agreement"] >= 0.98 and report["latency"]["p50_ms"] > 0
        rt = CoreMLRuntime(artifact.model_file, compute_units="cpu_only")
        inputs, outputs = artifact.golden()
        for i in range(len(next(iter(inputs.values())))):
            got = rt.run_float({k: v[i:i + 1] for k, v in inputs.items()})
            for name, want in outputs.items():
                assert np.abs(got[name] - want[i:i + 1]).max() <= artifact.manifest["golden"]["atol"]


def test_keep_float_leaves_those_weights_uncompressed(converted, source_models, tmp_path):
    """--keep-float on coreml --quantize int8: the named nodes' weights stay at the compute precision
    in the saved package (no constexpr op feeds them), every other weight is still INT8, and the
    report's mixed_precision lists the nodes."""
    path, validation, _ = source_models["digits-cnn"]
    out = tmp_path / "keep"
    res = run_cli("convert", path, "-o", out, "--target", "coreml", "--quantize", "int8", *IOS18,
                  "--validation", validation, "--keep-float", "/3/Conv,/10/Gemm", "-q", "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["mixed_precision"]["kept"] == [{"node": "/3/Conv", "precision": "float16"},
                                                 {"node": "/10/Gemm", "precision": "float16"}]

    def consumers(artifact):  # the ops whose weights are stored compressed
        return {c.name.removesuffix("_cast_fp16") for op in _compressed_ops(artifact) for c in op.outputs[0].child_ops}

    everything = consumers(converted[("digits-cnn", "int8")])
    kept = consumers(out)
    assert {"_3_Conv", "_10_Gemm"} <= everything
    assert kept == everything - {"_3_Conv", "_10_Gemm"}
    assert _size(out) > _size(converted[("digits-cnn", "int8")])
    res = run_cli("convert", path, "-o", tmp_path / "bad", "--target", "coreml", "--quantize", "int8", *IOS18,
                  "--keep-float", "/no/node", "-q")
    assert res.code == 2 and "--keep-float: no node named '/no/node'" in res.err
