"""``unroll-rnn``: rewrite ONNX LSTM and GRU nodes as the elementary ops they compute, unrolled over
the (fixed) sequence length.

Compilers whose ONNX front end has no recurrent ops (TVM 0.27's Relax importer converts neither
LSTM nor GRU) can compile the result: MatMul, Add, Mul, Sub, Sigmoid, Tanh, Split, Gather,
Unsqueeze, Concat. No library does this rewrite (ONNX gives LSTM/GRU no function body to inline,
and onnxslim/onnxsim keep them whole), so it is written here, following the equations of the
ONNX operator specification. The input projection of every time step is one MatMul over the whole
sequence; only the recurrent part is unrolled.

Supported: default activations, ``direction`` forward / reverse / bidirectional, ``layout`` 0,
peepholes (LSTM), ``linear_before_reset`` 0 or 1 (GRU), optional initial states, constant W / R /
B. Not supported (the node is reported by name instead): ``clip``, ``input_forget``, ``layout`` 1, custom
activations, ``sequence_lens``, a sequence length that is not fixed.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeopt.converters.passes import ConversionError, Pass, PassContext
from edgeopt.errors import UnsupportedOpsError
from edgeopt.onnx_io import opset_version
from edgeopt.params import Param

DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"]}


def rnn_node_supported(node: onnx.NodeProto) -> bool:
    """Whether ``unroll-rnn`` can rewrite this LSTM/GRU node (judged from its attributes and inputs)."""
    if node.op_type not in DEFAULT_ACTIVATIONS or node.domain not in ("", "ai.onnx"):
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    acts = [a.decode() if isinstance(a, bytes) else a for a in attrs.get("activations", [])]
    n_dirs = 2 if attrs.get("direction", b"forward") in (b"bidirectional", "bidirectional") else 1
    if acts and acts != DEFAULT_ACTIVATIONS[node.op_type] * n_dirs:
        return False
    if "clip" in attrs or attrs.get("input_forget", 0) or attrs.get("layout", 0):
        return False  # layout 1 too: ONNX Runtime has no kernel for it, so the rewrite could not be checked
    return not (len(node.input) > 4 and node.input[4])  # sequence_lens


class _Graph:
    """Emits nodes and constants with unique names derived from the node being rewritten."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}/{hint}_{self._n}"

    def const(self, array: np.ndarray, hint: str) -> str:
        name = self.name(hint)
        # (np.ascontiguousarray would turn a 0-d index into shape [1])
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int = 1, **attrs) -> list[str]:
        names = [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=names[0], **attrs))
        return names

    def op1(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        return self.op(op_type, inputs, hint, **attrs)[0]


class UnrollRnn(Pass):
    name: ClassVar[str] = "unroll-rnn"
    summary: ClassVar[str] = "rewrite LSTM/GRU as elementary ops unrolled over the fixed sequence length"
    min_opset: ClassVar[int | None] = 13  # Split/Unsqueeze with tensor inputs
    params: ClassVar[tuple[Param, ...]] = (
        Param("max_steps", int, 512, "refuse to unroll a sequence longer than this (the graph grows per step)",
              check=lambda v: None if v >= 1 else "must be >= 1"),
    )

    def _apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        graph = model.graph
        if not any(n.op_type in DEFAULT_ACTIVATIONS for n in graph.node):
            return model
        unsupported = {}
        for i, node in enumerate(graph.node):
            if node.op_type in DEFAULT_ACTIVATIONS and not rnn_node_supported(node):
                unsupported.setdefault(node.op_type, []).append(node.name or f"#{i}")
        if unsupported:
            raise UnsupportedOpsError(self.name, unsupported)
        if opset_version(model) is not None and opset_version(model) < 13:
            raise ConversionError(f"unroll-rnn needs ONNX opset >= 13 (Split/Unsqueeze with tensor inputs); "
                                  f"the model has opset {opset_version(model)}")
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        graph = model.graph
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
                  for vi in list(graph.input) + list(graph.value_info)}
        new_nodes: list[onnx.NodeProto] = []
        rewritten = 0
        for i, node in enumerate(graph.node):
            if node.op_type not in DEFAULT_ACTIVATIONS:
                new_nodes.append(node)
                continue
            g = _Graph(node.name or f"{node.op_type}_{i}")
            _unroll(node, g, inits, shapes, self.config["max_steps"])
            new_nodes.extend(g.nodes)
            graph.initializer.extend(g.initializers)
            rewritten += 1
        del graph.node[:]
        graph.node.extend(new_nodes)
        ctx.details[self.name] = {"unrolled_nodes": rewritten}
        return model


