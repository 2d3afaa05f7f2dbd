"""Structural verification of a saved ``.mlpackage`` — what can be checked without the Core ML runtime.

1. The package loads back with coremltools and its MIL program is rebuilt from the saved protobuf
   and weight file (coremltools' milproto loader runs every op's type inference: op names, input
   types, shapes and the opset of the deployment target are all checked).
2. The specification version is the deployment target's; inputs and outputs (names, shapes,
   dtypes) are the ones the manifest will list.
3. Every compressed weight (a ``constexpr_*`` op in the saved program) is decompressed here, with
   the formulas of the Core ML specification written out in numpy rather than coremltools'
   own decompression, and compared with the uncompressed weight it replaces: within half a
   quantization step for linear quantization, the nearest lookup-table entry for palettization,
   and exact values plus magnitude order for sparse weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.converters.passes import ConversionError
from edgeopt.runtime.coreml import feature_specs, import_coremltools
from edgeopt.specs import TensorSpec

FP16_REL = 2.0**-10  # float16 keeps 11 significant bits: half a unit in the last place, with margin
FP16_TINY = 2.0**-24  # the smallest float16 subnormal: the absolute resolution near zero


class PackageVerificationError(ConversionError):
    """The saved package does not hold what was converted (names the tensor or feature at fault)."""


def load_saved_program(path: Path) -> tuple[Any, Any]:
    """(model spec, MIL program) rebuilt from the files of a saved .mlpackage."""
    ct = import_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    try:
        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
        program = load_milproto(spec, spec.specificationVersion, model.weights_dir)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PackageVerificationError(f"{path}: the saved Core ML package does not load back: {first}") from exc
    return spec, program


def verify_package(path: Path, *, spec_version: int, inputs: list[TensorSpec], outputs: list[TensorSpec],
                   reference_weights: dict[tuple[str, str], np.ndarray] | None) -> dict[str, Any]:
    spec, program = load_saved_program(path)
    if spec.WhichOneof("Type") != "mlProgram":
        raise PackageVerificationError(f"{path}: not an ML Program ({spec.WhichOneof('Type')})")
    if spec.specificationVersion != spec_version:
        raise PackageVerificationError(f"{path}: specification version {spec.specificationVersion}, "
                                       f"expected {spec_version} (the deployment target's)")
    saved_inputs, saved_outputs = feature_specs(spec)
    _compare_features("input", saved_inputs, inputs, path)
    _compare_features("output", saved_outputs, outputs, path)
    operations = list(program.functions["main"].operations)
    weights = check_compressed_weights(program, reference_weights or {}) if reference_weights is not None else []
    return {
        "specification_version": spec.specificationVersion,
        "operations": sum(op.op_type not in ("const",) and not op.op_type.startswith("constexpr") for op in operations),
        "inputs_outputs": "match the manifest",
        "compressed_weights": weights,
    }


def _compare_features(kind: str, saved: list[TensorSpec], expected: list[TensorSpec], path: Path) -> None:
    got = [(s.name, tuple(s.shape), s.dtype) for s in saved]
    want = [(s.name, tuple(s.shape), s.dtype) for s in expected]
    if got != want:
        raise PackageVerificationError(f"{path}: {kind}s {got} differ from the converted model's {want}")


# -- compressed weights ------------------------------------------------------------------------------

def check_compressed_weights(program: Any, reference: dict[tuple[str, str], np.ndarray]) -> list[dict[str, Any]]:
    """Decompress every constexpr weight and compare it with its reference; raise on a mismatch."""
    results = []
    for op in program.functions["main"].operations:
        if not op.op_type.startswith("constexpr_"):
            continue
        values = {k: (v.val if not isinstance(v, (list, tuple)) else None) for k, v in op.inputs.items()}
        dense, encoding = decompress(op.op_type, values)
        consumers = [(child.name, param) for child in op.outputs[0].child_ops
                     for param, var in child.inputs.items() if var is op.outputs[0]]
        sources = [reference[c] for c in consumers if c in reference]
        if not sources:
            raise PackageVerificationError(f"compressed weight '{op.name}' has no uncompressed counterpart "
                                           f"(used by {consumers})")
        source = np.asarray(sources[0], dtype=np.float64)
        if source.shape != dense.shape:
            raise PackageVerificationError(f"compressed weight '{op.name}' has shape {list(dense.shape)}, its "
                                           f"source {list(source.shape)}")
        record = _check(op.name, op.op_type, values, dense, source)
        record.update({"tensor": op.name, "used_by": [f"{c}.{p}" for c, p in consumers],
                       "shape": list(dense.shape), "encoding": encoding})
        results.append(record)
    return results


def decompress(op_type: str, v: dict[str, Any]) -> tuple[np.ndarray, str]:
    """Dense float64 weights from a constexpr op's saved inputs, per the Core ML spec's formulas."""
    if op_type == "constexpr_affine_dequantize":  # iOS 16: scale * (q - zero_point) along one axis
        q = np.asarray(v["quantized_data"], np.float64)
        axis = int(v["axis"]) % q.ndim
        shape = [1] * q.ndim
        scale = np.asarray(v["scale"], np.float64)
        zero = np.asarray(v["zero_point"], np.float64)
        if scale.ndim == 1:
            shape[axis] = scale.size
        return (q - zero.reshape(shape if zero.ndim == 1 else ())) * scale.reshape(shape if scale.ndim == 1 else ()), \
            f"{np.asarray(v['quantized_data']).dtype.name} affine, axis {axis}"
    if op_type == "constexpr_blockwise_shift_scale":  # iOS 18: scale * (data - offset), per block
        data = np.asarray(v["data"], np.float64)
        scale = _expand_blocks(np.asarray(v["scale"], np.float64), data.shape)
        offset = v.get("offset")
        offset = 0.0 if offset is None else _expand_blocks(np.asarray(offset, np.float64), data.shape)
        blocks = [d // s for d, s in zip(data.shape, np.asarray(v["scale"]).shape, strict=True)]
        return (data - offset) * scale, f"{_int_range_name(v['data'])} blockwise {blocks}"
    if op_type == "constexpr_lut_to_dense":
        lut = np.asarray(v["lut"], np.float64)
        if v.get("shape") is not None:  # iOS 16: packed n-bit indices into one table
            shape = tuple(int(d) for d in np.asarray(v["shape"]).reshape(-1))
            nbits = int(np.log2(lut.size))
            indices = unpack_bits(np.asarray(v["indices"], np.uint8), nbits, int(np.prod(shape))).reshape(shape)
            return lut.reshape(-1)[indices], f"{nbits}-bit lookup table"
        indices = np.asarray(v["indices"]).astype(np.int64)  # iOS 18: tables per group of channels
        return _grouped_lut(lut, indices), f"{int(np.log2(lut.shape[-2]))}-bit lookup table (grouped {list(lut.shape[:-2])})"
    if op_type == "constexpr_sparse_to_dense":
        nonzero = np.asarray(v["nonzero_data"], np.float64)
        if v.get("shape") is not None:  # iOS 16: a packed bit mask, one bit per element
            shape = tuple(int(d) for d in np.asarray(v["shape"]).reshape(-1))
            mask = unpack_bits(np.asarray(v["mask"], np.uint8), 1, int(np.prod(shape))).reshape(shape).astype(bool)
        else:  # iOS 18: a uint1 mask tensor shaped like the weight
            mask = np.asarray(v["mask"]).astype(bool)
        if int(mask.sum()) != nonzero.size:
            raise PackageVerificationError(f"sparse weight: mask has {int(mask.sum())} set bits for "
                                           f"{nonzero.size} stored values")
        dense = np.zeros(mask.shape, np.float64)
        dense[mask] = nonzero  # row-major order, as the spec stores them
        return dense, "sparse (bit mask)"
    raise PackageVerificationError(f"unknown compressed weight encoding '{op_type}'")


def unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Little-endian bit fields (least significant bit first, byte by byte), as Core ML packs them."""
    bits = np.unpackbits(packed.reshape(-1), bitorder="little")[: count * nbits].reshape(count, nbits)
    return (bits.astype(np.int64) << np.arange(nbits)).sum(axis=1)


