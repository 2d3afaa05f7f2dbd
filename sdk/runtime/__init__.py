"""Runtime backends: load a compiled model and run a batch of inputs.

One small interface: an implementation fills in ``_load`` and ``_run``; the public ``run`` checks
the feeds (names, dtypes, shapes) against the model's inputs and turns backend failures into
edgeopt errors. Shared by validation, ``edgeopt bench`` and the device agent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgeopt import registry
from edgeopt.batching import run_samples, with_axes
from edgeopt.errors import EdgeoptError, UserInputError
from edgeopt.params import Configurable, Param
from edgeopt.specs import TensorSpec

# File name suffix → model format. A directory artifact names its format in manifest.json.
FORMAT_BY_SUFFIX = {".onnx": "onnx", ".tflite": "tflite", ".mlpackage": "coreml", ".so": "tvm", ".tar": "tvm"}


class RuntimeFailure(EdgeoptError):
    """The backend failed while running a model that had loaded."""


class Runtime(Configurable):
    """Loads one model file and runs batches through it."""

    name: ClassVar[str] = ""
    formats: ClassVar[tuple[str, ...]] = ()
    # at 1 thread the backend keeps no threads of its own, so a process forked after the model loads
    # can call it (the agent's inference worker, edgeopt.agent.worker)
    fork_safe: ClassVar[bool] = False
    params: ClassVar[tuple[Param, ...]] = (
        Param("threads", int, None, "CPU threads for inference (default: the backend's choice)",
              check=lambda v: None if v >= 1 else "must be >= 1"),
    )

    def __init__(self, model_path: str | Path, **settings: Any):
        super().__init__(**settings)
        self.model_path = Path(model_path)
        if not self.model_path.exists():
            raise UserInputError(f"model file not found: {self.model_path}")
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self._load()

    # -- hooks -------------------------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run models on this machine at all (e.g. Core ML off macOS), or None.

        The converter then skips the measurements that need the converted model to run (parity,
        accuracy, latency) and says so in the report, instead of failing."""
        return None

    def _load(self) -> None:
        """Load ``self.model_path``; set ``self.inputs`` and ``self.outputs``."""
        raise NotImplementedError

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch (already checked); return outputs in ``self.outputs`` order."""
        raise NotImplementedError

    # -- public ------------------------------------------------------------------------------
    @property
    def fixed_batch(self) -> int | None:
        """Samples per call the model is compiled for (1 when an input has no batch axis), or None
        when its batch axis is dynamic."""
        if any(s.batch_axis is None for s in self.inputs):
            return 1
        return next((s.batch_size for s in self.inputs if s.batch_size is not None), None)

    def set_batch_axes(self, axes: Mapping[str, int | None]) -> None:
        """Where samples stack in each input and output (from the manifest; axis 0 unless told)."""
        self.inputs = with_axes(self.inputs, axes)
        self.outputs = with_axes(self.outputs, axes)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run_checked(self.check_feeds(feeds))

    def run_checked(self, checked: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``run`` for feeds ``check_feeds`` accepted (the agent checks a batch shape once, not every call)."""
        try:
            outs = self._run(checked)
        except EdgeoptError:
            raise
        except Exception as exc:
            raise self._failure(exc) from exc
        return {spec.name: out for spec, out in zip(self.outputs, outs, strict=True)}

    def run_calls(self, name: str, data: np.ndarray, step: int) -> tuple[dict[str, np.ndarray], list[tuple[int, float]]]:
        """``run_checked`` over ``data`` (the model's only input, whose call sizes the caller checked) in
        consecutive calls of ``step`` samples: every output, the calls' joined along axis 0, and (samples,
        seconds inside the runtime) of each call. The agent's hot loop: at batch 1, ``run_checked``'s per-call
        dicts and exception handling cost ~0.6 µs beside a small model's ~5 µs call."""
        parts: list[list[np.ndarray]] = [[] for _ in self.outputs]
        calls: list[tuple[int, float]] = []
        run, clock = self._run, time.perf_counter
        try:
            for start in range(0, len(data), step):
                part = data[start:start + step]
                t0 = clock()
                outs = run({name: part})
                calls.append((len(part), clock() - t0))
                for kept, out in zip(parts, outs, strict=True):
                    kept.append(out)
        except EdgeoptError:
            raise
        except Exception as exc:
            raise self._failure(exc) from exc
        return {spec.name: kept[0] if len(kept) == 1 else np.concatenate(kept)
                for spec, kept in zip(self.outputs, parts, strict=True)}, calls

    def _failure(self, exc: Exception) -> RuntimeFailure:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return RuntimeFailure(f"{self.name} failed running {self.model_path.name}: {first}")

    def run_float(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run with float inputs and get float32 outputs, whatever the model's I/O types are:
        quantized (int8/uint8/int16 with scale and zero point) or float16 I/O is converted here."""
        specs = {s.name: s for s in self.inputs}
        outs = self.run({name: to_model_dtype(specs[name], np.asarray(arr)) if name in specs else arr
                         for name, arr in feeds.items()})  # unknown names: run() reports them
        return {s.name: from_model_dtype(s, outs[s.name]) for s in self.outputs}

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        expected = {s.name for s in self.inputs}
        missing = expected - set(feeds)
        extra = set(feeds) - expected
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing input(s) {', '.join(sorted(missing))}")
            if extra:
                parts.append(f"unknown input(s) {', '.join(sorted(extra))}")
            raise UserInputError(f"{self.model_path.name}: {'; '.join(parts)}")
        out = {}
        for spec in self.inputs:
            arr = np.asarray(feeds[spec.name])
            if arr.dtype != np.dtype(spec.dtype):
                raise UserInputError(
                    f"{self.model_path.name}: input '{spec.name}' expects dtype {spec.dtype}, got {arr.dtype}")
            if arr.ndim != len(spec.shape) or any(
                isinstance(d, int) and d > 0 and a != d for a, d in zip(arr.shape, spec.shape, strict=False)
            ):
                raise UserInputError(
                    f"{self.model_path.name}: input '{spec.name}' expects shape {spec.describe_shape()}, "
                    f"got {list(arr.shape)}")
            out[spec.name] = arr
        return out


def to_model_dtype(spec: TensorSpec, arr: np.ndarray) -> np.ndarray:
    """Float data → what the model input takes (quantized with its scale/zero point, or cast)."""
    dtype = np.dtype(spec.dtype)
    if arr.dtype == dtype:
        return arr
    if spec.quantization and dtype.kind in "iu" and arr.dtype.kind == "f":
        info = np.iinfo(dtype)
        q = np.round(arr / spec.quantization["scale"] + spec.quantization["zero_point"])
        return np.clip(q, info.min, info.max).astype(dtype)
    if dtype.kind == "f" and arr.dtype.kind == "f":
        return arr.astype(dtype)
    return arr  # let run() report the mismatch


def from_model_dtype(spec: TensorSpec, arr: np.ndarray) -> np.ndarray:
    """A model output → float32 (dequantized with its scale/zero point when it is quantized)."""
    if spec.quantization and arr.dtype.kind in "iu":
        return ((arr.astype(np.float32) - spec.quantization["zero_point"]) * spec.quantization["scale"]).astype(
            np.float32)
    if arr.dtype.kind == "f" and arr.dtype != np.float32:
        return arr.astype(np.float32)
    return arr


def runtime_for_format(fmt: str) -> type[Runtime]:
    """The first registered runtime that runs ``fmt`` (raises with the list when none does)."""
    available = []
    for name in registry.names(registry.RUNTIMES):
        cls = registry.load(registry.RUNTIMES, name)
        available.extend(cls.formats)
        if fmt in cls.formats:
            return cls
    raise UserInputError(f"no runtime for format '{fmt}'; runtimes installed for: {', '.join(sorted(set(available)))}")


# model format → the pip extra that installs its runtime
EXTRA_FOR_FORMAT = {"onnx": "agent", "tflite": "litert", "tvm": "tvm", "coreml": "coreml"}


def runtime_class(manifest: dict[str, Any], override: str = "") -> type[Runtime]:
    """The runtime ``override`` names, else the manifest's, else any registered one for its format."""
    wanted = override or manifest["model"].get("runtime") or ""
    fmt = manifest["model"]["format"]
    if wanted and registry.registered(registry.RUNTIMES, wanted):
        return registry.load(registry.RUNTIMES, wanted)
    names = registry.names(registry.RUNTIMES)
    if override:
        registry.load(registry.RUNTIMES, override)  # raises: unknown runtime, with the closest name
    for name in names:
        cls = registry.load(registry.RUNTIMES, name)
        if fmt in cls.formats:
            return cls
    raise UserInputError(f"the model's runtime '{wanted or fmt}' (format {fmt}) is not installed; installed "
                         f"runtimes: {', '.join(names) or 'none'}; install it with: pip install "
                         f"'edgeopt[{EXTRA_FOR_FORMAT.get(fmt, 'all')}]'")


def resolve_model_file(path: str | Path) -> tuple[Path, str, dict[str, Any] | None]:
    """(model file, format, manifest or None) for an artifact directory or a bare model file."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"not found: {path}")
    if path.is_dir() and path.suffix != ".mlpackage":
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise UserInputError(f"{path} is a directory without manifest.json (not an edgeopt artifact)")
        try:
            manifest = json.loads(manifest_path.read_text())
            return path / manifest["model"]["file"], manifest["model"]["format"], manifest
        except (ValueError, KeyError, TypeError) as exc:
            raise UserInputError(f"{manifest_path}: malformed manifest ({exc})") from exc
    fmt = FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(FORMAT_BY_SUFFIX))
        raise UserInputError(f"{path}: unknown model format (expected one of {known}, or an artifact directory)")
    return path, fmt, None


def open_runtime(path: str | Path, **settings: Any) -> Runtime:
    """Load an artifact directory or a model file with the runtime its format needs; an artifact's
    runtime stacks samples along the batch axes its manifest gives."""
    model_file, fmt, manifest = resolve_model_file(path)
    runtime = runtime_for_format(fmt)(model_file, **settings)
    if manifest is not None:
        runtime.set_batch_axes(manifest_batch_axes(manifest, Path(path)))
    return runtime


def manifest_batch_axes(manifest: dict[str, Any], where: Path) -> dict[str, int | None]:
    """Each input's and output's batch axis, by name, from an artifact's manifest."""
    try:
        return {spec.name: spec.batch_axis for key in ("inputs", "outputs")
                for spec in map(TensorSpec.from_json, manifest.get(key) or [])}
    except (KeyError, TypeError, ValueError) as exc:
        raise UserInputError(f"{where}/manifest.json: malformed 'inputs' or 'outputs' ({exc})") from None


def run_batched(runtime: Runtime, inputs: Mapping[str, np.ndarray], batch_size: int = 32) -> dict[str, np.ndarray]:
    """Run float ``inputs`` (N samples along axis 0, ``edgeopt.batching``) in batches and return float
    outputs, samples along axis 0 (see ``Runtime.run_float``); a model with a fixed batch gets exactly
    that many samples per call (the last call is padded and the padding dropped)."""
    return run_samples(runtime.run_float, runtime.inputs, runtime.outputs, inputs, batch_size)
