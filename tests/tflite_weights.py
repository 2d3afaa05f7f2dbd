"""Read the constant weights of a .tflite file back, sparse ones included (test helper).

The sparse decoder here is written independently of the converter's encoder: it walks
``dim_metadata`` level by level the way TFLite's ``FormatConverter::SparseToDense`` does (a DENSE
level multiplies the position by its size, a SPARSE_CSR level reads ``array_segments[position]`` up
to ``array_segments[position + 1]`` and takes each child's coordinate from ``array_indices``), so a
test that compares its result with the report checks the file, not the encoder against itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ai_edge_litert import schema_py_generated as s

NUMPY = {s.TensorType.FLOAT32: np.float32, s.TensorType.FLOAT16: np.float16, s.TensorType.INT8: np.int8,
         s.TensorType.INT32: np.int32, s.TensorType.INT64: np.int64, s.TensorType.INT16: np.int16,
         s.TensorType.UINT8: np.uint8}


@dataclass
class StoredWeight:
    name: str                  # the name the consumer reads (a DENSIFY output for a sparse weight)
    dense: np.ndarray          # the values, densified
    sparse: bool
    stored_bytes: int          # bytes in the file: values plus index arrays
    index_dtypes: list[str]    # per SPARSE_CSR level: "<segments dtype>/<indices dtype>"
    formats: list[str]         # per dimension: DENSE / SPARSE_CSR (empty when dense)
    scale: list[float] | None
    zero_point: list[int] | None
    quantized_dimension: int | None


def _text(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


def densify(values: np.ndarray, shape: list[int], sparsity) -> tuple[np.ndarray, int, list[str], list[str]]:
    """(dense array, index bytes, index dtypes per sparse level, format per dim) of a sparse tensor."""
    rank = len(shape)
    if list(sparsity.traversalOrder) != list(range(rank)) or (sparsity.blockMap is not None and len(sparsity.blockMap)):
        raise NotImplementedError("only identity traversal order without blocks is decoded here")
    dense = np.zeros(shape, values.dtype)
    metas = sparsity.dimMetadata
    index_bytes, dtypes, formats = 0, [], []
    for meta in metas:
        if meta.format == s.DimensionType.SPARSE_CSR:
            seg, ind = np.asarray(meta.arraySegments.values), np.asarray(meta.arrayIndices.values)
            index_bytes += seg.nbytes + ind.nbytes
            dtypes.append(f"{seg.dtype.name}/{ind.dtype.name}")
            formats.append("SPARSE_CSR")
        else:
            formats.append("DENSE")
    taken = 0

    def walk(level: int, position: int, coords: tuple[int, ...]) -> None:
        nonlocal taken
        if level == rank:
            dense[coords] = values[taken]
            taken += 1
            return
        meta = metas[level]
        if meta.format == s.DimensionType.DENSE:
            for i in range(int(meta.denseSize)):
                walk(level + 1, position * int(meta.denseSize) + i, (*coords, i))
        else:
            segments, indices = meta.arraySegments.values, meta.arrayIndices.values
            for child in range(int(segments[position]), int(segments[position + 1])):
                walk(level + 1, child, (*coords, int(indices[child])))

    walk(0, 0, ())
    if taken != len(values):
        raise ValueError(f"the dim_metadata visits {taken} elements; the buffer holds {len(values)}")
    return dense, index_bytes, dtypes, formats


def stored_weights(path: str | Path) -> dict[str, StoredWeight]:
    """Every constant tensor of subgraph 0 by the name its consumers read."""
    data = Path(path).read_bytes()
    model = s.ModelT.InitFromPackedBuf(bytearray(data), 0)
    sub = model.subgraphs[0]
    densify_op = next((i for i, c in enumerate(model.operatorCodes)
                       if max(c.builtinCode, c.deprecatedBuiltinCode) == s.BuiltinOperator.DENSIFY), None)
    read_as = {int(op.inputs[0]): int(op.outputs[0]) for op in sub.operators if op.opcodeIndex == densify_op}
    found = {}
    for i, t in enumerate(sub.tensors):
        buf = model.buffers[t.buffer].data
        if buf is None or len(buf) == 0 or t.type not in NUMPY:
            continue
        values = np.frombuffer(bytes(buf), NUMPY[t.type])
        shape = [int(d) for d in t.shape]
        if t.sparsity is not None:
            dense, index_bytes, dtypes, formats = densify(values, shape, t.sparsity)
        else:
            dense, index_bytes, dtypes, formats = values.reshape(shape), 0, [], []
        name = _text(sub.tensors[read_as[i]].name) if i in read_as else _text(t.name)
        q = t.quantization
        has_q = q is not None and q.scale is not None and len(q.scale)
        found[name] = StoredWeight(name, dense, t.sparsity is not None, values.nbytes + index_bytes, dtypes, formats,
                                   [float(v) for v in q.scale] if has_q else None,
                                   [int(v) for v in q.zeroPoint] if has_q else None,
                                   int(q.quantizedDimension) if has_q else None)
    return found


def densify_outputs_quantization(path: str | Path) -> dict[str, tuple[list[float], list[int], int]]:
    """Quantization (scales, zero points, axis) of every DENSIFY output, by tensor name."""
    data = Path(path).read_bytes()
    model = s.ModelT.InitFromPackedBuf(bytearray(data), 0)
    sub = model.subgraphs[0]
    out = {}
    for op in sub.operators:
        code = model.operatorCodes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) != s.BuiltinOperator.DENSIFY:
            continue
        t = sub.tensors[int(op.outputs[0])]
        q = t.quantization
        if q is not None and q.scale is not None and len(q.scale):
            out[_text(t.name)] = ([float(v) for v in q.scale], [int(v) for v in q.zeroPoint], int(q.quantizedDimension))
    return out
