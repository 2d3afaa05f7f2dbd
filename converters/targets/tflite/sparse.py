"""Sparse storage of mostly-zero constant weights in a .tflite: ``SparsityParameters`` + ``DENSIFY``.

A weight tensor read by CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED or TRANSPOSE_CONV (directly, or
through the DEQUANTIZE of an fp16 model) is stored in TFLite's compressed-sparse format — its
non-zero values in row-major order plus, per sparse dimension, CSR segments and indices — and a
builtin ``DENSIFY`` operator turns it back into the dense tensor the consumer reads. This is the
form TensorFlow's own converter emits for sparse weights. LiteRT densifies each such tensor once:
the XNNPACK delegate while it prepares the graph (``allocate_tensors``), LiteRT's own DENSIFY kernel
at the first invoke (its output is a persistent tensor). The file shrinks; the dense weights still
take RAM at run time (see docs/tflite.md for measurements).

Why this is hand-written: the only tools that write TFLite sparse tensors are TensorFlow's converter
(the MLIR ``DenseToSparse`` pass) and its C++ ``FormatConverter``; no Python package writes them
without TensorFlow, which this project does not depend on. The format is small: with an identity
``traversal_order`` and no blocks, each dimension in ``dim_metadata`` is DENSE (``dense_size``) or
SPARSE_CSR (``array_segments``, ``array_indices``), and the value buffer holds the elements the
traversal visits, in order. A DENSE prefix followed by SPARSE_CSR dimensions visits only the
non-zeros. Per tensor the cheapest such split is chosen, and each index array gets the narrowest
type (Uint8 / Uint16 / Int32) that holds its largest entry. Values keep the dense tensor's type and
quantization (per-channel int8 scales apply to the densified tensor unchanged).

Where LiteRT runs it (ai-edge-litert 2.3, XNNPACK on and off, tests/test_tflite_sparse.py): DENSIFY has
float32, float16 and int8 kernels (no int4); behind it, every consumer runs with float32 / float16
weights and with int8 weights in int8 and int16x8 models, except an int8 FULLY_CONNECTED and the
dynamic-range (int8 weights, float activations) CONV_2D, FULLY_CONNECTED and TRANSPOSE_CONV, which
XNNPACK claims and then fails to prepare (``REFUSED``); those stay dense, with the reason reported.

FULLY_CONNECTED can also read a sparse weight itself, without DENSIFY. That is not used: with
XNNPACK on, LiteRT delegates such an operator and reads the sparse buffer as if it were dense (a
float32 digits model returned NaN, an int8 one logits off by 86), and without XNNPACK the int8 kernel
rejects it ("Unsupported sparse fully-connected weight format").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .flatbuffer import pack_model, read_model, schema

# Consumer operator → index of its weight input.
WEIGHT_INPUT = {"CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "FULLY_CONNECTED": 1, "TRANSPOSE_CONV": 1}
# TensorType names LiteRT's DENSIFY kernel (and XNNPACK's densification) handle.
DENSIFY_TYPES = ("FLOAT32", "FLOAT16", "INT8")
# Bytes one sparse tensor adds to the FlatBuffer besides its values and index arrays: the
# SparsityParameters tables, a second tensor (name, shape, quantization) and the DENSIFY operator.
FLATBUFFER_OVERHEAD = 256

_INDEX_TYPES = ((np.uint8, "Uint8Vector"), (np.uint16, "Uint16Vector"), (np.int32, "Int32Vector"))


def index_dtype(largest: int) -> tuple[type, str]:
    """The narrowest index type holding ``largest`` (numpy type, SparseIndexVector member)."""
    for dtype, name in _INDEX_TYPES:
        if largest <= np.iinfo(dtype).max:
            return dtype, name
    raise ValueError(f"sparse index {largest} does not fit int32")


@dataclass
class SparseEncoding:
    """One tensor in TFLite's sparse format (identity traversal order, no blocks)."""

    shape: tuple[int, ...]
    dense_dims: int                   # dims [0, dense_dims) are DENSE, the rest SPARSE_CSR
    values: np.ndarray                # the non-zero elements in row-major order
    segments: list[np.ndarray] = field(default_factory=list)  # per SPARSE_CSR dim, narrowest type
    indices: list[np.ndarray] = field(default_factory=list)

    @property
    def formats(self) -> list[str]:
        return ["DENSE"] * self.dense_dims + ["SPARSE_CSR"] * (len(self.shape) - self.dense_dims)

    @property
    def nbytes(self) -> int:
        """Values plus index arrays: what the file stores for this tensor's data."""
        return int(self.values.nbytes + sum(a.nbytes for a in self.segments) + sum(a.nbytes for a in self.indices))

    def describe(self) -> str:
        kinds = ", ".join(f"{f}" + (f" ({a.dtype.name} indices)" if f == "SPARSE_CSR" else "")
                          for f, a in zip(self.formats, [None] * self.dense_dims + self.indices, strict=True))
        return f"TFLite sparse: {kinds}"