def _expand_blocks(params: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat per-block parameters along each axis to the weight's shape."""
    out = params
    for axis, (full, blocks) in enumerate(zip(shape, params.shape, strict=True)):
        if full % blocks:
            raise PackageVerificationError(f"block parameters of shape {list(params.shape)} do not tile a "
                                           f"weight of shape {list(shape)}")
        out = np.repeat(out, full // blocks, axis=axis)
    return out


def _grouped_lut(lut: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """iOS 18 LUT: lut[g0, .., g(r-1), entries, vector]; each group of channels has its own table."""
    if lut.shape[-1] != 1:
        raise PackageVerificationError("vector palettization (vector size > 1) is not produced by edgeopt")
    groups = lut.shape[:-2]
    dense = np.empty(indices.shape, np.float64)
    steps = [full // g for full, g in zip(indices.shape, groups, strict=True)]
    for group in np.ndindex(*groups):
        region = tuple(slice(g * s, (g + 1) * s) for g, s in zip(group, steps, strict=True))
        dense[region] = lut[group][:, 0][indices[region]]
    return dense


def _int_range_name(data: Any) -> str:
    arr = np.asarray(data)
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= -8 and hi <= 7:
        return "int4"
    return "int8" if lo >= -128 and hi <= 127 else arr.dtype.name


def _check(name: str, op_type: str, v: dict[str, Any], dense: np.ndarray, source: np.ndarray) -> dict[str, Any]:
    """Error of the decompressed weight against its source and the bound that error must respect."""
    err = np.abs(dense - source)
    rounding = FP16_REL * np.abs(source) + FP16_TINY  # the dequantized value is held in float16 on device
    if op_type in ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"):
        if op_type == "constexpr_affine_dequantize":
            q = np.asarray(v["quantized_data"], np.float64)
            axis = int(v["axis"]) % q.ndim
            shape = [1] * q.ndim
            scale = np.asarray(v["scale"], np.float64)
            if scale.ndim == 1:
                shape[axis] = scale.size
            step = np.broadcast_to(np.abs(scale.reshape(shape if scale.ndim == 1 else ())), dense.shape)
            zero = np.asarray(v["zero_point"], np.float64)
            levels = np.abs(q - zero.reshape(shape if zero.ndim == 1 else ()))
        else:
            step = np.abs(_expand_blocks(np.asarray(v["scale"], np.float64), dense.shape))
            offset = v.get("offset")
            levels = np.abs(np.asarray(v["data"], np.float64) - (
                0.0 if offset is None else _expand_blocks(np.asarray(offset, np.float64), dense.shape)))
        # Half a step, plus what rounding the scale itself to float16 costs at this integer level
        # (tiny scales of near-dead channels are float16 subnormals, with few significant bits).
        scale_rounding = levels * _fp16_spacing(step)
        bound = 0.5 * step + scale_rounding + rounding
        rule = "half a quantization step (+ float16 rounding of the scale)"
    elif op_type == "constexpr_lut_to_dense":
        table = np.unique(np.asarray(v["lut"], np.float64).reshape(-1))
        bound = _distance_to_nearest(source, table) + rounding + FP16_REL * np.abs(dense)
        rule = "distance to the nearest table entry"
    else:  # sparse: kept values exact, pruned ones no larger than the smallest kept magnitude
        kept = dense != 0
        threshold = float(np.abs(source[kept]).min()) if kept.any() else float(np.abs(source).max())
        bound = np.where(kept, rounding, threshold * (1 + FP16_REL) + FP16_TINY)
        rule = "kept values exact; pruned magnitudes <= smallest kept"
    ratio = float((err / bound).max()) if err.size else 0.0
    record = {"max_abs_err": float(err.max()), "mean_abs_err": float(err.mean()), "bound_rule": rule,
              "max_err_over_bound": round(ratio, 4), "ok": ratio <= 1.0}
    if op_type == "constexpr_sparse_to_dense":
        record["sparsity"] = round(float(1.0 - (dense != 0).mean()), 4)
    if not record["ok"]:
        worst = np.unravel_index(int(np.argmax(err / bound)), err.shape)
        raise PackageVerificationError(
            f"compressed weight '{name}' does not reproduce its source: at index {list(map(int, worst))} the "
            f"saved value {dense[worst]:.6g} differs from {source[worst]:.6g} by {err[worst]:.3g}, more than "
            f"{bound[worst]:.3g} ({rule})")
    return record


def _fp16_spacing(values: np.ndarray) -> np.ndarray:
    """The gap between adjacent float16 numbers at each value (subnormals included)."""
    return np.spacing(np.abs(values).astype(np.float16)).astype(np.float64)


def _distance_to_nearest(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    pos = np.clip(np.searchsorted(table, values), 1, len(table) - 1) if len(table) > 1 else np.zeros(values.shape, int)
    if len(table) == 1:
        return np.abs(values - table[0])
    return np.minimum(np.abs(values - table[pos - 1]), np.abs(values - table[pos]))
