"""Writing and reading .tflite FlatBuffers with LiteRT's own schema bindings (no TensorFlow).

``ModelBuilder`` collects tensors, constant buffers and builtin operators for one subgraph and packs
them with the flatc object API in ``ai_edge_litert.schema_py_generated`` (``ModelT`` ... ``Pack``).
Before packing it fuses RELU/RELU6 into the producing operator where TFLite allows it and drops
operators and tensors nothing uses. ``builtin_op_names`` reads the operator codes of any .tflite
file (the "no custom op" check uses it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FILE_IDENTIFIER = b"TFL3"
SIGNATURE_KEY = "serving_default"
BUFFER_ALIGNMENT = 16  # what TFLite's own converter uses, so kernels and XNNPACK can read weights in place

# numpy dtype name → TensorType name in the schema
TENSOR_TYPES = {"float32": "FLOAT32", "float16": "FLOAT16", "int32": "INT32", "int64": "INT64", "int8": "INT8",
                "uint8": "UINT8", "int16": "INT16", "bool": "BOOL"}

# Operators that can absorb a following RELU / RELU6 / RELU_N1_TO_1 (a fused activation in their options).
_FUSABLE = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "SUB", "MUL", "TRANSPOSE_CONV"}
_ACTIVATIONS = {"RELU": "RELU", "RELU6": "RELU6", "RELU_N1_TO_1": "RELU_N1_TO_1"}


def schema():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    data: np.ndarray | None = None
    quantization: dict[str, Any] | None = None
    origin: tuple[str, str] | None = None  # (ONNX op, node name) whose lowering made this constant


@dataclass
class _Operator:
    builtin: str
    inputs: list[int]
    outputs: list[int]
    options: Any = None  # an ...OptionsT instance
    options_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ModelBuilder:
    """One TFLite subgraph under construction; tensors are referred to by integer index."""

    def __init__(self) -> None:
        self.tensors: list[_Tensor] = []
        self.operators: list[_Operator] = []
        self._names: set[str] = set()
        self._constants: dict[tuple[str, tuple[int, ...], str], int] = {}
        self.origin: tuple[str, str] | None = None  # (ONNX op, node name) the next operators come from

    # -- tensors -----------------------------------------------------------------------------
    def _unique(self, name: str) -> str:
        base, i = name or "t", 1
        while name in self._names or not name:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    def tensor(self, name: str, shape, dtype: str = "float32") -> int:
        if dtype not in TENSOR_TYPES:
            raise ValueError(f"tensor '{name}': dtype {dtype} has no TFLite tensor type")
        self.tensors.append(_Tensor(self._unique(name), tuple(int(d) for d in shape), dtype))
        return len(self.tensors) - 1

    def constant(self, array: np.ndarray, name: str) -> int:
        """A constant tensor; identical constants (same bytes, shape and dtype) share one tensor."""
        array = np.asarray(array)  # (np.ascontiguousarray would turn a scalar into shape [1])
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        elif array.dtype == np.int64 and name.endswith(("shape", "perm", "axes", "axis", "paddings", "size",
                                                          "begin", "end", "strides", "indices", "splits")):
            array = array.astype(np.int32)
        key = (hashlib.sha1(array.tobytes()).hexdigest(), array.shape, array.dtype.name)
        if key in self._constants:
            return self._constants[key]
        idx = self.tensor(name, array.shape, array.dtype.name)
        self.tensors[idx].data = array
        self.tensors[idx].origin = self.origin
        self._constants[key] = idx
        return idx

    def shape(self, index: int) -> tuple[int, ...]:
        return self.tensors[index].shape

    def dtype(self, index: int) -> str:
        return self.tensors[index].dtype

    def data(self, index: int) -> np.ndarray | None:
        return self.tensors[index].data

    def name(self, index: int) -> str:
        return self.tensors[index].name

    def rename(self, index: int, name: str) -> None:
        """Give a tensor a caller-chosen name (a model input/output keeps its ONNX name)."""
        current = self.tensors[index].name
        if current == name:
            return
        if name in self._names:
            # free the name from the tensor that holds it (an internal tensor gets a suffix)
            for t in self.tensors:
                if t.name == name:
                    t.name = self._unique(name + "_internal")
                    break
        self._names.discard(current)
        self._names.add(name)
        self.tensors[index].name = name

    # -- operators ---------------------------------------------------------------------------
    def op(self, builtin: str, inputs: list[int], outputs: list[int], options_type: str | None = None,
           **options: Any) -> None:
        """Append operator ``builtin`` (a ``BuiltinOperator`` name); ``options`` are fields of
        ``{options_type}T`` in the schema (camelCase, as the object API spells them)."""
        opts = None
        if options_type is not None:
            opts = getattr(schema(), options_type + "T")()
            for key, value in options.items():
                if not hasattr(opts, key):
                    raise AttributeError(f"{options_type} has no field {key}")
                setattr(opts, key, value)
        elif options:
            raise ValueError(f"{builtin}: options given without an options type")
        self.operators.append(_Operator(builtin, list(inputs), list(outputs), opts, options_type,
                                        {"origin": self.origin}))

    def origins(self) -> dict[str, list[tuple[str, str]]]:
        """TFLite operator name → the (ONNX op, node name) pairs it was lowered from."""
        out: dict[str, list[tuple[str, str]]] = {}
        for op in self.operators:
            origin = op.extra.get("origin")
            if origin is not None and origin not in out.setdefault(op.builtin, []):
                out[op.builtin].append(origin)
        return out

    def node_scopes(self) -> dict[str, list[tuple[str, str]]]:
        """ONNX node name → (builtin, scope) of each operator it was lowered to; the scope is how LiteRT's
        quantizer names an operator in its recipes (its output tensor names, each followed by ';')."""
        out: dict[str, list[tuple[str, str]]] = {}
        for op in self.operators:
            origin = op.extra.get("origin")
            if origin is not None:
                scope = "".join(f"{self.tensors[i].name};" for i in op.outputs if i >= 0)
                out.setdefault(origin[1], []).append((op.builtin, scope))
        return out

    def constant_origins(self) -> dict[str, str]:
        """Constant tensor name → the ONNX node whose lowering made it (weights keep their names through
        quantization, so the report can name the layer a weight belongs to)."""
        return {t.name: t.origin[1] for t in self.tensors if t.data is not None and t.origin is not None}

    # -- finishing ---------------------------------------------------------------------------
    def _consumers(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i, op in enumerate(self.operators):
            for t in op.inputs:
                if t >= 0:
                    out.setdefault(t, []).append(i)
        return out

    def fuse_activations(self, graph_outputs: list[int]) -> None:
        """Fold RELU / RELU6 / RELU_N1_TO_1 into the operator producing their input (as TFLite's own
        converter does): one kernel instead of two, and one quantized tensor fewer."""
        keep = set(graph_outputs)
        consumers = self._consumers()
        producer = {t: i for i, op in enumerate(self.operators) for t in op.outputs}
        dead: set[int] = set()
        act_enum = schema().ActivationFunctionType
        for i, op in enumerate(self.operators):
            if op.builtin not in _ACTIVATIONS or i in dead:
                continue
            src = op.inputs[0]
            p = producer.get(src)
            if p is None or p in dead or src in keep or len(consumers.get(src, [])) != 1:
                continue
            prod = self.operators[p]
            if prod.builtin not in _FUSABLE or prod.options is None:
                continue
            if getattr(prod.options, "fusedActivationFunction", None) != act_enum.NONE:
                continue
            prod.options.fusedActivationFunction = getattr(act_enum, _ACTIVATIONS[op.builtin])
            prod.outputs = [op.outputs[0]]
            producer[op.outputs[0]] = p
            dead.add(i)
        self.operators = [op for i, op in enumerate(self.operators) if i not in dead]

    def prune(self, graph_outputs: list[int]) -> None:
        """Drop operators whose outputs nothing reads (e.g. an LSTM's unused final cell state)."""
        needed = set(graph_outputs)
        kept: list[_Operator] = []
        for op in reversed(self.operators):
            if any(t in needed for t in op.outputs):
                kept.append(op)
                needed.update(t for t in op.inputs if t >= 0)
        self.operators = kept[::-1]

    def finish(self, inputs: list[int], outputs: list[int], description: str = "edgeopt",
               metadata: dict[str, bytes] | None = None) -> bytes:
        """Pack the subgraph (with a ``serving_default`` signature) into .tflite bytes."""
        import flatbuffers

        s = schema()
        self.fuse_activations(outputs)
        self.prune(outputs)
        used = set(inputs) | set(outputs)
        for op in self.operators:
            used.update(t for t in op.inputs if t >= 0)
            used.update(op.outputs)
        order = sorted(used)
        remap = {old: new for new, old in enumerate(order)}

        model = s.ModelT()
        model.version = 3
        model.description = description
        model.buffers = [s.BufferT()]  # buffer 0: the empty buffer every non-constant tensor points at
        sub = s.SubGraphT()
        sub.name = "main"
        sub.tensors = []
        for old in order:
            t = self.tensors[old]
            tt = s.TensorT()
            tt.name = t.name
            tt.shape = list(t.shape)
            tt.type = getattr(s.TensorType, TENSOR_TYPES[t.dtype])
            tt.buffer = 0
            if t.data is not None:
                buf = _AlignedBufferT()
                buf.data = np.frombuffer(t.data.tobytes(), np.uint8)
                model.buffers.append(buf)
                tt.buffer = len(model.buffers) - 1
            if t.quantization:
                q = s.QuantizationParametersT()
                q.scale = list(t.quantization["scale"])
                q.zeroPoint = list(t.quantization["zero_point"])
                tt.quantization = q
            sub.tensors.append(tt)

        codes: dict[str, int] = {}
        model.operatorCodes = []
        sub.operators = []
        for op in self.operators:
            if op.builtin not in codes:
                code = s.OperatorCodeT()
                code.builtinCode = getattr(s.BuiltinOperator, op.builtin)
                code.deprecatedBuiltinCode = min(code.builtinCode, s.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
                code.version = 1
                codes[op.builtin] = len(model.operatorCodes)
                model.operatorCodes.append(code)
            o = s.OperatorT()
            o.opcodeIndex = codes[op.builtin]
            o.inputs = [remap[t] if t >= 0 else -1 for t in op.inputs]
            o.outputs = [remap[t] for t in op.outputs]
            if op.options is not None:
                o.builtinOptionsType = getattr(s.BuiltinOptions, op.options_type)
                o.builtinOptions = op.options
            sub.operators.append(o)
        sub.inputs = [remap[t] for t in inputs]
        sub.outputs = [remap[t] for t in outputs]
        model.subgraphs = [sub]

        sig = s.SignatureDefT()
        sig.signatureKey = SIGNATURE_KEY
        sig.subgraphIndex = 0
        sig.inputs = [_tensor_map(s, self.tensors[t].name, remap[t]) for t in inputs]
        sig.outputs = [_tensor_map(s, self.tensors[t].name, remap[t]) for t in outputs]
        model.signatureDefs = [sig]

        if metadata:
            model.metadata = []
            for key, value in metadata.items():
                buf = _AlignedBufferT()
                buf.data = np.frombuffer(value, np.uint8)
                model.buffers.append(buf)
                entry = s.MetadataT()
                entry.name = key
                entry.buffer = len(model.buffers) - 1
                model.metadata.append(entry)

        size_hint = sum(t.data.nbytes for t in self.tensors if t.data is not None) + 1024 * (len(order) + 16)
        builder = flatbuffers.Builder(size_hint)
        builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
        return bytes(builder.Output())


def _tensor_map(s, name: str, index: int):
    m = s.TensorMapT()
    m.name = name
    m.tensorIndex = index
    return m


class _AlignedBufferT:
    """A ``BufferT`` whose bytes start on a 16-byte boundary (the object API aligns to 1 byte)."""

    def __init__(self) -> None:
        self.data: np.ndarray | None = None

    def Pack(self, builder):  # noqa: N802 - the object API's method name
        s = schema()
        vec = None
        if self.data is not None:
            payload = self.data.tobytes()
            builder.StartVector(1, len(payload), BUFFER_ALIGNMENT)
            builder.head = builder.head - len(payload)
            builder.Bytes[builder.head:builder.head + len(payload)] = payload
            vec = builder.EndVector()
        s.BufferStart(builder)
        if vec is not None:
            s.BufferAddData(builder, vec)
        return s.BufferEnd(builder)


def read_model(data: bytes):
    """The object-API ``ModelT`` of .tflite bytes."""
    s = schema()
    if len(data) < 8 or data[4:8] != FILE_IDENTIFIER:
        raise ValueError("not a TFLite FlatBuffer (no TFL3 identifier)")
    return s.ModelT.InitFromPackedBuf(bytearray(data), 0)


def buffer_span(data: bytes, index: int) -> tuple[int, int]:
    """(start, length) in ``data`` of buffer ``index``'s bytes, stored inside the FlatBuffer or, as
    litert-quantizer writes large models, after it (``offset`` / ``size``)."""
    import flatbuffers

    s = schema()
    buf = s.Model.GetRootAs(data, 0).Buffers(index)
    if buf.Offset() > 1:
        return int(buf.Offset()), int(buf.Size())
    if buf.DataIsNone():
        return 0, 0
    o = flatbuffers.number_types.UOffsetTFlags.py_type(buf._tab.Offset(4))
    return int(buf._tab.Vector(o)), int(buf.DataLength())


def builtin_op_names(path: str | Path) -> list[str]:
    """The operator code of every operator in a .tflite file: a builtin name, or ``CUSTOM:<code>``."""
    s = schema()
    names = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    model = s.Model.GetRootAs(Path(path).read_bytes(), 0)
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        if code == s.BuiltinOperator.CUSTOM:
            codes.append(f"CUSTOM:{(oc.CustomCode() or b'').decode()}")
        else:
            codes.append(names.get(code, f"UNKNOWN_{code}"))
    ops = []
    for g in range(model.SubgraphsLength()):
        sub = model.Subgraphs(g)
        for i in range(sub.OperatorsLength()):
            ops.append(codes[sub.Operators(i).OpcodeIndex()])
    return ops


def pack_model(model) -> bytes:
    """.tflite bytes of an object-API ``ModelT``, every buffer aligned as ``ModelBuilder`` aligns them."""
    import flatbuffers

    size = 1024
    for i, buf in enumerate(model.buffers or []):
        if getattr(buf, "offset", 0) > 1:
            raise ValueError(f"buffer {i} is stored outside the FlatBuffer; cannot repack it")
        aligned = _AlignedBufferT()
        aligned.data = None if buf.data is None or len(buf.data) == 0 else np.asarray(buf.data, np.uint8)
        size += 0 if aligned.data is None else aligned.data.nbytes + BUFFER_ALIGNMENT
        model.buffers[i] = aligned
    builder = flatbuffers.Builder(size)
    builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())
