"""LSTM and GRU, unrolled over the (static) sequence length into builtin operators.

Why unrolled rather than UNIDIRECTIONAL_SEQUENCE_LSTM: TFLite's sequence LSTM keeps its state in
variable tensors that persist across invocations, has no final cell-state output and no GRU
counterpart, and its full-integer quantization needs extra calibrated intermediates. The unrolled
graph (one FULLY_CONNECTED for the input projection of all time steps, then per step a
FULLY_CONNECTED on the previous state -- its weights read through one RESHAPE in float modes, see
``_recurrent_weights`` --, SPLIT, LOGISTIC / TANH, MUL, ADD) is stateless, exact to float
rounding, supports initial states, peepholes, reverse and bidirectional directions, and quantizes
like any other graph. Every operator in it is a builtin that TFLite Micro also has.
"""

from __future__ import annotations

import numpy as np

from edgeopt.converters.targets.tflite.lowering import GraphFacts, Lowering, Node, lowers
from edgeopt.converters.targets.tflite.ops_dense import fully_connected

_DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"]}


def _directions(node: Node) -> list[str]:
    direction = node.attr("direction", "forward")
    return ["forward", "reverse"] if direction == "bidirectional" else [direction]


def _check_rnn(node: Node, facts: GraphFacts) -> str | None:
    if node.attr("direction", "forward") not in ("forward", "reverse", "bidirectional"):
        return f"direction={node.attr('direction')}"
    acts = node.attr("activations")
    if acts is not None and [a.lower() for a in acts] != [a.lower() for a in
                                                          _DEFAULT_ACTIVATIONS[node.op] * len(_directions(node))]:
        return "non-default activations"
    if node.attr("clip") is not None:
        return "clip"
    if node.attr("input_forget", 0):
        return "input_forget"
    if facts.with_graph and node.has_input(4):
        lens = facts.const(node.inputs[4])
        x_shape = facts.shapes.get(node.inputs[0])
        if lens is not None and x_shape is not None:
            steps = x_shape[1] if node.attr("layout", 0) else x_shape[0]
            if (lens != steps).any():
                return "sequence_lens shorter than the sequence"
    return None


class _Sequence:
    """The input of one direction projected for every time step: a list of (N, gates * H) tensors."""

    def __init__(self, ctx: Lowering, node: Node, weights: np.ndarray, bias: np.ndarray, hint: str):
        x_name = node.inputs[0]
        shape = ctx.shape(x_name)
        self.batch_major = bool(node.attr("layout", 0))
        self.steps = shape[1] if self.batch_major else shape[0]
        batch = shape[0] if self.batch_major else shape[1]
        x = ctx.get(x_name)
        projected = fully_connected(ctx, x, weights, bias, None, hint + "/x_proj", keep_num_dims=True)
        axis = 1 if self.batch_major else 0
        width = weights.shape[0]
        if self.steps == 1:
            self.per_step = [ctx.reshape(projected, (batch, width), hint + "/x_t0")]
        else:
            self.per_step = [ctx.tmp(f"{hint}/x_t{t}", (batch, width)) for t in range(self.steps)]
            ctx.op("UNPACK", [projected], self.per_step, "UnpackOptions", num=self.steps, axis=axis)


def _split(ctx: Lowering, x: int, sizes: list[int], hint: str) -> list[int]:
    batch = ctx.b.shape(x)[0]
    outs = [ctx.tmp(f"{hint}{i}", (batch, s)) for i, s in enumerate(sizes)]
    axis = ctx.const_tensor(np.array(1, np.int32), hint + "/axis")
    if len(set(sizes)) == 1:
        ctx.op("SPLIT", [axis, x], outs, "SplitOptions", numSplits=len(sizes))
    else:
        ctx.op("SPLIT_V", [x, ctx.const_tensor(np.array(sizes, np.int32), hint + "/sizes"), axis], outs,
               "SplitVOptions", numSplits=len(sizes))
    return outs


