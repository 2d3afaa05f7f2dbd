"""The model the agent runs: the artifact in the active slot, loaded with the runtime its manifest
names, and run on batches of windows.

Only the runtime the manifest names is imported (through its entry point), so an ONNX model never
pulls in LiteRT or TVM and the reverse.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.agent.statedir import StateDir
from edgeopt.agent.windowing import Preprocessing, WindowBatch
from edgeopt.artifact import open_artifact
from edgeopt.errors import EdgeoptError, MissingDependency, UserInputError
from edgeopt.runtime import EXTRA_FOR_FORMAT, Runtime, runtime_class
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
    output_names: list[str]

    @property
    def fixed_batch(self) -> int | None:
        return self.runtime.fixed_batch

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "slot": self.slot, "runtime": self.runtime.name}

    def infer(self, batch: WindowBatch) -> tuple[dict[str, np.ndarray], float]:
        """Float outputs for the windows of ``batch`` (one inference call, or one per fixed-size batch)
        and the seconds spent inside the runtime; ``edgeopt.agent.results`` turns them into records."""
        n = len(batch)
        data = batch.data.reshape((n, *self.sample_shape))
        step = self.fixed_batch or n
        outputs: dict[str, list[np.ndarray]] = {name: [] for name in self.output_names}
        spent = 0.0
        for start in range(0, n, step):
            part = data[start:start + step]
            real = len(part)
            if self.fixed_batch and real < step:
                part = np.concatenate([part, np.repeat(part[-1:], step - real, axis=0)])
            t0 = time.perf_counter()
            out = self.runtime.run_float({self.input_name: part})
            spent += time.perf_counter() - t0
            for name in self.output_names:
                outputs[name].append(out[name][:real])
        merged = {name: v[0] if len(v) == 1 else np.concatenate(v) for name, v in outputs.items()}
        return merged, spent

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
    spec, sample_shape, pre = sensor_input(runtime.inputs, manifest, str(path), window, hop)
    return LoadedModel(str(manifest.get("name", "")), str(manifest.get("version", "")), slot, path, runtime, pre,
                       spec.name, sample_shape, [o.name for o in runtime.outputs])


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
    sensor_input(inputs, manifest, str(artifact_dir), window, hop)


def load_active_model(state: StateDir, runtime_override: str = "", threads: int = 1, window: int = 0,
                      hop: int = 0) -> LoadedModel:
    slot = state.active_slot()
    if slot is None:
        raise NoModel(f"{state.root} has no active slot (install a model with "
                      f"'edgeopt agent install-model ARTIFACT --state-dir {state.root}')")
    return load_model(state.slot_path(slot), slot, runtime_override, threads, window, hop)
