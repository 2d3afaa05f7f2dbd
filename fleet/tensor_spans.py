"""Where each weight tensor's bytes lie in a packed artifact, for the XOR kind of delta (edgeopt.delta).

``tensor_spans(archive)`` reads the .onnx and .tflite files inside the artifact's tar and names each
tensor's stored bytes by (file, tensor name): their offset in the archive, their length and the width
of one element. Two versions of a model share a tensor when the name and the length agree; the delta
then carries the XOR of the two, which a fine-tune leaves mostly zero in the sign and exponent bytes.

Written by hand because neither library gives offsets: protobuf parses an .onnx file into objects
without saying where a field's bytes were (so the wire format is walked here, the few fields a tensor
lives in), and the .tflite reader here walks FlatBuffer tables by their schema's field slots, so the
publisher needs no LiteRT. A file either reader does not understand gives no spans (its delta is then
plain patch-from); nothing here can make a wrong artifact, since the device checks the signed sha256.
"""

from __future__ import annotations

import io
import logging
import struct
import tarfile
from collections.abc import Iterator

from edgeopt.delta import CODEC, CODEC_XOR, DeltaError, Region, make_delta

log = logging.getLogger("edgeopt.fleet.tensor_spans")

Span = tuple[int, int, int]  # (offset, length, element width) of a tensor's stored bytes