def encode(array: np.ndarray, dense_dims: int) -> SparseEncoding:
    """``array`` with dims ``[0, dense_dims)`` DENSE and the rest SPARSE_CSR.

    Level by level, as TFLite's FormatConverter reads it: the DENSE dims together address
    ``rows = prod(shape[:dense_dims])`` positions; each SPARSE_CSR dim lists, for every position of
    the level above, its non-empty children (``segments`` are offsets into ``indices``, which hold
    the child's coordinate in this dim); a child's position is its index in ``indices``."""
    shape = tuple(int(d) for d in array.shape)
    rank = len(shape)
    if not 0 <= dense_dims < rank:
        raise ValueError(f"dense_dims {dense_dims} for a rank-{rank} tensor")
    rows = int(np.prod(shape[:dense_dims], dtype=np.int64))
    flat = array.reshape((rows, *shape[dense_dims:]))
    coords = np.argwhere(flat != 0)          # row-major order: the order DENSIFY fills values in
    values = flat[tuple(coords.T)] if coords.size else np.zeros(0, array.dtype)
    encoding = SparseEncoding(shape, dense_dims, np.ascontiguousarray(values, dtype=array.dtype))
    parent_count, parent_of = rows, coords[:, 0] if len(coords) else np.zeros(0, np.int64)
    for level in range(1, rank - dense_dims + 1):
        prefix = coords[:, :level + 1]
        new = np.ones(len(prefix), bool)
        if len(prefix) > 1:
            new[1:] = np.any(prefix[1:] != prefix[:-1], axis=1)
        nodes_parent = parent_of[new]
        counts = np.bincount(nodes_parent, minlength=parent_count) if len(nodes_parent) else np.zeros(parent_count, int)
        segments = np.concatenate([[0], np.cumsum(counts)])
        child_coord = prefix[new, level]
        encoding.segments.append(segments.astype(index_dtype(int(segments[-1]))[0]))
        encoding.indices.append(child_coord.astype(index_dtype(int(shape[dense_dims + level - 1]) - 1)[0]))
        # the next level's parents are this level's nodes, numbered in order
        parent_count, parent_of = int(new.sum()), np.cumsum(new) - 1
    return encoding


def smallest_encoding(array: np.ndarray) -> SparseEncoding:
    """The DENSE-prefix / SPARSE_CSR-suffix split of ``array`` that stores it in the fewest bytes."""
    return min((encode(array, k) for k in range(array.ndim)), key=lambda e: (e.nbytes, -e.dense_dims))


def decode(encoding: SparseEncoding) -> np.ndarray:
    """The dense array of an encoding (the inverse of ``encode``; used to check what is written)."""
    shape = encoding.shape
    k = encoding.dense_dims
    rows = int(np.prod(shape[:k], dtype=np.int64))
    # walk down the sparse levels: positions → (row, coordinates so far)
    coords = [np.arange(rows)]
    for segments, indices in zip(encoding.segments, encoding.indices, strict=True):
        counts = np.diff(segments.astype(np.int64))
        coords = [np.repeat(c, counts) for c in coords] + [indices.astype(np.int64)]
    dense = np.zeros((rows, *shape[k:]), encoding.values.dtype)
    dense[tuple(coords)] = encoding.values
    return dense.reshape(shape)


