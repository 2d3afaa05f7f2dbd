"""The original and the converted model side by side, as ``edgeopt convert`` validates: the original
run with the inputs frozen into the converted one added back (``SourceRunner``), data moved between
the two layouts (``Layout``), parity and accuracy streamed over the validation samples one call's
worth at a time, the golden vectors, and the report's latency."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeopt import bench
from edgeopt.batching import run_samples, stack
from edgeopt.converters.streaming import run_sequence
from edgeopt.converters.validate import Parity, accuracy, parity
from edgeopt.data import Dataset
from edgeopt.errors import UserInputError
from edgeopt.runtime import Runtime, run_batched, to_model_dtype
from edgeopt.runtime.onnxruntime import OnnxRuntime
from edgeopt.specs import TensorSpec

VALIDATION_BATCH = 32
VALIDATION_CALL_ELEMENTS = 2**18  # input elements per validation call: one 224x224 image, five 48x320 text lines
# (each call's activations are alive in both runtimes at once: 3 images of 320x320 held 80 MB more)


def validation_batch(data: dict[str, np.ndarray]) -> int:
    """Samples per validation call: up to VALIDATION_BATCH, fewer for big inputs, so that validating a
    detector does not hold 32 images' activations in two runtimes at once (peak memory, issue 15)."""
    per_sample = sum(int(np.prod(v.shape[1:])) for v in data.values()) or 1
    return max(1, min(VALIDATION_BATCH, VALIDATION_CALL_ELEMENTS // per_sample))


class SourceRunner:
    """Runs the original model, adding back the inputs that were frozen into the converted one."""

    def __init__(self, rt: OnnxRuntime, frozen: dict[str, Any], source_specs: list[TensorSpec],
                 axes: dict[str, int | None]):
        rt.set_batch_axes(axes)
        self.rt = rt
        self.constants = {s.name: np.full(tuple(int(d) for d in s.shape), frozen[s.name], dtype=s.dtype)
                          for s in source_specs if s.name in frozen}

        # the inputs data feeds; an original exported with a fixed batch (often 1) is run that many
        # samples per call
        self.inputs = [s for s in rt.inputs if s.name not in frozen]
        self.outputs = rt.outputs

    def feeds(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**inputs, **self.constants}

    def run_float(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call of the original, outputs as it gives them."""
        return self.rt.run(self.feeds(inputs))

    def run_all(self, inputs: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        return run_samples(self.run_float, self.inputs, self.outputs, inputs, batch)

    def with_state(self, data: Dataset, pairs: list[tuple[str, str]]) -> Dataset:
        """``data`` (one stream of steps) with each state input the original carries to each step."""
        _, fed = run_sequence(lambda f: self.run_all(f, 1), self.inputs, data.inputs, pairs)
        return Dataset({**data.inputs, **fed}, data.labels, data.source, data.task)


def pair_outputs(source: list[TensorSpec], converted: list[TensorSpec]) -> list[tuple[str, str]]:
    """(source name, converted name) pairs: by name when the names survived conversion, else by order."""
    if {s.name for s in source} == {c.name for c in converted}:
        return [(c.name, c.name) for c in converted]
    if len(source) != len(converted):
        raise UserInputError(f"converted model has {len(converted)} outputs, the original {len(source)}")
    return [(s.name, c.name) for s, c in zip(source, converted, strict=True)]


class Layout:
    """Source layout ↔ the converted model's, for data held as samples along axis 0.

    ``transposes`` (a target's ``io_transposes``): name → axes with model tensor =
    ``numpy.transpose(source tensor, axes)`` (NCHW → NHWC for TFLite); ``axes``: each source tensor's
    batch axis, which the transpose moves too."""

    def __init__(self, transposes: dict[str, list[int]] | None, axes: dict[str, int | None]):
        self.transposes = transposes or {}
        self.axes = axes

    @staticmethod
    def _move(arr: np.ndarray, perm: list[int], axis: int | None) -> np.ndarray:
        if axis is None:  # whole tensors per sample: transpose each
            return np.transpose(arr, [0, *(p + 1 for p in perm)])
        tensor_like = np.moveaxis(arr, 0, axis)
        return np.moveaxis(np.transpose(tensor_like, perm), perm.index(axis), 0)

    def to_model(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: self._move(v, self.transposes[k], self.axes.get(k, 0)) if k in self.transposes else v
                for k, v in arrays.items()}

    def to_source(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for k, v in arrays.items():
            if k not in self.transposes:
                out[k] = v
                continue
            perm, axis = self.transposes[k], self.axes.get(k, 0)
            inverse = [int(i) for i in np.argsort(perm)]
            out[k] = self._move(v, inverse, None if axis is None else perm.index(axis))
        return out

    def model_axes(self, source_outputs: list[TensorSpec], outputs: list[TensorSpec]) -> dict[str, int | None]:
        """The converted model's batch axes, by its input and output names."""
        def moved(name: str, axis: int | None) -> int | None:
            return axis if axis is None or name not in self.transposes else self.transposes[name].index(axis)

        result = {k: moved(k, v) for k, v in self.axes.items()}
        for s, c in pair_outputs(source_outputs, outputs):
            result[c] = moved(s, self.axes.get(s, 0))
        return result


def one_call(inputs: list[TensorSpec], data: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """One call's feeds for ``inputs`` (model dtypes): the first sample repeated ``batch`` times."""
    samples = {s.name: np.resize(data[s.name], (batch, *data[s.name].shape[1:])) for s in inputs}
    return {s.name: to_model_dtype(s, v) for s, v in zip(inputs, stack(inputs, samples).values(), strict=True)}


def compare_models(source: SourceRunner, converted_rt: Runtime, data: Dataset, golden_count: int, layout: Layout,
              pairs: list[tuple[str, str]] | None = None):
    batch = validation_batch(data.inputs)
    outputs = pair_outputs(source.rt.outputs, converted_rt.outputs)
    k = min(golden_count, len(data))
    if pairs:
        ref = source.run_all(data.inputs, batch)
        converted_inputs = layout.to_model(data.inputs)
        # Golden vectors (below) feed each sample with the state the original carried to it, so their
        # expected outputs are the first k samples run one by one; parity is measured as a device runs
        # the model: one stream, each model carrying its own state.
        expected = layout.to_source(run_batched(converted_rt, {n: a[:k] for n, a in converted_inputs.items()},
                                                batch))
        state_inputs = [i for i, _ in pairs]
        stream = {n: a for n, a in converted_inputs.items() if n not in state_inputs}
        converted_pairs = [(i, dict(outputs)[o]) for i, o in pairs]
        got = layout.to_source(run_sequence(lambda f: run_batched(converted_rt, f, 1), converted_rt.inputs, stream,
                                            converted_pairs)[0])
        par = parity([ref[s] for s, _ in outputs], [got[c] for _, c in outputs], [c for _, c in outputs])
        first = ref[outputs[0][0]], got[outputs[0][1]]
        golden_ref = {s: ref[s][:k] for s, _ in outputs}
    else:
        par, first, golden_ref, expected = stream_parity(source, converted_rt, data, k, layout, outputs, batch)
    acc = accuracy(data.labels, *first, data.task)
    # Golden vectors are what a device feeds the converted model and compares its outputs with, in the
    # converted model's layout and keyed by its output names: the original model's outputs, and the
    # converted model's own outputs for the same inputs ("expected"), which let a device check the
    # artifact tightly whatever the compression changed.
    golden = (layout.to_model({n: a[:k] for n, a in data.inputs.items()}),
              layout.to_model({c: golden_ref[s] for s, c in outputs}),
              layout.to_model(expected))
    return par, acc, golden


def stream_parity(source: SourceRunner, converted_rt: Runtime, data: Dataset, k: int, layout: Layout,
                   outputs: list[tuple[str, str]], batch: int):
    """Both models on the validation samples one call's worth at a time, parity accumulated as they
    go: only a call's outputs are alive (plus the first output of each model when there are labels to
    score, and the first ``k`` samples' outputs for the golden vectors). Holding every output of both
    models cost two detector maps per sample (issue 15)."""
    acc = Parity([c for _, c in outputs])
    firsts: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    golden_ref: dict[str, list[np.ndarray]] = {s: [] for s, _ in outputs}
    expected: dict[str, list[np.ndarray]] = {c: [] for _, c in outputs}
    n = len(data)
    for start in range(0, n, batch):
        part = {name: arr[start:start + batch] for name, arr in data.inputs.items()}
        ref = source.run_all(part, batch)
        got = layout.to_source(run_batched(converted_rt, layout.to_model(part), batch))
        acc.add([ref[s] for s, _ in outputs], [got[c] for _, c in outputs])
        if data.labels is not None:
            firsts[0].append(ref[outputs[0][0]])
            firsts[1].append(got[outputs[0][1]])
        if start == 0 or start < k:  # (k = 0: empty arrays of the right shape)
            for s, c in outputs:
                golden_ref[s].append(ref[s][:k - start])
                expected[c].append(got[c][:k - start])
    first = tuple(np.concatenate(parts) if parts else None for parts in firsts)
    return (acc.result(), first, {s: np.concatenate(v) for s, v in golden_ref.items()},
            {c: np.concatenate(v) for c, v in expected.items()})


PARITY_KEYS = ("max_abs_err", "mean_abs_err", "cosine", "worst_sample_cosine", "top1_agreement", "finite",
               "nonfinite_samples")
LATENCY_KEYS = ("runtime", "batch", "threads", "p50_ms", "p95_ms", "p99_ms", "throughput_per_s", "source_p50_ms",
                "speedup_vs_source")


def unmeasured(source: SourceRunner, outputs: list[TensorSpec], data: Dataset, golden_count: int,
                layout: Layout):
    """Parity and accuracy left null, and golden vectors from the original model alone (no
    ``expected`` outputs), for a converted model that cannot run on this machine."""
    k = min(golden_count, len(data))
    inputs = {n: a[:k] for n, a in data.inputs.items()}
    ref = source.run_all(inputs, validation_batch(inputs))
    pairs = pair_outputs(source.rt.outputs, outputs)
    par = {**dict.fromkeys(PARITY_KEYS), "outputs": {}}
    acc = {"metric": None, "original": None, "converted": None, "drop": None}
    return par, acc, (layout.to_model(inputs), layout.to_model({c: ref[s] for s, c in pairs}))


def measure_latency(source: SourceRunner, converted_rt: Runtime, data: Dataset, layout: Layout,
                    all_int8_rt: Runtime | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The report's latency: ``edgeopt.bench.measure`` -- the code behind ``edgeopt bench``, with its
    default settings -- on the converted model at batch 1 (or its fixed batch), interleaved with the
    original for ``speedup_vs_source``; and when mixed precision kept nodes float, with the all-INT8
    model of the same format too (``all_int8_rt``): the p50 of each and the ratio, else None."""
    batch = converted_rt.fixed_batch or 1  # the report's latency is per call at batch 1 when the model allows
    samples = {k: np.resize(v, (batch, *v.shape[1:])) for k, v in data.inputs.items()}
    model_feeds = one_call(converted_rt.inputs, layout.to_model(samples), batch)
    source_feeds = source.feeds(one_call(source.inputs, samples, source.rt.fixed_batch or batch))
    runtimes, feeds = [source.rt, converted_rt], [source_feeds, model_feeds]
    if all_int8_rt is not None:
        runtimes.append(all_int8_rt)
        feeds.append(model_feeds)
    src, conv, *all_int8 = bench.measure(runtimes, feeds, bench.REPORT_SETTINGS)
    out = conv.to_json()
    del out["calls"], out["mean_ms"]
    out["source_p50_ms"] = round(src.p50_ms, 4)
    out["speedup_vs_source"] = round(src.p50_ms / conv.p50_ms, 3) if conv.p50_ms > 0 else None
    if not all_int8:
        return out, None
    other = all_int8[0].p50_ms
    # µs-scale models: six decimals keep the p50s consistent with their ratio
    return out, {"p50_ms": round(conv.p50_ms, 6), "p50_ms_all_int8": round(other, 6),
                 "slowdown_vs_all_int8": round(conv.p50_ms / other, 3) if other > 0 else None}


def golden_tolerance(par: dict[str, Any], integer: bool) -> dict[str, float | None]:
    """How close a device's outputs must be to the golden outputs.

    ``atol`` / ``cosine_min`` compare with the original model's outputs: the converted model already
    differs from those by its compression error, so the tolerance is the error measured here with a
    2x margin, and at least 1e-4 of the output scale. ``expected_atol`` compares with the converted
    model's own outputs on this host: only another CPU's kernels differ there (summation order for
    float; a rounding step or two of the output quantization where a mode computes in ``integer``).

    Finite by construction: the errors come from the samples where both models gave finite outputs.
    When an output had none (or the converted model could not run here) every tolerance is None, and
    a device's self-test refuses an artifact without one.
    """
    outputs = list(par["outputs"].values())
    if not outputs or any(o["max_abs_err"] is None for o in outputs):
        return {"atol": None, "cosine_min": None, "expected_atol": None}
    scale = max(max(o["output_scale"], 1.0) for o in outputs)
    atol = max(max(2.0 * o["max_abs_err"], 1e-4 * max(o["output_scale"], 1.0)) for o in outputs)
    cos_dist = max(1.0 - o["cosine"] for o in outputs)
    expected = (0.02 if integer else 1e-3) * scale
    tolerance = {"atol": float(atol), "cosine_min": float(max(0.0, 1.0 - max(2.0 * cos_dist, 1e-4))),
                 "expected_atol": float(expected)}
    if not all(np.isfinite(v) for v in tolerance.values()):  # e.g. outputs near float64's limit
        return {"atol": None, "cosine_min": None, "expected_atol": None}
    return tolerance
