"""Samples ↔ model calls, for any batch axis.

Data files, validation sets and golden vectors keep samples along axis 0: sample ``i`` of input
``x`` is ``data["x"][i]``, the input tensor without its batch axis — or the whole tensor when the
input has none (``TensorSpec.batch_axis is None``: a scalar sample rate, a fixed-shape model). A
call stacks samples along each input's batch axis (axis 1 for an LSTM state [layers, batch, hidden])
and its outputs are split along each output's batch axis back into samples. A tensor without a
batch axis holds one sample, so a model with one runs one sample per call.

Shared by the converter's validation, ``edgeopt bench``, the golden-vector self-test and the agent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

from edgeopt.specs import TensorSpec

Run = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]


def samples_per_call(inputs: Sequence[TensorSpec], batch_size: int) -> tuple[int, bool]:
    """(samples per call, whether a short last call is padded to that many): 1 when an input has no
    batch axis, the fixed size of a batch axis, else ``batch_size``."""
    if any(s.batch_axis is None for s in inputs):
        return 1, False
    fixed = next((s.batch_size for s in inputs if s.batch_size is not None), None)
    return (fixed, True) if fixed is not None else (batch_size, False)


def stack(inputs: Sequence[TensorSpec], samples: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Samples along axis 0 → one call's feeds, stacked along each input's batch axis."""
    feeds = {}
    for spec in inputs:
        arr = np.asarray(samples[spec.name])
        if spec.batch_axis is None:
            if len(arr) != 1:
                raise ValueError(f"input '{spec.name}' has no batch axis: one sample per call, got {len(arr)}")
            feeds[spec.name] = arr[0]
        else:
            feeds[spec.name] = np.moveaxis(arr, 0, spec.batch_axis)
    return feeds


def split(outputs: Sequence[TensorSpec], results: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One call's outputs → samples along axis 0."""
    out = {}
    for spec in outputs:
        arr = np.asarray(results[spec.name])
        out[spec.name] = arr[None] if spec.batch_axis is None else np.moveaxis(arr, spec.batch_axis, 0)
    return out


def calls(inputs: Sequence[TensorSpec], data: Mapping[str, np.ndarray],
          batch_size: int = 32) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """``data`` (samples along axis 0) as one call's feeds at a time, as many samples per call as the
    model takes (a fixed batch gets exactly that many: the last call is padded with its last sample),
    each with how many of its samples are real."""
    n = len(next(iter(data.values())))
    step, pad = samples_per_call(inputs, batch_size)
    for start in range(0, n, step):
        part = {s.name: np.asarray(data[s.name][start:start + step]) for s in inputs}
        real = len(next(iter(part.values())))
        if pad and real < step:
            part = {k: np.concatenate([v, np.repeat(v[-1:], step - real, axis=0)]) for k, v in part.items()}
        yield stack(inputs, part), real


def run_samples(run: Run, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                data: Mapping[str, np.ndarray], batch_size: int = 32) -> dict[str, np.ndarray]:
    """Every sample of ``data`` through ``run`` (feeds → outputs by name), in ``calls`` (the padding
    dropped); outputs as samples along axis 0."""
    chunks: dict[str, list[np.ndarray]] = {}
    for feeds, real in calls(inputs, data, batch_size):
        for k, v in split(outputs, run(feeds)).items():
            chunks.setdefault(k, []).append(v[:real])
    return {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in chunks.items()}


def with_axes(specs: Sequence[TensorSpec], axes: Mapping[str, int | None]) -> list[TensorSpec]:
    """``specs`` with the batch axes named in ``axes`` (others unchanged)."""
    from dataclasses import replace

    return [replace(s, batch_axis=axes[s.name]) if s.name in axes else s for s in specs]