# -- writing into a model -----------------------------------------------------------------------------
def sparsity_parameters(encoding: SparseEncoding) -> Any:
    """The schema's ``SparsityParametersT`` of an encoding."""
    s = schema()
    params = s.SparsityParametersT()
    params.traversalOrder = list(range(len(encoding.shape)))
    params.blockMap = []
    params.dimMetadata = []
    for dim, size in enumerate(encoding.shape):
        meta = s.DimensionMetadataT()
        if dim < encoding.dense_dims:
            meta.format = s.DimensionType.DENSE
            meta.denseSize = int(size)
        else:
            level = dim - encoding.dense_dims
            meta.format = s.DimensionType.SPARSE_CSR
            meta.arraySegmentsType, meta.arraySegments = _index_vector(s, encoding.segments[level])
            meta.arrayIndicesType, meta.arrayIndices = _index_vector(s, encoding.indices[level])
        params.dimMetadata.append(meta)
    return params


def _index_vector(s: Any, array: np.ndarray) -> tuple[int, Any]:
    name = dict((np.dtype(d).name, n) for d, n in _INDEX_TYPES)[array.dtype.name]
    vec = getattr(s, name + "T")()
    vec.values = array
    return getattr(s.SparseIndexVector, name), vec


# -- which weights, and where LiteRT runs them sparse --------------------------------------------------------
# (consumer, weight type, activation type) → why LiteRT cannot run that consumer behind a DENSIFY.
# Measured with ai-edge-litert 2.3 (tests/test_tflite_sparse.py forces each one and checks it still
# fails): XNNPACK, on by default, claims these operators and then fails to prepare them ("failed to
# delegate ... node"); LiteRT's own kernels run them. Float32 and float16 weights run everywhere.
_XNNPACK = "LiteRT's XNNPACK delegate (on by default) fails to prepare"
REFUSED: dict[tuple[str, str, str], str] = {
    ("FULLY_CONNECTED", "INT8", "INT8"): f"{_XNNPACK} an int8 FULLY_CONNECTED whose weights come from DENSIFY",
    **{(op, "INT8", "FLOAT32"): f"{_XNNPACK} a dynamic-range (int8 weights, float activations) {op} whose weights "
                                "come from DENSIFY" for op in ("CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")},
}


@dataclass
class WeightRecord:
    """What happened to one weight tensor (``pass_details.tflite.sparse_storage.weights``)."""

    tensor: str
    onnx_node: str | None
    used_by: list[str]
    shape: list[int]
    dtype: str
    zeros: int
    sparsity: float
    dense_bytes: int
    stored: str = "dense"             # "sparse" | "dense"
    sparse_bytes: int | None = None   # values + index arrays, when an encoding was computed
    encoding: str | None = None
    reason: str | None = None         # why a tensor stayed dense

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class _Use:
    op: str           # the consumer (CONV_2D, ...)
    activations: str  # TensorType name of the consumer's input 0
    weight_slot: bool  # whether it reads the tensor as its weights