def _unroll(node: onnx.NodeProto, g: _Graph, inits: dict[str, np.ndarray], shapes: dict[str, list],
            max_steps: int) -> None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    where = f"{node.op_type} node '{node.name}'"
    inputs = list(node.input) + [""] * (8 - len(node.input))
    for idx, what in ((1, "W"), (2, "R"), (3, "B")):
        if inputs[idx] and inputs[idx] not in inits:
            raise ConversionError(f"unroll-rnn: {where}: input {what} must be a constant (initializer)")
    layout = int(attrs.get("layout", 0))
    x_shape = shapes.get(inputs[0])
    steps = x_shape[1 if layout else 0] if x_shape else None
    if not steps:
        raise ConversionError(f"unroll-rnn: {where}: the sequence length of input '{inputs[0]}' is not fixed; "
                              f"fix it with --input-shape")
    if steps > max_steps:
        raise ConversionError(f"unroll-rnn: {where}: sequence length {steps} exceeds max_steps {max_steps}")
    hidden = int(attrs["hidden_size"])
    direction = attrs.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    dirs = ["forward", "reverse"] if direction == "bidirectional" else [direction]
    lstm = node.op_type == "LSTM"
    gates = 4 if lstm else 3

    x = inputs[0] if layout == 0 else g.op1("Transpose", [inputs[0]], "x_seq_first", perm=[1, 0, 2])
    w, r = inits[inputs[1]], inits[inputs[2]]
    b = inits[inputs[3]] if inputs[3] else np.zeros((len(dirs), 2 * gates * hidden), w.dtype)
    init_h = _initial_state(g, inputs[5], layout, len(dirs))
    init_c = _initial_state(g, inputs[6], layout, len(dirs)) if lstm else [None] * len(dirs)
    peep = inits.get(inputs[7]) if lstm and inputs[7] else None
    if lstm and inputs[7] and peep is None:
        raise ConversionError(f"unroll-rnn: {where}: input P must be a constant (initializer)")

    ys, last_h, last_c = [], [], []
    for d, name in enumerate(dirs):
        wb, rb = b[d, :gates * hidden], b[d, gates * hidden:]
        if lstm:
            # X·W^T + Wb + Rb for every step at once: [S, B, 4H]
            xw = g.op1("Add", [g.op1("MatMul", [x, g.const(w[d].T, "w_t")]), g.const(wb + rb, "bias")], "xw")
            step = _lstm_step(g, r[d].T, None if peep is None else peep[d], hidden)
        else:
            # z and r gates take both biases; the h gate's recurrent bias depends on linear_before_reset
            bias = np.concatenate([wb[:2 * hidden] + rb[:2 * hidden], wb[2 * hidden:]])
            xw = g.op1("Add", [g.op1("MatMul", [x, g.const(w[d].T, "w_t")]), g.const(bias, "bias")], "xw")
            step = _gru_step(g, r[d].T, rb[2 * hidden:], hidden, int(attrs.get("linear_before_reset", 0)))
        order = range(steps) if name == "forward" else range(steps - 1, -1, -1)
        h, c = init_h[d], init_c[d]
        outs: dict[int, str] = {}
        for t in order:
            xw_t = g.op1("Gather", [xw, g.const(np.array(t, np.int64), "t")], "xw_t", axis=0)  # [B, G*H]
            h, c = step(xw_t, h, c)
            outs[t] = h
        ys.append([outs[t] for t in range(steps)])
        last_h.append(h)
        last_c.append(c)
    _write_outputs(node, g, ys, last_h, last_c, layout)


def _initial_state(g: _Graph, name: str, layout: int, n_dirs: int) -> list[str | None]:
    """Per direction, the [B, H] initial state, or None when it is absent (zeros)."""
    if not name:
        return [None] * n_dirs
    axis = 1 if layout else 0
    return [g.op1("Gather", [name, g.const(np.array(d, np.int64), "dir")], "h0", axis=axis) for d in range(n_dirs)]