def _initial_state(ctx: Lowering, node: Node, index: int, direction: int, hidden: int) -> int | None:
    """Direction ``direction`` of initial_h / initial_c (input ``index``): (N, H), or None for zeros."""
    if not node.has_input(index):
        return None
    name = node.inputs[index]
    batch_major = bool(node.attr("layout", 0))
    if ctx.is_const(name):
        arr = ctx.const(name).astype(np.float32)
        arr = arr[:, direction] if batch_major else arr[direction]
        return None if not arr.any() else ctx.const_tensor(arr, f"{name}/dir{direction}")
    x = ctx.get(name)
    shape = ctx.shape(name)
    batch = shape[0] if batch_major else shape[1]
    if shape[1 if batch_major else 0] == 1:
        return ctx.reshape(x, (batch, hidden), f"{name}/dir{direction}")
    begin = [0, direction, 0] if batch_major else [direction, 0, 0]
    size = [batch, 1, hidden] if batch_major else [1, batch, hidden]
    part = ctx.tmp(f"{name}/dir{direction}/slice", size)
    ctx.op("SLICE", [x, ctx.const_tensor(np.array(begin, np.int32), f"{name}/dir{direction}/begin"),
                     ctx.const_tensor(np.array(size, np.int32), f"{name}/dir{direction}/size")], [part])
    return ctx.reshape(part, (batch, hidden), f"{name}/dir{direction}")


def _emit_outputs(ctx: Lowering, node: Node, per_direction: list[tuple[list[int], list[int]]]) -> None:
    """Y (all hidden states) and the final states (Y_h, and Y_c for LSTM) from each direction's
    per-step hidden states and final states."""
    batch_major = bool(node.attr("layout", 0))
    outputs = node.outputs + [""] * (3 - len(node.outputs))
    y_name, final_names = outputs[0], outputs[1:]
    if y_name:
        stacked = []
        for d, (hs, _) in enumerate(per_direction):
            batch, hidden = ctx.b.shape(hs[0])
            seq = (batch, len(hs), hidden) if batch_major else (len(hs), batch, hidden)
            t = ctx.tmp(f"{node.name}/y_dir{d}", seq)
            if len(hs) == 1:
                ctx.reshape(hs[0], seq, f"{node.name}/y_dir{d}", out=t)
            else:
                ctx.op("PACK", hs, [t], "PackOptions", valuesCount=len(hs), axis=1 if batch_major else 0)
            stacked.append(t)
        _stack(ctx, stacked, 2 if batch_major else 1, y_name)
    for k, name in enumerate(final_names):
        if name:
            _stack(ctx, [finals[k] for _, finals in per_direction], 1 if batch_major else 0, name)


def _stack(ctx: Lowering, tensors: list[int], axis: int, name: str) -> None:
    out = ctx.output(name)
    if len(tensors) == 1:
        ctx.reshape(tensors[0], ctx.shape(name), name, out=out)
    else:
        ctx.op("PACK", tensors, [out], "PackOptions", valuesCount=len(tensors), axis=axis)