def _name(tensor: Any) -> str:
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def weight_tensors(model: Any) -> dict[int, list[_Use]]:
    """Constant tensors of subgraph 0 that some CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED /
    TRANSPOSE_CONV reads as its weights (directly, or through the DEQUANTIZE an fp16 model puts in
    front), with every use of each."""
    s = schema()
    op_names = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(s.TensorType).items() if not k.startswith("_")}
    sub = model.subgraphs[0]

    def kind(op: Any) -> str:
        code = model.operatorCodes[op.opcodeIndex]
        return op_names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?")

    producer = {int(t): op for op in sub.operators for t in (op.outputs if op.outputs is not None else [])}

    def constant_behind(t: int) -> int | None:
        """``t`` itself if it is a constant, the constant a DEQUANTIZE of ``t``'s producer reads, or None."""
        source = producer.get(t)
        if source is None:
            return t if _has_data(model, sub.tensors[t]) else None
        if kind(source) == "DEQUANTIZE":
            inner = int(source.inputs[0])
            return inner if inner not in producer and _has_data(model, sub.tensors[inner]) else None
        return None

    uses: dict[int, list[_Use]] = {}
    weights: set[int] = set()
    for op in sub.operators:
        name = kind(op)
        if name == "DEQUANTIZE":
            continue  # its reads are followed through to the operator that reads its output
        inputs = [int(t) for t in (op.inputs if op.inputs is not None else [])]
        slot = WEIGHT_INPUT.get(name)
        first = sub.tensors[inputs[0]] if inputs and inputs[0] >= 0 else None
        activations = type_names.get(first.type, "?") if first is not None else "?"
        for i, t in enumerate(inputs):
            constant = constant_behind(t) if t >= 0 else None
            if constant is None:
                continue
            uses.setdefault(constant, []).append(_Use(name, activations, i == slot))
            if i == slot:
                weights.add(constant)
    return {t: uses[t] for t in sorted(weights)}


def _has_data(model: Any, tensor: Any) -> bool:
    buf = model.buffers[tensor.buffer] if tensor.buffer < len(model.buffers) else None
    return buf is not None and buf.data is not None and len(buf.data) > 0


_NUMPY = {"FLOAT32": np.float32, "FLOAT16": np.float16, "INT8": np.int8}


def _values(raw: bytes, dtype: str, shape: list[int]) -> np.ndarray | None:
    """The elements of a constant buffer (int4 unpacked two per byte); None for other types."""
    n = int(np.prod(shape, dtype=np.int64))
    if dtype in _NUMPY:
        return np.frombuffer(raw, _NUMPY[dtype]).reshape(shape)
    if dtype == "INT4":
        packed = np.frombuffer(raw, np.uint8)
        nibbles = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)[:n]
        return nibbles.reshape(shape)  # zero nibbles are zeros, whatever their sign convention
    return None


def store_sparse(data: bytes, min_zeros: float, origins: dict[str, str] | None = None,
                 refused: dict[tuple[str, str, str], str] | None = None) -> tuple[bytes, list[WeightRecord]]:
    """``data`` with every weight tensor that is at least ``min_zeros`` zeros, that LiteRT runs sparse
    and that is smaller sparse than dense, stored sparse behind a DENSIFY; and one record per weight
    tensor. ``origins`` maps a tensor name to the ONNX node it was lowered from; ``refused`` defaults
    to ``REFUSED``."""
    s = schema()
    refused = REFUSED if refused is None else refused
    type_names = {v: k for k, v in vars(s.TensorType).items() if not k.startswith("_")}
    model = read_model(data)
    if any(getattr(b, "offset", 0) > 1 for b in model.buffers or []):
        return data, []  # weights stored after a > 2 GiB FlatBuffer: left as litert-quantizer wrote them
    sub = model.subgraphs[0]
    records: list[WeightRecord] = []
    densify_ops = []
    for t, uses in weight_tensors(model).items():
        tensor = sub.tensors[t]
        dtype = type_names.get(tensor.type, str(tensor.type))
        raw = bytes(model.buffers[tensor.buffer].data)
        shape = [int(d) for d in tensor.shape]
        array = _values(raw, dtype, shape)
        zeros = 0 if array is None else int(array.size - np.count_nonzero(array))
        size = int(np.prod(shape, dtype=np.int64))
        name = _name(tensor)
        record = WeightRecord(name, (origins or {}).get(name), sorted({u.op for u in uses}), shape, dtype, zeros,
                              zeros / size if size else 0.0, len(raw))
        records.append(record)
        record.reason = _dense_reason(record, uses, min_zeros, refused)
        if record.reason is not None:
            continue
        encoding = smallest_encoding(array)
        record.sparse_bytes = encoding.nbytes
        if encoding.nbytes + FLATBUFFER_OVERHEAD >= len(raw):
            record.reason = (f"the sparse form ({encoding.nbytes} B + ~{FLATBUFFER_OVERHEAD} B of tables and "
                             f"DENSIFY) is not smaller than dense ({len(raw)} B)")
            continue
        if not np.array_equal(decode(encoding), array):
            raise AssertionError(f"sparse encoding of '{name}' does not decode to its weights")  # a bug, not input
        densify_ops.append(_store(model, t, encoding))
        record.stored, record.encoding = "sparse", encoding.describe()
    if not densify_ops:
        return data, records
    code = _operator_code(model, "DENSIFY")
    for op in densify_ops:
        op.opcodeIndex = code
    sub.operators = densify_ops + list(sub.operators)  # constants first: a valid execution order
    return pack_model(model), records