def _lstm_step(g: _Graph, r_t: np.ndarray, peep: np.ndarray | None, hidden: int):
    """One LSTM step (ONNX gate order i, o, f, c; peepholes P = [Pi, Po, Pf])."""
    r_name = g.const(r_t, "r_t")
    quarters = g.const(np.array([hidden] * 4, np.int64), "split")
    p = [g.const(peep[k * hidden:(k + 1) * hidden], f"p{k}") for k in range(3)] if peep is not None else None

    def step(xw_t: str, h: str | None, c: str | None) -> tuple[str, str]:
        pre = xw_t if h is None else g.op1("Add", [xw_t, g.op1("MatMul", [h, r_name])], "gates")
        i, o, f, cand = g.op("Split", [pre, quarters], "gate", outputs=4, axis=-1)
        if p is not None and c is not None:
            i = g.op1("Add", [i, g.op1("Mul", [c, p[0]])])
            f = g.op1("Add", [f, g.op1("Mul", [c, p[2]])])
        i, f = g.op1("Sigmoid", [i]), g.op1("Sigmoid", [f])
        ic = g.op1("Mul", [i, g.op1("Tanh", [cand])])
        c_new = ic if c is None else g.op1("Add", [g.op1("Mul", [f, c]), ic], "c")
        if p is not None:
            o = g.op1("Add", [o, g.op1("Mul", [c_new, p[1]])])
        h_new = g.op1("Mul", [g.op1("Sigmoid", [o]), g.op1("Tanh", [c_new])], "h")
        return h_new, c_new

    return step


def _gru_step(g: _Graph, r_t: np.ndarray, rb_h: np.ndarray, hidden: int, linear_before_reset: int):
    """One GRU step (ONNX gate order z, r, h)."""
    r_zr = g.const(r_t[:, :2 * hidden], "r_zr")
    r_h = g.const(r_t[:, 2 * hidden:], "r_h")
    rb_h_name = g.const(rb_h, "rb_h")
    halves = g.const(np.array([hidden, hidden], np.int64), "split")
    one = g.const(np.ones((), r_t.dtype), "one")

    def step(xw_t: str, h: str | None, _c: None) -> tuple[str, None]:
        xw_zr, xw_h = g.op("Split", [xw_t, g.const(np.array([2 * hidden, hidden], np.int64), "split")],
                           "xw", outputs=2, axis=-1)
        zr = xw_zr if h is None else g.op1("Add", [xw_zr, g.op1("MatMul", [h, r_zr])])
        z, r = g.op("Split", [g.op1("Sigmoid", [zr]), halves], "zr", outputs=2, axis=-1)
        if h is None:  # H = 0: only the recurrent bias is left
            rec = g.op1("Mul", [r, rb_h_name]) if linear_before_reset else rb_h_name
        elif linear_before_reset:
            rec = g.op1("Mul", [r, g.op1("Add", [g.op1("MatMul", [h, r_h]), rb_h_name])])
        else:
            rec = g.op1("Add", [g.op1("MatMul", [g.op1("Mul", [r, h]), r_h]), rb_h_name])
        cand = g.op1("Tanh", [g.op1("Add", [xw_h, rec])])
        one_minus_z = g.op1("Sub", [one, z])
        h_new = g.op1("Mul", [one_minus_z, cand], "h")
        if h is not None:
            h_new = g.op1("Add", [h_new, g.op1("Mul", [z, h])], "h")
        return h_new, None

    return step


def _write_outputs(node: onnx.NodeProto, g: _Graph, ys: list[list[str]], last_h: list[str],
                   last_c: list[str | None], layout: int) -> None:
    """Y [S, D, B, H] (layout 0) or [B, S, D, H]; Y_h / Y_c [D, B, H] or [B, D, H]."""
    outputs = list(node.output) + [""] * (3 - len(node.output))
    zero = g.const(np.array([0], np.int64), "axis0")
    if outputs[0]:
        per_dir = [g.op1("Concat", [g.op1("Unsqueeze", [h, zero]) for h in steps], "y_dir", axis=0) for steps in ys]
        y = g.op1("Concat", [g.op1("Unsqueeze", [yd, g.const(np.array([1], np.int64), "axis1")]) for yd in per_dir],
                  "y", axis=1)  # [S, D, B, H]
        g.nodes.append(helper.make_node("Transpose" if layout else "Identity", [y], [outputs[0]],
                                        name=g.name("Y"), **({"perm": [2, 0, 1, 3]} if layout else {})))
    for out, states in ((outputs[1], last_h), (outputs[2], last_c)):
        if not out:
            continue
        if any(s is None for s in states):
            raise ConversionError(f"unroll-rnn: {node.op_type} node '{node.name}' has a zero-length sequence")
        stacked = g.op1("Concat", [g.op1("Unsqueeze", [s, zero]) for s in states], "state", axis=0)  # [D, B, H]
        g.nodes.append(helper.make_node("Transpose" if layout else "Identity", [stacked], [out],
                                        name=g.name("state_out"), **({"perm": [1, 0, 2]} if layout else {})))
