"""Recurrent layers → MIL: ONNX LSTM as Core ML's ``lstm`` op, ONNX GRU unrolled over time.

Gate orders differ: ONNX stacks LSTM gates as (input, output, forget, cell), Core ML as (input,
forget, output, cell) — the order coremltools' own PyTorch front end produces for ``mb.lstm``.
Core ML's ``gru`` op has a single bias per gate (no separate recurrent bias inside the reset
product), so it cannot express PyTorch/ONNX GRUs with ``linear_before_reset=1``; like coremltools'
PyTorch front end, the GRU is built from linear / sigmoid / tanh ops instead — here unrolled over
the (static) sequence length.
"""

from __future__ import annotations

import numpy as np

from edgeopt.converters.targets.coreml.rules import LoweringError, rule

LSTM_TO_COREML = (0, 2, 1, 3)  # ONNX (i, o, f, c) blocks → Core ML (i, f, o, z)


def _rnn_check(default_activations: list[str]):
    def check(node, attrs):
        if attrs.get("clip") is not None:
            return "clip"
        if attrs.get("input_forget", 0):
            return "input_forget=1"
        acts = attrs.get("activations")
        if acts:
            dirs = 2 if attrs.get("direction", "forward") == "bidirectional" else 1
            if [a.decode() if isinstance(a, bytes) else a for a in acts] != default_activations * dirs:
                return f"activations={[a.decode() if isinstance(a, bytes) else a for a in acts]}"
        if attrs.get("activation_alpha") or attrs.get("activation_beta"):
            return "activation_alpha/beta"
        return None

    return check


def _check_lstm(node, attrs):
    if len(node.input) > 7 and node.input[7]:
        return "peephole weights (input P)"
    return _rnn_check(["Sigmoid", "Tanh", "Tanh"])(node, attrs)


def _sequence_input(cx, node, attrs):
    """The input as [seq, batch, features], and whether the node uses the batch-first layout."""
    x = cx.input(node, 0)
    batch_first = bool(attrs.get("layout", 0))
    if batch_first:
        x = cx.mb.transpose(x=x, perm=[1, 0, 2])
    seq, batch, _ = cx.shape(x)
    if cx.has(node, 4):
        lens = np.asarray(cx.const(node, 4)).reshape(-1)
        if not np.all(lens == seq):
            raise LoweringError("sequence_lens shorter than the sequence (variable-length batches)")
    return x, seq, batch, batch_first


def _initial_state(cx, node, i: int, dirs: int, batch: int, hidden: int, batch_first: bool):
    """Initial state [dirs, batch, H] (or [batch, dirs, H] batch-first) → per direction [batch, H]."""
    if not cx.has(node, i):
        return [np.zeros((batch, hidden), np.float32)] * dirs
    state = cx.input(node, i)
    if isinstance(state, np.ndarray):
        state = state.astype(np.float32)
        return [np.ascontiguousarray(state[:, d] if batch_first else state[d]) for d in range(dirs)]
    axis = 1 if batch_first else 0
    out = []
    for d in range(dirs):
        begin, end = [0, 0, 0], [*cx.shape(state)]
        begin[axis], end[axis] = d, d + 1
        mask = [a == axis for a in range(3)]
        out.append(cx.mb.slice_by_index(x=state, begin=begin, end=end, squeeze_mask=mask))
    return out


def _join_directions(cx, per_dir):
    """Core ML's bidirectional state: [batch, 2H], forward half first."""
    if len(per_dir) == 1:
        return per_dir[0]
    if all(isinstance(p, np.ndarray) for p in per_dir):
        return np.concatenate(per_dir, axis=1)
    return cx.mb.concat(values=per_dir, axis=1)


def _reorder(matrix: np.ndarray, blocks: int, order) -> np.ndarray:
    parts = np.split(matrix, blocks, axis=0)
    return np.ascontiguousarray(np.concatenate([parts[i] for i in order], axis=0).astype(np.float32))


def _directional_outputs(cx, node, y, h, c, seq, batch, dirs, hidden, batch_first):
    """Core ML's [seq, batch, dirs*H] / [batch, dirs*H] → ONNX Y [seq, dirs, batch, H] and
    Y_h / Y_c [dirs, batch, H] (batch-first: [batch, seq, dirs, H] and [batch, dirs, H])."""
    outs = []
    wanted = [bool(o) for o in node.output] + [False] * (3 - len(node.output))
    if wanted[0]:
        y4 = cx.mb.reshape(x=y, shape=[seq, batch, dirs, hidden])
        outs.append(cx.mb.transpose(x=y4, perm=[1, 0, 2, 3] if batch_first else [0, 2, 1, 3], name=cx.name("_Y")))
    else:
        outs.append(None)
    for state, suffix, want in ((h, "_Y_h", wanted[1]), (c, "_Y_c", wanted[2])):
        if not want or state is None:
            outs.append(None)
            continue
        s3 = cx.mb.reshape(x=state, shape=[batch, dirs, hidden], **cx.name_if(batch_first, suffix))
        outs.append(s3 if batch_first else cx.mb.transpose(x=s3, perm=[1, 0, 2], name=cx.name(suffix)))
    return outs


