"""The ONNX → TFLite lowering context: which TFLite tensor holds each ONNX value, in which axis
order, plus the helpers every operator lowering uses (constants, transposes, reshapes).

Operator lowerings register themselves with ``@lowers("Conv", check=..., constant_inputs=(1, 2))``;
``check(node, facts)`` returns why a node cannot be lowered (or None), so unsupported nodes are
reported with their names before any file is written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeopt.converters.targets.tflite import layout
from edgeopt.converters.targets.tflite.flatbuffer import ModelBuilder
from edgeopt.converters.targets.tflite.layout import Perm


@dataclass
class Node:
    """An ONNX node with its attributes decoded (missing optional inputs are '')."""

    proto: onnx.NodeProto
    op: str = ""
    name: str = ""
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, proto: onnx.NodeProto, index: int = 0) -> Node:
        attrs = {a.name: helper.get_attribute_value(a) for a in proto.attribute}
        for k, v in attrs.items():
            if isinstance(v, bytes):
                attrs[k] = v.decode()
            elif isinstance(v, list) and v and isinstance(v[0], bytes):
                attrs[k] = [x.decode() for x in v]
        return cls(proto, proto.op_type, proto.name or f"{proto.op_type}_{index}", list(proto.input),
                   list(proto.output), attrs)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def has_input(self, i: int) -> bool:
        return len(self.inputs) > i and self.inputs[i] != ""


@dataclass
class GraphFacts:
    """What a support check may know about the graph around a node (empty when checking one node)."""

    constants: dict[str, np.ndarray] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    opset: int = 17
    with_graph: bool = False  # False: constants/dtypes/shapes unknown, checks on them are skipped

    def const(self, name: str) -> np.ndarray | None:
        return self.constants.get(name)

    def is_const(self, name: str) -> bool:
        return name in self.constants


Check = Callable[[Node, GraphFacts], str | None]


@dataclass(frozen=True)
class OpRule:
    lower: Callable[[Lowering, Node], None]
    check: Check | None = None
    constant_inputs: tuple[int, ...] = ()  # input positions that must be constants (weights, axes...)
    float_only: bool = True  # every runtime input/output must be float32


RULES: dict[str, OpRule] = {}


def lowers(*ops: str, check: Check | None = None, constant_inputs: tuple[int, ...] = (), float_only: bool = True):
    def register(fn):
        for op in ops:
            RULES[op] = OpRule(fn, check, constant_inputs, float_only)
        return fn

    return register


def unsupported_reason(node: Node, facts: GraphFacts) -> str | None:
    """Why ``node`` cannot be lowered ('' for an unknown op type), or None when it can."""
    if node.proto.domain not in ("", "ai.onnx"):
        return ""
    rule = RULES.get(node.op)
    if rule is None:
        return ""
    if facts.with_graph:
        for i in rule.constant_inputs:
            if node.has_input(i) and not facts.is_const(node.inputs[i]):
                return f"input {i} must be a constant"
        if rule.float_only:
            names = [n for n in node.inputs if n and not facts.is_const(n)] + [n for n in node.outputs if n]
            bad = sorted({facts.dtypes[n] for n in names if facts.dtypes.get(n, "float32") != "float32"})
            if bad:
                return f"{'/'.join(bad)} tensors"
    if rule.check is not None:
        return rule.check(node, facts)
    return None


def dtype_of(elem_type: int) -> str:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name


def graph_facts(model: onnx.ModelProto) -> GraphFacts:
    g = model.graph
    constants = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            constants[node.output[0]] = _constant_node_value(node)
    dtypes, shapes = {}, {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.elem_type:
            dtypes[vi.name] = dtype_of(tt.elem_type)
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shapes[vi.name] = tuple(int(d.dim_value) for d in tt.shape.dim)
    for name, arr in constants.items():
        dtypes[name] = arr.dtype.name
        shapes[name] = tuple(arr.shape)
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    return GraphFacts(constants, dtypes, shapes, opset, with_graph=True)


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    attr = node.attribute[0]
    value = helper.get_attribute_value(attr)
    if attr.name == "value":
        return numpy_helper.to_array(value)
    if attr.name in ("value_float", "value_int"):
        return np.array(value, dtype=np.float32 if attr.name == "value_float" else np.int64)
    if attr.name in ("value_floats", "value_ints"):
        return np.array(value, dtype=np.float32 if attr.name == "value_floats" else np.int64)
    raise ValueError(f"Constant node '{node.name}': attribute {attr.name} is not supported")


@dataclass
class Value:
    tensor: int
    perm: Perm | None  # stored as onnx_value.transpose(perm); None: ONNX axis order


class LoweringError(Exception):
    """A node turned out not to be lowerable while lowering it (names the node)."""

    def __init__(self, node: Node, reason: str):
        self.node = node
        self.reason = reason
        super().__init__(f"{node.op} node '{node.name}': {reason}")


# Ops whose consumers make a rank-3/4 value prefer channels-last storage.
LAYOUT_SENSITIVE = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                    "InstanceNormalization", "Resize"}
# Ops that keep their input's axis order (so a graph input feeding them then a Conv is channels-last).
LAYOUT_TRANSPARENT = {"Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish",
                      "Exp", "Log", "Sqrt", "Abs", "Neg", "Identity", "Dropout", "Add", "Sub", "Mul", "Div",
                      "Max", "Min", "BatchNormalization", "Pow", "Erf", "Gelu", "Pad"}


class Lowering:
    """Lowers one canonical ONNX graph (static shapes, float32) into a ``ModelBuilder``."""

    def __init__(self, model: onnx.ModelProto, keep_io_layout: bool = False, full_integer: bool = False,
                 dynamic_recurrent_weights: bool = False):
        self.model = model
        self.facts = graph_facts(model)
        self.keep_io_layout = keep_io_layout
        # the float model will be quantized to full integer: prefer lowerings with integer kernels
        self.full_integer = full_integer
        # recurrent weights as an operator's output, not a constant (ops_rnn._recurrent_weights): for
        # modes that keep weights float (none, fp16), where XNNPACK would pack a copy per time step
        self.dynamic_recurrent_weights = dynamic_recurrent_weights
        self.b = ModelBuilder()
        self.values: dict[str, Value] = {}
        self._views: dict[tuple[str, Perm | None], int] = {}
        self._consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                self._consumers.setdefault(name, []).append(node)
        self.io_perms: dict[str, list[int]] = {}

    # -- facts -------------------------------------------------------------------------------
    @property
    def opset(self) -> int:
        return self.facts.opset

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.facts.shapes:
            raise KeyError(f"no static shape known for '{name}'")
        return self.facts.shapes[name]

    def rank(self, name: str) -> int:
        return len(self.shape(name))

    def is_const(self, name: str) -> bool:
        return self.facts.is_const(name)

    def const(self, name: str) -> np.ndarray:
        return self.facts.constants[name]

    def perm(self, name: str) -> Perm | None:
        """How value ``name`` is stored (None: ONNX order; constants can be had in any order)."""
        value = self.values.get(name)
        return value.perm if value is not None else None

    # -- tensors -----------------------------------------------------------------------------
    def tmp(self, hint: str, shape: Iterable[int], dtype: str = "float32") -> int:
        return self.b.tensor(hint, tuple(shape), dtype)

    def const_tensor(self, array: np.ndarray, hint: str) -> int:
        return self.b.constant(np.asarray(array), hint)

    def get(self, name: str, perm: Perm | None = None) -> int:
        """The tensor of value ``name`` stored with axis order ``perm`` (a TRANSPOSE is added, once,
        when it is stored otherwise)."""
        rank = len(self.shape(name))
        perm = layout.normalize(perm, rank)
        if self.is_const(name):
            arr = self.const(name)
            return self.const_tensor(arr if perm is None else np.transpose(arr, perm), name)
        value = self.values[name]
        if value.perm == perm:
            return value.tensor
        key = (name, perm)
        if key not in self._views:
            # stored = onnx.T(value.perm); wanted = onnx.T(perm) = stored.T(inverse(value.perm) ∘ perm)
            stored_perm = value.perm or layout.identity(rank)
            relative = layout.compose(layout.inverse(stored_perm), perm or layout.identity(rank))
            self._views[key] = self.transpose(value.tensor, relative, f"{name}/{_perm_tag(perm)}")
        return self._views[key]

    def get_stored(self, name: str) -> tuple[int, Perm | None]:
        """The tensor of ``name`` in whatever order it is stored (constants: ONNX order)."""
        if self.is_const(name):
            return self.get(name), None
        value = self.values[name]
        return value.tensor, value.perm

    def get_channels_last(self, name: str) -> int:
        return self.get(name, layout.channels_last(self.rank(name)))

    def output(self, name: str, perm: Perm | None = None, dtype: str = "float32") -> int:
        """A new tensor for ONNX output ``name`` stored with ``perm``, registered as its value."""
        perm = layout.normalize(perm, self.rank(name))
        t = self.b.tensor(name, layout.apply(self.shape(name), perm), dtype)
        self.values[name] = Value(t, perm)
        return t

    def alias(self, name: str, tensor: int, perm: Perm | None) -> None:
        """Value ``name`` is the existing ``tensor`` (an Identity, a no-op transpose)."""
        self.values[name] = Value(tensor, layout.normalize(perm, self.rank(name)))

    # -- emitting ----------------------------------------------------------------------------
    def op(self, builtin: str, inputs: list[int], outputs: list[int], options_type: str | None = None,
           **options: Any) -> None:
        self.b.op(builtin, inputs, outputs, options_type, **options)

    def unary(self, builtin: str, x: int, hint: str, options_type: str | None = None, **options: Any) -> int:
        out = self.tmp(hint, self.b.shape(x))
        self.op(builtin, [x], [out], options_type, **options)
        return out

    def binary(self, builtin: str, a: int, b: int, hint: str, out_shape: tuple[int, ...] | None = None) -> int:
        options_type = {"ADD": "AddOptions", "SUB": "SubOptions", "MUL": "MulOptions", "DIV": "DivOptions"}.get(builtin)
        shape = out_shape or tuple(np.broadcast_shapes(self.b.shape(a), self.b.shape(b)))
        out = self.tmp(hint, shape)
        if options_type:
            self.op(builtin, [a, b], [out], options_type, fusedActivationFunction=0)
        else:
            self.op(builtin, [a, b], [out])
        return out

    def transpose(self, x: int, perm: Perm, hint: str) -> int:
        out = self.tmp(hint, layout.apply(self.b.shape(x), perm), self.b.dtype(x))
        self.op("TRANSPOSE", [x, self.const_tensor(np.array(perm, np.int32), hint + "/perm")], [out])
        return out

    def reshape(self, x: int, shape: Iterable[int], hint: str, out: int | None = None) -> int:
        shape = tuple(int(d) for d in shape)
        if out is None:
            if self.b.shape(x) == shape:
                return x
            out = self.tmp(hint, shape, self.b.dtype(x))
        self.op("RESHAPE", [x, self.const_tensor(np.array(shape, np.int32), hint + "/shape")], [out],
                "ReshapeOptions", newShape=list(shape))
        return out

    def broadcast_to_rank(self, name: str, rank: int, perm: Perm | None) -> int:
        """Value ``name`` as a tensor of ``rank`` dims (leading 1s, as ONNX broadcasting aligns trailing
        dims) stored with ``perm``, ready for a TFLite broadcasting binary operator."""
        shape = self.shape(name)
        full = (1,) * (rank - len(shape)) + tuple(shape)
        if self.is_const(name):
            arr = self.const(name).reshape(full)
            return self.const_tensor(arr if perm is None else np.transpose(arr, perm), name)
        if len(shape) == rank:
            return self.get(name, perm)
        x = self.get(name)
        if perm is None or layout.same_memory_order(full, perm):
            return self.reshape(x, layout.apply(full, perm), f"{name}/rank{rank}")
        return self.transpose(self.reshape(x, full, f"{name}/rank{rank}"), perm, f"{name}/rank{rank}/t")

    # -- the whole graph ---------------------------------------------------------------------
    def input_perm(self, name: str) -> Perm | None:
        """Channels-last for a rank-3/4 graph input that feeds convolutions or pools (through
        elementwise ops), unless the caller keeps the ONNX I/O layout."""
        rank = len(self.shape(name))
        if self.keep_io_layout or rank not in (3, 4):
            return None
        seen, frontier = set(), [name]
        while frontier:
            value = frontier.pop()
            for node in self._consumers.get(value, []):
                if node.op_type in LAYOUT_SENSITIVE:
                    return layout.channels_last(rank)
                if node.op_type in LAYOUT_TRANSPARENT and node.output[0] not in seen:
                    seen.add(node.output[0])
                    frontier.append(node.output[0])
        return None

    def run(self) -> bytes:
        g = self.model.graph
        inputs = []
        for vi in g.input:
            if self.is_const(vi.name):
                continue
            perm = self.input_perm(vi.name)
            t = self.output(vi.name, perm, self.facts.dtypes.get(vi.name, "float32"))
            if perm is not None:
                self.io_perms[vi.name] = list(perm)
            inputs.append(t)
        for i, proto in enumerate(g.node):
            node = Node.of(proto, i)
            if node.op == "Constant":
                continue
            self.b.origin = (node.op, node.name)
            RULES[node.op].lower(self, node)
        self.b.origin = None
        outputs = []
        for vi in g.output:
            stored = self.perm(vi.name)
            # channels-last outputs stay so (the edge conversion); any other order goes back to ONNX's
            want = stored if not self.keep_io_layout and stored == layout.channels_last(self.rank(vi.name)) \
                else None
            t = self.get(vi.name, want)
            if t in inputs or t in outputs or self.b.data(t) is not None:
                copy = self.tmp(vi.name, self.b.shape(t), self.b.dtype(t))
                self.reshape(t, self.b.shape(t), vi.name, out=copy)
                t = copy
            self.b.rename(t, vi.name)
            if want is not None:
                self.io_perms[vi.name] = list(want)
            outputs.append(t)
        for vi, t in zip([v for v in g.input if not self.is_const(v.name)], inputs, strict=True):
            self.b.rename(t, vi.name)
        return self.b.finish(inputs, outputs)


def _perm_tag(perm: Perm | None) -> str:
    return "onnx_order" if perm is None else "perm" + "".join(map(str, perm))
