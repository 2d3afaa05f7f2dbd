"""The model the agent runs: the artifact in the active slot, loaded with the runtime its manifest
names, and run on batches of windows.

Only the runtime the manifest names is imported (``edgeopt.registry.load``), so an ONNX model never
pulls in LiteRT or TVM and the reverse.

A stateful model (the manifest's ``state`` pairs: an LSTM's h/c, silero-vad's state) is run as one
stream per source: each window's state inputs get the state outputs of the same source's previous
window. The state starts as zeros, and goes back to zeros when the source's window numbers jump (a
gap: windows dropped for NaN samples, or a source that restarted) or a new model is loaded. One call
takes at most one window per source, stacked along the batch axes, so batching across sources keeps
each source's state; a source's later windows wait for the next call of the same batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.agent.statedir import StateDir
from edgeopt.agent.windowing import Preprocessing, WindowBatch
from edgeopt.artifact import open_artifact
from edgeopt.batching import split, stack
from edgeopt.errors import EdgeoptError, MissingDependency, UserInputError
from edgeopt.runtime import EXTRA_FOR_FORMAT, Runtime, manifest_batch_axes, runtime_class
from edgeopt.specs import TensorSpec


class NoModel(EdgeoptError):
    """No slot is active yet: the agent waits for a model."""


@dataclass
class LoadedModel:
    name: str
    version: str
    slot: str | None
    path: Path
    runtime: Runtime
    pre: Preprocessing
    input_name: str
    sample_shape: tuple[int, ...]
    output_names: list[str]  # what results carry: every output but the state ones
    state_pairs: list[tuple[str, str]] = field(default_factory=list)  # (state input, state output)
    # per source: (the seq of its last window, its state after that window: one sample per state input)
    streams: dict[str, tuple[int, dict[str, np.ndarray]]] = field(default_factory=dict)
    state_resets: int = 0  # a source's state set back to zeros after a gap in its window numbers
    _checked_sizes: set[int] = field(default_factory=set)  # batch sizes check_feeds accepted

    @cached_property
    def float_io(self) -> bool:
        """One float32 input and float32 outputs: windows go to the runtime as they are."""
        ins, outs = self.runtime.inputs, self.runtime.outputs
        return len(ins) == 1 and all(s.dtype == "float32" and not s.quantization for s in (*ins, *outs))

    @cached_property
    def fixed_batch(self) -> int | None:
        """The runtime's (its batch axes are set when the model loads; asked once per call, so kept)."""
        return self.runtime.fixed_batch

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "slot": self.slot, "runtime": self.runtime.name}

    def infer(self, batch: WindowBatch, max_call: int | None = None) -> tuple[dict[str, np.ndarray], float]:
        """``run_calls``, with the seconds of its longest call (the latency of one inference call)."""
        outputs, calls = self.run_calls(batch, max_call)
        return outputs, max((seconds for _, seconds in calls), default=0.0)

    def run_calls(self, batch: WindowBatch, max_call: int | None = None
                  ) -> tuple[dict[str, np.ndarray], list[tuple[int, float]]]:
        """Float outputs for the windows of ``batch``, in calls of at most ``max_call`` windows (and of
        exactly the model's fixed batch, the last one padded), and (windows, seconds inside the runtime)
        of each call; ``edgeopt.agent.results`` turns the outputs into records."""
        n = len(batch)
        step = self.call_step(n, max_call)
        if self.state_pairs:
            return self._infer_streams(batch, step)
        data = batch.data.reshape((n, *self.sample_shape))
        if self.float_io and (n % step == 0 or not self.fixed_batch):  # nothing to convert or pad
            self.check_call_sizes(data, step)
            return self.runtime.run_calls(self.input_name, data, step)
        calls: list[tuple[int, float]] = []
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.output_names}
        for start in range(0, n, step):
            part = data[start:start + step]
            real = len(part)
            if self.fixed_batch and real < step:
                part = np.concatenate([part, np.repeat(part[-1:], step - real, axis=0)])
            t0 = time.perf_counter()
            out = self.runtime.run_float({self.input_name: part})
            calls.append((real, time.perf_counter() - t0))
            for name in self.output_names:
                parts[name].append(out[name][:real])
        return {name: v[0] if len(v) == 1 else np.concatenate(v) for name, v in parts.items()}, calls

    def call_step(self, n: int, max_call: int | None = None) -> int:
        """Windows per call for ``n`` windows in calls of at most ``max_call`` (and of exactly the model's
        fixed batch)."""
        return max(1, min(self.fixed_batch or n, max_call or n))

    def check_call_sizes(self, data: np.ndarray, step: int) -> None:
        """Check the feeds of ``data`` cut into calls of ``step`` (a ``UserInputError`` naming the input
        when the model cannot take them): once per call size, not every call."""
        n = len(data)
        for size in {min(step, n), n % step or step}:
            if size not in self._checked_sizes:
                self.runtime.check_feeds({self.input_name: data[:size]})
                self._checked_sizes.add(size)

    def _infer_streams(self, batch: WindowBatch, width: int
                       ) -> tuple[dict[str, np.ndarray], list[tuple[int, float]]]:
        """``run_calls`` for a stateful model: rounds of at most one window per source and ``width``
        windows (see the module docstring), each source's state carried from its previous window."""
        rows = [(block.source, int(block.seq[i]), block.data[i]) for block in batch.blocks for i in range(len(block))]
        specs = {s.name: s for s in self.runtime.inputs}
        results: list[dict[str, np.ndarray] | None] = [None] * len(rows)
        pending = list(range(len(rows)))
        calls: list[tuple[int, float]] = []
        while pending:
            call, seen, later = [], set(), []
            for i in pending:
                if rows[i][0] in seen or len(call) == width:
                    later.append(i)
                else:
                    call.append(i)
                    seen.add(rows[i][0])
            pending = later
            samples = {self.input_name: np.stack([rows[i][2].reshape(self.sample_shape) for i in call])}
            states = [self._state_for(rows[i][0], rows[i][1], specs) for i in call]
            for name, _ in self.state_pairs:
                samples[name] = np.stack([st[name] for st in states])
            real = len(call)
            if self.fixed_batch and real < self.fixed_batch:  # padded with the last window, dropped below
                samples = {k: np.concatenate([v, np.repeat(v[-1:], self.fixed_batch - real, axis=0)])
                           for k, v in samples.items()}
            t0 = time.perf_counter()
            out = split(self.runtime.outputs, self.runtime.run_float(stack(self.runtime.inputs, samples)))
            calls.append((real, time.perf_counter() - t0))
            for j, i in enumerate(call):
                results[i] = {name: v[j] for name, v in out.items()}
                self.streams[rows[i][0]] = (rows[i][1], {n: out[o][j] for n, o in self.state_pairs})
        merged = {name: np.stack([r[name] for r in results]) for name in self.output_names}  # type: ignore[index]
        return merged, calls

    def _state_for(self, source: str, seq: int, specs: dict[str, TensorSpec]) -> dict[str, np.ndarray]:
        """The state a source's window ``seq`` starts from: its previous window's, or zeros after a gap."""
        last = self.streams.get(source)
        if last is not None and last[0] + 1 == seq:
            return last[1]
        if last is not None:
            self.state_resets += 1
        return {name: np.zeros([int(d) for d in specs[name].sample_shape()], np.float32) for name, _ in self.state_pairs}