@rule("LSTM", check=_check_lstm, const_inputs=(1, 2, 3, 4))
def lstm(cx, node, attrs):
    x, seq, batch, batch_first = _sequence_input(cx, node, attrs)
    w, r = cx.const(node, 1), cx.const(node, 2)
    dirs, hidden = w.shape[0], r.shape[-1]
    bias = cx.const(node, 3) if cx.has(node, 3) else np.zeros((dirs, 8 * hidden), np.float32)
    direction = attrs.get("direction", "forward")
    weights = []
    for d in range(dirs):
        weights.append({
            "weight_ih": _reorder(w[d], 4, LSTM_TO_COREML),
            "weight_hh": _reorder(r[d], 4, LSTM_TO_COREML),
            "bias": _reorder(bias[d][:4 * hidden] + bias[d][4 * hidden:], 4, LSTM_TO_COREML),
        })
    h0 = _join_directions(cx, _initial_state(cx, node, 5, dirs, batch, hidden, batch_first))
    c0 = _join_directions(cx, _initial_state(cx, node, 6, dirs, batch, hidden, batch_first))
    kwargs = dict(weights[0])
    if dirs == 2:
        kwargs.update({f"{k}_back": v for k, v in weights[1].items()})
    y, h, c = cx.mb.lstm(x=x, initial_h=h0, initial_c=c0, direction=direction, output_sequence=True,
                         recurrent_activation="sigmoid", cell_activation="tanh", activation="tanh",
                         name=cx.name(), **kwargs)
    return _directional_outputs(cx, node, y, h, c, seq, batch, dirs, hidden, batch_first)


@rule("GRU", check=_rnn_check(["Sigmoid", "Tanh"]), const_inputs=(1, 2, 3, 4))
def gru(cx, node, attrs):
    mb = cx.mb
    x, seq, batch, batch_first = _sequence_input(cx, node, attrs)
    w, r = cx.const(node, 1).astype(np.float32), cx.const(node, 2).astype(np.float32)
    dirs, hidden = w.shape[0], r.shape[-1]
    bias = cx.const(node, 3).astype(np.float32) if cx.has(node, 3) else np.zeros((dirs, 6 * hidden), np.float32)
    reset_after = bool(attrs.get("linear_before_reset", 0))
    directions = ["reverse"] if attrs.get("direction", "forward") == "reverse" else ["forward"]
    if attrs.get("direction") == "bidirectional":
        directions = ["forward", "reverse"]
    h_init = _initial_state(cx, node, 5, dirs, batch, hidden, batch_first)
    sequences, finals = [], []
    H = hidden
    for d, direction in enumerate(directions):
        # Input projections for every step at once: [seq, batch, 3H] in ONNX gate order (z, r, h).
        gx = mb.linear(x=x, weight=np.ascontiguousarray(w[d]), bias=bias[d][:3 * H])
        r_zr, rb_zr = np.ascontiguousarray(r[d][:2 * H]), bias[d][3 * H:5 * H]
        r_h, rb_h = np.ascontiguousarray(r[d][2 * H:]), bias[d][5 * H:]
        h = h_init[d]
        states = [None] * seq
        steps = range(seq) if direction == "forward" else range(seq - 1, -1, -1)
        for t in steps:
            gx_t = mb.slice_by_index(x=gx, begin=[t, 0, 0], end=[t + 1, batch, 3 * H],
                                     squeeze_mask=[True, False, False])
            gx_z, gx_r, gx_h = mb.split(x=gx_t, num_splits=3, axis=1)
            gh_z, gh_r = mb.split(x=mb.linear(x=h, weight=r_zr, bias=rb_zr), num_splits=2, axis=1)
            z = mb.sigmoid(x=mb.add(x=gx_z, y=gh_z))
            reset = mb.sigmoid(x=mb.add(x=gx_r, y=gh_r))
            if reset_after:
                recurrent = mb.mul(x=reset, y=mb.linear(x=h, weight=r_h, bias=rb_h))
            else:
                recurrent = mb.linear(x=mb.mul(x=reset, y=h), weight=r_h, bias=rb_h)
            n = mb.tanh(x=mb.add(x=gx_h, y=recurrent))
            h = mb.add(x=n, y=mb.mul(x=z, y=mb.sub(x=h, y=n)))  # (1 - z) * n + z * h
            states[t] = h
        sequences.append(mb.stack(values=states, axis=0) if seq > 1 else mb.expand_dims(x=states[0], axes=[0]))
        finals.append(h)
    outs = []
    if len(node.output) > 0 and node.output[0]:
        y = mb.stack(values=sequences, axis=1) if dirs > 1 else mb.expand_dims(x=sequences[0], axes=[1])
        outs.append(mb.transpose(x=y, perm=[2, 0, 1, 3], name=cx.name("_Y")) if batch_first
                    else mb.identity(x=y, name=cx.name("_Y")))
    else:
        outs.append(None)
    if len(node.output) > 1 and node.output[1]:
        final = mb.stack(values=finals, axis=1 if batch_first else 0) if dirs > 1 else mb.expand_dims(
            x=finals[0], axes=[1 if batch_first else 0])
        outs.append(mb.identity(x=final, name=cx.name("_Y_h")))
    return outs