# ONNX TensorProto.DataType → bytes per element, for the types whose raw bytes are regrouped by place
_ONNX_WIDTH = {1: 4, 6: 4, 7: 8, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
# TFLite TensorType → bytes per element (FLOAT32, FLOAT16, INT32, INT64, INT16, FLOAT64, UINT32)
_TFLITE_WIDTH = {0: 4, 1: 2, 2: 4, 4: 8, 7: 2, 10: 8, 15: 4}


def tensor_spans(archive: bytes) -> dict[tuple[str, str], Span]:
    """Every tensor of every .onnx / .tflite file in the packed artifact, in archive offsets."""
    out: dict[tuple[str, str], Span] = {}
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.endswith((".onnx", ".tflite")):
                continue
            data = archive[member.offset_data:member.offset_data + member.size]
            try:
                spans = onnx_spans(data) if member.name.endswith(".onnx") else tflite_spans(data)
            except (ValueError, IndexError, struct.error):
                continue  # not a file this reader understands: no XOR for it
            for name, (offset, length, width) in spans.items():
                out[member.name, name] = (member.offset_data + offset, length, width)
    return out


XOR_WORTH = 0.9  # the XOR kind is taken only when at most this share of the binary delta: it costs the
                # device more to apply (a 10 MB artifact: 35 ms against 2 ms, docs/benchmarks.md)


def chosen_delta(base: bytes, new: bytes) -> tuple[str, bytes]:
    """(codec, delta): patch-from, or the XOR kind over the tensors both artifacts hold when that is
    clearly smaller (a fine-tune of the whole network; a head-only retrain is as small either way)."""
    plain = make_delta(base, new)
    theirs = tensor_spans(base)
    regions = [Region(start, length, theirs[key][0], width) for key, (start, length, width) in tensor_spans(new).items()
               if key in theirs and theirs[key][1] == length]
    if not regions:
        return CODEC, plain
    try:
        xor = make_delta(base, new, regions)
    except DeltaError as exc:  # spans that overlap (a file read wrongly): the binary kind still stands
        log.warning("no tensor XOR delta: %s", exc)
        return CODEC, plain
    return (CODEC_XOR, xor) if len(xor) <= XOR_WORTH * len(plain) else (CODEC, plain)


# --- ONNX: the protobuf wire format, enough to find TensorProto.raw_data ---------------------------

def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if shift > 63:
            raise ValueError("varint too long")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end or the varint's value) of each field."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, wire, value, value
        elif wire == 1:
            yield number, wire, pos, pos + 8
            pos += 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise ValueError("field runs past its message")
            yield number, wire, pos, pos + length
            pos += length
        elif wire == 5:
            yield number, wire, pos, pos + 4
            pos += 4
        else:
            raise ValueError(f"wire type {wire} is not used by ONNX")


def onnx_spans(data: bytes) -> dict[str, Span]:
    """The stored values (raw_data, or packed float_data / double_data) of every initializer and
    Constant-node tensor (subgraphs too), by tensor name."""
    spans: dict[str, Span] = {}
    for number, wire, start, end in _fields(data, 0, len(data)):
        if number == 7 and wire == 2:  # ModelProto.graph
            _graph(data, start, end, "", spans)
    return spans


def _graph(data: bytes, start: int, end: int, scope: str, spans: dict[str, Span]) -> None:
    for number, wire, s, e in _fields(data, start, end):
        if wire != 2:
            continue
        if number == 5:  # GraphProto.initializer
            _tensor(data, s, e, scope, spans)
        elif number == 1:  # GraphProto.node
            _node(data, s, e, scope, spans)


def _node(data: bytes, start: int, end: int, scope: str, spans: dict[str, Span]) -> None:
    outputs, attributes = [], []
    for number, wire, s, e in _fields(data, start, end):
        if number == 2 and wire == 2:  # NodeProto.output
            outputs.append(data[s:e].decode("utf-8", "replace"))
        elif number == 5 and wire == 2:  # NodeProto.attribute
            attributes.append((s, e))
    where = f"{scope}{outputs[0] if outputs else '?'}/"
    for s, e in attributes:
        for number, wire, fs, fe in _fields(data, s, e):
            if wire != 2:
                continue
            if number in (5, 10):  # AttributeProto.t / .tensors
                _tensor(data, fs, fe, where, spans)
            elif number in (6, 11):  # AttributeProto.g / .graphs (If, Loop, Scan bodies)
                _graph(data, fs, fe, where, spans)


def _tensor(data: bytes, start: int, end: int, scope: str, spans: dict[str, Span]) -> None:
    name, raw, dtype, width = "", None, 0, None
    for number, wire, s, e in _fields(data, start, end):
        if number == 8 and wire == 2:  # TensorProto.name
            name = data[s:e].decode("utf-8", "replace")
        elif number == 9 and wire == 2:  # TensorProto.raw_data
            raw, width = (s, e), None
        elif number in (4, 10) and wire == 2:  # TensorProto.float_data / double_data, packed: fixed width
            raw, width = (s, e), 4 if number == 4 else 8
        elif number == 2 and wire == 0:  # TensorProto.data_type
            dtype = s
    if raw is not None and raw[1] > raw[0]:
        key = f"{scope}{name or len(spans)}"
        if key not in spans:
            spans[key] = (raw[0], raw[1] - raw[0], width or _ONNX_WIDTH.get(dtype, 1))


# --- TFLite: FlatBuffer tables by field slot (schema.fbs: Model, SubGraph, Tensor, Buffer) ------------

def _u32(data: bytes, pos: int) -> int:
    return struct.unpack_from("<I", data, pos)[0]


def _field(data: bytes, table: int, slot: int) -> int | None:
    """The absolute position of field ``slot`` of the table at ``table``, or None when absent."""
    vtable = table - struct.unpack_from("<i", data, table)[0]
    vt_size = struct.unpack_from("<H", data, vtable)[0]
    at = 4 + 2 * slot
    if at >= vt_size:
        return None
    rel = struct.unpack_from("<H", data, vtable + at)[0]
    return table + rel if rel else None


def _ref(data: bytes, pos: int) -> int:
    return pos + _u32(data, pos)


def _vector(data: bytes, table: int, slot: int) -> tuple[int, int]:
    """(start of the elements, count) of a vector field; (0, 0) when absent."""
    pos = _field(data, table, slot)
    if pos is None:
        return 0, 0
    vec = _ref(data, pos)
    return vec + 4, _u32(data, vec)


def tflite_spans(data: bytes) -> dict[str, Span]:
    """The data of every constant buffer, named by the first tensor that reads it."""
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ValueError("not a TFLite FlatBuffer")
    model = _ref(data, 0)
    buffers, count = _vector(data, model, 4)  # Model.buffers
    owner: dict[int, tuple[str, int]] = {}
    subgraphs, n_sub = _vector(data, model, 2)  # Model.subgraphs
    for g in range(n_sub):
        sub = _ref(data, subgraphs + 4 * g)
        tensors, n_t = _vector(data, sub, 0)  # SubGraph.tensors
        for t in range(n_t):
            tensor = _ref(data, tensors + 4 * t)
            slot = _field(data, tensor, 2)  # Tensor.buffer
            buffer = _u32(data, slot) if slot is not None else 0
            name_at = _field(data, tensor, 3)  # Tensor.name
            name = ""
            if name_at is not None:
                s = _ref(data, name_at)
                name = data[s + 4:s + 4 + _u32(data, s)].decode("utf-8", "replace")
            type_at = _field(data, tensor, 1)  # Tensor.type (a byte; FLOAT32 = 0 when absent)
            dtype = data[type_at] if type_at is not None else 0
            if buffer and buffer not in owner:
                owner[buffer] = (f"{g}/{name}", _TFLITE_WIDTH.get(dtype, 1))
    spans: dict[str, Span] = {}
    for index, (name, width) in owner.items():
        if index >= count:
            raise ValueError(f"tensor {name} reads buffer {index} of {count}")
        buf = _ref(data, buffers + 4 * index)
        off_at, size_at = _field(data, buf, 1), _field(data, buf, 2)  # Buffer.offset / .size (large models)
        offset = struct.unpack_from("<Q", data, off_at)[0] if off_at is not None else 0
        if offset > 1:
            size = struct.unpack_from("<Q", data, size_at)[0] if size_at is not None else 0
            start, length = offset, size
        else:
            start, length = _vector(data, buf, 0)  # Buffer.data
        if length and start + length <= len(data) and name not in spans:
            spans[name] = (start, length, width)
    return spans