def load_model(path: Path, slot: str | None, runtime_override: str = "", threads: int = 1, window: int = 0,
               hop: int = 0) -> LoadedModel:
    artifact = open_artifact(path)
    artifact.verify()
    manifest = artifact.manifest
    cls = runtime_class(manifest, runtime_override)
    try:
        runtime = cls(artifact.model_file, threads=threads)
    except ImportError as exc:
        module = exc.name or str(exc)
        raise MissingDependency(module, EXTRA_FOR_FORMAT.get(artifact.format, "all"),
                                f"runtime '{cls.name}' (model format {artifact.format})") from exc
    runtime.set_batch_axes(manifest_batch_axes(manifest, Path(path)))
    pairs = state_pairs(manifest, str(path))
    state_inputs, state_outputs = {i for i, _ in pairs}, {o for _, o in pairs}
    spec, sample_shape, pre = sensor_input([s for s in runtime.inputs if s.name not in state_inputs], manifest,
                                           str(path), window, hop)
    return LoadedModel(str(manifest.get("name", "")), str(manifest.get("version", "")), slot, path, runtime, pre,
                       spec.name, sample_shape, [o.name for o in runtime.outputs if o.name not in state_outputs],
                       pairs)


def state_pairs(manifest: dict[str, Any], where: str) -> list[tuple[str, str]]:
    """The manifest's recurrent state pairs, checked against its inputs and outputs."""
    pairs = manifest.get("state") or []
    inputs = {i.get("name") for i in manifest.get("inputs") or [] if isinstance(i, dict)}
    outputs = {o.get("name") for o in manifest.get("outputs") or [] if isinstance(o, dict)}
    if not isinstance(pairs, list) or not all(isinstance(p, dict) and p.get("input") in inputs
                                              and p.get("output") in outputs for p in pairs):
        raise UserInputError(f"{where}/manifest.json: malformed 'state' (a list of {{\"input\": NAME, "
                             f"\"output\": NAME}} naming the model's inputs and outputs)")
    return [(p["input"], p["output"]) for p in pairs]