# -- LSTM -----------------------------------------------------------------------------------------------
@lowers("LSTM", check=_check_rnn, constant_inputs=(1, 2, 3, 4, 7))
def lower_lstm(ctx: Lowering, node: Node) -> None:
    """ONNX gate order i, o, f, c: i = σ(Xi + Hi (+ Pi c)), f = σ(...), c' = f c + i tanh(Xc + Hc),
    o = σ(Xo + Ho (+ Po c')), h' = o tanh(c')."""
    w, r = ctx.const(node.inputs[1]).astype(np.float32), ctx.const(node.inputs[2]).astype(np.float32)
    hidden = r.shape[-1]
    b = ctx.const(node.inputs[3]).astype(np.float32) if node.has_input(3) else np.zeros((w.shape[0], 8 * hidden),
                                                                                       np.float32)
    p = ctx.const(node.inputs[7]).astype(np.float32) if node.has_input(7) else None
    results = []
    for d, direction in enumerate(_directions(node)):
        hint = f"{node.name}/{direction}"
        seq = _Sequence(ctx, node, w[d], b[d, :4 * hidden] + b[d, 4 * hidden:], hint)
        h = _initial_state(ctx, node, 5, d, hidden)
        c = _initial_state(ctx, node, 6, d, hidden)
        peep = None if p is None else [ctx.const_tensor(p[d, k * hidden:(k + 1) * hidden][None], f"{hint}/p{k}")
                                       for k in range(3)]  # i, o, f
        order = range(seq.steps) if direction == "forward" else range(seq.steps - 1, -1, -1)
        hs = [0] * seq.steps
        r_d = _recurrent_weights(ctx, r[d], hint + "/r")
        for t in order:
            h, c = _lstm_step(ctx, seq.per_step[t], h, c, r_d, peep, hidden, f"{hint}/t{t}")
            hs[t] = h
        results.append((hs, [h, c]))
    _emit_outputs(ctx, node, results)


def _recurrent_weights(ctx: Lowering, r: np.ndarray, hint: str) -> int:
    """The recurrent weights every step's FULLY_CONNECTED reads: one constant tensor, passed through a
    RESHAPE to its own shape when ``ctx.dynamic_recurrent_weights``.

    XNNPACK packs the weights of each FULLY_CONNECTED it delegates separately, so one constant read by
    T steps is held T + 1 times: the ddddocr CRNN (bidirectional LSTM, H=512, 32 steps) took 398 MiB
    in LiteRT for a 52 MiB model. As the output of an operator the weights are not constant to
    XNNPACK, which then runs those products without a packed copy each: 140 MiB, and 73 -> 59 ms per
    call on an AVX2 EPYC (1 thread). Not for integer modes, which quantize weights only when constant."""
    weights = ctx.const_tensor(r, hint)
    if not ctx.dynamic_recurrent_weights:
        return weights
    out = ctx.tmp(hint + "/value", r.shape, "float32")
    ctx.op("RESHAPE", [weights, ctx.const_tensor(np.array(r.shape, np.int32), hint + "/shape")], [out],
           "ReshapeOptions", newShape=list(r.shape))
    return out


def _lstm_step(ctx: Lowering, x_t: int, h: int | None, c: int | None, r: int, peep, hidden: int,
               hint: str) -> tuple[int, int]:
    gates = x_t if h is None else ctx.binary("ADD", x_t, fully_connected(ctx, h, r, None, None, hint + "/h_proj"),
                                             hint + "/gates")
    gi, go, gf, gc = _split(ctx, gates, [hidden] * 4, hint + "/gate")
    if peep is not None and c is not None:
        gi = ctx.binary("ADD", gi, ctx.binary("MUL", c, peep[0], hint + "/pi_c"), hint + "/gi_p")
        gf = ctx.binary("ADD", gf, ctx.binary("MUL", c, peep[2], hint + "/pf_c"), hint + "/gf_p")
    i = ctx.unary("LOGISTIC", gi, hint + "/i")
    candidate = ctx.unary("TANH", gc, hint + "/c_cand")
    c_new = ctx.binary("MUL", i, candidate, hint + "/i_c")
    if c is not None:
        f = ctx.unary("LOGISTIC", gf, hint + "/f")
        c_new = ctx.binary("ADD", ctx.binary("MUL", f, c, hint + "/f_c"), c_new, hint + "/c")
    if peep is not None:
        go = ctx.binary("ADD", go, ctx.binary("MUL", c_new, peep[1], hint + "/po_c"), hint + "/go_p")
    o = ctx.unary("LOGISTIC", go, hint + "/o")
    h_new = ctx.binary("MUL", o, ctx.unary("TANH", c_new, hint + "/tanh_c"), hint + "/h")
    return h_new, c_new


