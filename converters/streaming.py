"""Batch axes and recurrent state: which axis of each input and output stacks samples, which inputs
are a state the model hands back, and running such a model over a sequence with its state carried.

Batch axes are read from the original model, before ``--input-shape`` fixes its dims: the symbols
of dynamic leading dims ("batch") are the batch, wherever else they appear (silero-vad's state is
[2, 'batch', 128]: axis 1), as is an input's one dynamic dim when the exporter left it unnamed
([2, ?, 128]). Without symbols, a fixed-shape model's batch is the leading dim of its
first input, found at the same size in the others ([1, 576] with a [2, 1, 128] state: axes 0 and 1);
an input with no such dim (a scalar sample rate) has no batch axis, so such a model takes one sample
per call. ``--batch-axis NAME:K|none`` overrides any of it.

State pairs are an input and an output of the same shape and type whose names say so
(``state``/``stateN``, ``h``/``hn``, ``h0``/``h1``, ``state_in``/``state_out``), or ``--state IN=OUT``.
A stateful model's data files hold the other inputs only: the state of step *t* is the output of
step *t - 1*, zeros at the start.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from edgeopt.batching import samples_per_call
from edgeopt.converters.passes.canonicalize import split_assignment
from edgeopt.errors import UserInputError, closest
from edgeopt.specs import TensorSpec

Axes = dict[str, int | None]


def parse_batch_axis(text: str) -> tuple[str, int | None]:
    """'state:1' → ('state', 1); 'sr:none' → ('sr', None)."""
    name, sep, axis = text.rpartition(":")
    if not sep or not name:
        raise UserInputError(f"--batch-axis {text!r}: expected NAME:AXIS (an integer) or NAME:none")
    if axis.lower() == "none":
        return name, None
    try:
        value = int(axis)
        if value < 0:
            raise ValueError
    except ValueError:
        raise UserInputError(f"--batch-axis {text!r}: expected NAME:AXIS (an integer >= 0) or NAME:none") from None
    return name, value


def parse_state(text: str) -> tuple[str, str]:
    """'h=hn' → ('h', 'hn')."""
    return split_assignment(text, "--state", "INPUT=OUTPUT (a state input and the output that holds its next value)")


def check_batch_axis_names(given: Mapping[str, int | None], inputs: Sequence[TensorSpec],
                           outputs: Sequence[TensorSpec]) -> None:
    """--batch-axis names an input or an output of the original model."""
    names = [s.name for s in inputs] + [s.name for s in outputs]
    for name in given:
        if name not in names:
            raise UserInputError(f"--batch-axis: the model has no input or output '{name}'{closest(name, names)}; "
                                 f"it has {', '.join(names)}")


def _dynamic(d) -> bool:
    return not (isinstance(d, int) and d > 0)


def input_axes(inputs: Sequence[TensorSpec], given: Mapping[str, int | None]) -> Axes:
    """The batch axis of every input of the original model (see the module docstring)."""
    names = [s.name for s in inputs]
    for name in given:
        if name not in names:
            raise UserInputError(f"--batch-axis: the model has no input '{name}'{closest(name, names)}; "
                                 f"inputs: {', '.join(names)}")
    symbols = {s.shape[0] for s in inputs if s.shape and isinstance(s.shape[0], str)}
    first = inputs[0] if inputs else None
    lead = first.shape[0] if first is not None and first.shape and not _dynamic(first.shape[0]) else None
    # the exporter left the batch dim unnamed: the first input's leading dim is dynamic without a symbol
    unnamed_batch = first is not None and bool(first.shape) and _dynamic(first.shape[0]) \
        and not isinstance(first.shape[0], str)
    axes: Axes = {}
    for spec in inputs:
        if spec.name in given:
            axis = given[spec.name]
            if axis is not None and axis >= len(spec.shape):
                raise UserInputError(f"--batch-axis {spec.name}:{axis}: input '{spec.name}' has "
                                     f"{len(spec.shape)} dims {spec.describe_shape()}")
            axes[spec.name] = axis
        elif not spec.shape:
            axes[spec.name] = None
        elif named := [i for i, d in enumerate(spec.shape) if isinstance(d, str) and d in symbols]:
            axes[spec.name] = named[0]
        elif _dynamic(spec.shape[0]):
            axes[spec.name] = 0
        elif unnamed_batch and len(dyn := [i for i, d in enumerate(spec.shape) if _dynamic(d)]) == 1 \
                and not isinstance(spec.shape[dyn[0]], str):  # [2, ?, 128] beside an input [?, 512]
            axes[spec.name] = dyn[0]
        elif lead is not None:  # a fixed-shape model: the first input's leading size, wherever it is
            axes[spec.name] = next((i for i, d in enumerate(spec.shape) if d == lead), None)
        else:  # fixed while the others' batch is dynamic: the same tensor for every sample of a call
            axes[spec.name] = None
    return axes


def output_axes(outputs: Sequence[TensorSpec], source_outputs: Sequence[TensorSpec], inputs: Sequence[TensorSpec],
                given: Mapping[str, int | None], pairs: Sequence[tuple[str, str]] = ()) -> Axes:
    """The batch axis of every output: a state output's is its input's; else where the inputs' batch
    symbol is in the original's declared shape, else a dynamic leading dim, else (fixed shapes) the
    leading dim when it is the per-call batch; an output with none of these holds one sample (None)
    — which needs one sample per call."""
    state_axis = {o: next(s.batch_axis for s in inputs if s.name == i) for i, o in pairs}
    source = {s.name: s for s in source_outputs}
    symbols = {s.shape[s.batch_axis] for s in inputs
               if s.batch_axis is not None and isinstance(s.shape[s.batch_axis], str)}
    per_call, _ = samples_per_call(inputs, 0)  # 0: a dynamic batch
    axes: Axes = {}
    for spec in outputs:
        declared = source.get(spec.name, spec).shape
        if spec.name in given or spec.name in state_axis:
            axes[spec.name] = given.get(spec.name, state_axis.get(spec.name))
            continue
        named = [i for i, d in enumerate(declared) if isinstance(d, str) and d in symbols]
        if named and len(declared) == len(spec.shape):
            axes[spec.name] = named[0]
        elif spec.shape and (_dynamic(spec.shape[0]) or spec.shape[0] == per_call):
            axes[spec.name] = 0
        elif per_call == 1:
            axes[spec.name] = None
        else:
            raise UserInputError(f"output '{spec.name}' {spec.describe_shape()}: its batch axis cannot be told "
                                 f"from the model; give --batch-axis {spec.name}:K (or {spec.name}:none)")
    return axes


def _stem(name: str, out: bool) -> str:
    n = name.lower()
    for suffix in (("_out", "_output", "out", "n", "_next", "_new", "1") if out else ("_in", "_input", "in", "0", "_prev")):
        if n.endswith(suffix) and len(n) > len(suffix):
            return n[: -len(suffix)]
    return n


def state_pairs(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                given: Mapping[str, str]) -> list[tuple[str, str]]:
    """(state input, state output) pairs: ``given`` (--state), else by name and shape."""
    ins = {s.name: s for s in inputs}
    outs = {s.name: s for s in outputs}
    pairs: list[tuple[str, str]] = []
    for i, o in given.items():
        if i not in ins:
            raise UserInputError(f"--state {i}={o}: the model has no input '{i}'{closest(i, list(ins))}")
        if o not in outs:
            raise UserInputError(f"--state {i}={o}: the model has no output '{o}'{closest(o, list(outs))}")
        if not _same_shape(ins[i], outs[o]):
            raise UserInputError(f"--state {i}={o}: input '{i}' {ins[i].describe_shape()} and output '{o}' "
                                 f"{outs[o].describe_shape()} differ in shape or type")
        pairs.append((i, o))
    if given:
        return pairs
    taken: set[str] = set()
    for spec in inputs[1:]:  # the first input is the data the model is about, never its own state
        for out in outputs[1:]:
            if out.name in taken or not _same_shape(spec, out):
                continue
            if _stem(spec.name, False) == _stem(out.name, True) or _stem(spec.name, False) == out.name.lower():
                pairs.append((spec.name, out.name))
                taken.add(out.name)
                break
    return pairs


def _same_shape(a: TensorSpec, b: TensorSpec) -> bool:
    """The same type and shape: a state output is fed back to its input as it is."""
    return a.dtype == b.dtype and len(a.shape) == len(b.shape) and all(
        _dynamic(x) or _dynamic(y) or x == y for x, y in zip(a.shape, b.shape, strict=True))


def zero_state(spec: TensorSpec) -> np.ndarray:
    """One sample of a state input at its start: zeros."""
    return np.zeros(tuple(int(d) for d in spec.sample_shape()), dtype=spec.dtype)


def run_sequence(run: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]], inputs: Sequence[TensorSpec],
                 data: Mapping[str, np.ndarray], pairs: Sequence[tuple[str, str]],
                 initial: Mapping[str, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every sample of ``data`` (the non-state inputs, samples along axis 0) as one stream, one call per
    step, each state input fed the previous step's state output (zeros first, or ``initial``).

    ``run`` takes and returns *samples along axis 0* of one step (``edgeopt.batching.run_samples``
    with a batch of one does that). Returns (outputs, the state inputs fed), both along axis 0."""
    specs = {s.name: s for s in inputs}
    state = {i: (initial or {}).get(i, zero_state(specs[i]))[None] for i, _ in pairs}
    n = len(next(iter(data.values())))
    outs: dict[str, list[np.ndarray]] = {}
    fed: dict[str, list[np.ndarray]] = {i: [] for i, _ in pairs}
    for t in range(n):
        feeds = {k: v[t:t + 1] for k, v in data.items()}
        for i, _ in pairs:
            feeds[i] = state[i]
            fed[i].append(state[i])
        step = run(feeds)
        for k, v in step.items():
            outs.setdefault(k, []).append(v)
        state = {i: np.asarray(step[o], dtype=specs[i].dtype) for i, o in pairs}
    return ({k: np.concatenate(v) for k, v in outs.items()},
            {k: np.concatenate(v) for k, v in fed.items()})