def sensor_input(inputs: list[TensorSpec], manifest: dict[str, Any], where: str, window: int = 0,
                 hop: int = 0) -> tuple[TensorSpec, tuple[int, ...], Preprocessing]:
    """The one input the agent feeds, the shape of one sample of it, and how windows are cut for it
    from the manifest's preprocessing; a ``UserInputError`` saying why when the agent cannot window
    the model (``edgeopt agent install-model`` refuses such a model with the same words)."""
    if len(inputs) != 1:
        raise UserInputError(f"{where}: the agent feeds one-input sensor models; this one has {len(inputs)} inputs")
    spec = inputs[0]
    sample_shape = spec.sample_shape()
    if len(sample_shape) not in (1, 2):
        no_pre = "" if any((manifest.get("preprocessing") or {}).values()) else \
            " and its manifest has no preprocessing (convert a sensor model with --preprocessing FILE.json)"
        raise UserInputError(f"{where}: the agent cannot window this model: one sample of input '{spec.name}' "
                             f"{spec.describe_shape()} is {list(sample_shape)}, not a sensor window ([C, T], [T, C] "
                             f"or [T] samples of a stream){no_pre}")
    if any(not isinstance(d, int) for d in sample_shape):
        raise UserInputError(f"{where}: input '{spec.name}' {spec.describe_shape()} has dynamic dims")
    pre = Preprocessing.from_manifest(manifest, sample_shape, window, hop, where=f"{where}/manifest.json")
    return spec, tuple(int(d) for d in sample_shape), pre


def check_feedable(artifact_dir: Path, window: int = 0, hop: int = 0) -> None:
    """Refuse, before it is installed, an artifact whose model the agent cannot feed windows to (an
    image classifier, several inputs, a window the config overrides to another length)."""
    manifest = open_artifact(artifact_dir).manifest
    try:
        inputs = [TensorSpec.from_json(i) for i in manifest["inputs"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserInputError(f"{artifact_dir}/manifest.json: malformed 'inputs' ({exc})") from None
    state_inputs = {i for i, _ in state_pairs(manifest, str(artifact_dir))}
    sensor_input([s for s in inputs if s.name not in state_inputs], manifest, str(artifact_dir), window, hop)


def load_active_model(state: StateDir, runtime_override: str = "", threads: int = 1, window: int = 0,
                      hop: int = 0) -> LoadedModel:
    slot = state.active_slot()
    if slot is None:
        raise NoModel(f"{state.root} has no active slot (install a model with "
                      f"'edgeopt agent install-model ARTIFACT --state-dir {state.root}')")
    return load_model(state.slot_path(slot), slot, runtime_override, threads, window, hop)