# -- GRU ------------------------------------------------------------------------------------------------
@lowers("GRU", check=_check_rnn, constant_inputs=(1, 2, 3, 4))
def lower_gru(ctx: Lowering, node: Node) -> None:
    """ONNX gate order z, r, h: z = σ(Xz + Hz), r = σ(Xr + Hr),
    h~ = tanh(Xh + (r h) Rh^T + Rbh) or, with linear_before_reset, tanh(Xh + r (h Rh^T + Rbh)),
    h' = h~ + z (h - h~)."""
    w, r = ctx.const(node.inputs[1]).astype(np.float32), ctx.const(node.inputs[2]).astype(np.float32)
    hidden = r.shape[-1]
    b = ctx.const(node.inputs[3]).astype(np.float32) if node.has_input(3) else np.zeros((w.shape[0], 6 * hidden),
                                                                                       np.float32)
    before_reset = bool(node.attr("linear_before_reset", 0))
    results = []
    for d, direction in enumerate(_directions(node)):
        hint = f"{node.name}/{direction}"
        wb, rb = b[d, :3 * hidden], b[d, 3 * hidden:]
        x_bias = np.concatenate([wb[:2 * hidden] + rb[:2 * hidden],
                                 wb[2 * hidden:] + (0 if before_reset else rb[2 * hidden:])])
        seq = _Sequence(ctx, node, w[d], x_bias, hint)
        h = _initial_state(ctx, node, 5, d, hidden)
        rbh = rb[2 * hidden:]
        order = range(seq.steps) if direction == "forward" else range(seq.steps - 1, -1, -1)
        hs = [0] * seq.steps
        r_zr, r_h = (_recurrent_weights(ctx, part, f"{hint}/{tag}")
                     for part, tag in ((r[d, :2 * hidden], "r_zr"), (r[d, 2 * hidden:], "r_h")))
        for t in order:
            h = _gru_step(ctx, seq.per_step[t], h, r_zr, r_h, rbh, before_reset, hidden, f"{hint}/t{t}")
            hs[t] = h
        results.append((hs, [h]))
    _emit_outputs(ctx, node, results)


def _gru_step(ctx: Lowering, x_t: int, h: int | None, r_zr: int, r_h: int, rbh: np.ndarray, before_reset: bool,
              hidden: int, hint: str) -> int:
    x_zr, x_h = _split(ctx, x_t, [2 * hidden, hidden], hint + "/x")
    zr_in = x_zr if h is None else ctx.binary(
        "ADD", x_zr, fully_connected(ctx, h, r_zr, None, None, hint + "/h_zr"), hint + "/zr_in")
    z, reset = _split(ctx, ctx.unary("LOGISTIC", zr_in, hint + "/zr"), [hidden, hidden], hint + "/gate")
    if before_reset:
        recurrent = ctx.const_tensor(rbh[None], hint + "/rbh") if h is None else \
            fully_connected(ctx, h, r_h, rbh, None, hint + "/h_h")
        candidate_in = ctx.binary("ADD", x_h, ctx.binary("MUL", reset, recurrent, hint + "/r_hh"), hint + "/hc_in")
    elif h is None:
        candidate_in = x_h
    else:
        reset_h = ctx.binary("MUL", reset, h, hint + "/r_h")
        candidate_in = ctx.binary("ADD", x_h, fully_connected(ctx, reset_h, r_h, None, None,
                                                              hint + "/rh_h"), hint + "/hc_in")
    candidate = ctx.unary("TANH", candidate_in, hint + "/h_cand")
    if h is None:  # h' = (1 - z) h~
        return ctx.binary("SUB", candidate, ctx.binary("MUL", z, candidate, hint + "/z_hc"), hint + "/h")
    return ctx.binary("ADD", candidate, ctx.binary("MUL", z, ctx.binary("SUB", h, candidate, hint + "/h_minus"),
                                                   hint + "/z_diff"), hint + "/h")