def _dense_reason(record: WeightRecord, uses: list[_Use], min_zeros: float,
                  refused: dict[tuple[str, str, str], str]) -> str | None:
    """Why a weight stays dense before any encoding is tried, or None."""
    if record.dtype not in DENSIFY_TYPES:
        if record.sparsity < min_zeros:
            return f"{record.sparsity:.0%} zeros, below sparse_min_zeros {min_zeros:g}"
        return (f"{record.dtype.lower()} weights: LiteRT's DENSIFY has kernels for "
                f"{', '.join(t.lower() for t in DENSIFY_TYPES)} only")
    if record.sparsity < min_zeros:
        return f"{record.sparsity:.0%} zeros, below sparse_min_zeros {min_zeros:g}"
    if record.zeros == int(np.prod(record.shape, dtype=np.int64)):
        return "all zeros (an empty sparse buffer is not a constant to LiteRT)"
    others = sorted({u.op for u in uses if not u.weight_slot})
    if others:
        return f"also read by {', '.join(others)} (not as weights)"
    for use in uses:
        why = refused.get((use.op, record.dtype, use.activations))
        if why is not None:
            return why
    return None


def _store(model: Any, t: int, encoding: SparseEncoding) -> Any:
    """Make tensor ``t`` the output of a DENSIFY reading a new sparse constant; return the DENSIFY."""
    s = schema()
    sub = model.subgraphs[0]
    dense = sub.tensors[t]
    sparse = s.TensorT()
    sparse.name = _name(dense) + "/sparse"
    sparse.shape = list(dense.shape)
    sparse.type = dense.type
    # the per-channel scales and zero points stay on the tensor the consumer reads (the DENSIFY output)
    # and are repeated on the sparse constant, as TensorFlow's converter writes them
    sparse.quantization = dense.quantization
    sparse.sparsity = sparsity_parameters(encoding)
    sparse.buffer = dense.buffer
    model.buffers[dense.buffer].data = np.frombuffer(encoding.values.tobytes(), np.uint8)
    dense.buffer = _empty_buffer(model)
    sub.tensors.append(sparse)
    op = s.OperatorT()
    op.inputs = [len(sub.tensors) - 1]
    op.outputs = [t]
    return op


def _empty_buffer(model: Any) -> int:
    first = model.buffers[0]
    if first.data is None or len(first.data) == 0:
        return 0  # buffer 0 is the empty buffer by convention

    model.buffers.append(schema().BufferT())
    return len(model.buffers) - 1


def _operator_code(model: Any, builtin: str) -> int:
    s = schema()
    value = getattr(s.BuiltinOperator, builtin)
    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == value:
            return i
    code = s.OperatorCodeT()
    code.builtinCode = value
    code.deprecatedBuiltinCode = min(value, s.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def summary(records: list[WeightRecord], min_zeros: float) -> dict[str, Any]:
    """``pass_details.tflite.sparse_storage``: totals over the tensors stored sparse, and every record."""
    stored = [r for r in records if r.stored == "sparse"]
    return {"sparse_min_zeros": min_zeros, "stored_sparse": len(stored),
            "dense_bytes": sum(r.dense_bytes for r in stored),
            "sparse_bytes": sum(r.sparse_bytes or 0 for r in stored),
            "weights": [r.to_json() for r in records]}
