"""Core ML backend: runs an ``.mlpackage`` with the Core ML framework through coremltools.

Core ML prediction exists only on macOS: coremltools on Linux converts, compresses and saves
models but cannot run them. ``unavailable_reason()`` says so, and the converter then verifies a
Core ML package structurally instead of measuring parity and latency.

The package may carry edgeopt's I/O name map in its metadata (``edgeopt.io_names``): Core ML
feature names must be identifiers, so an ONNX name such as ``input.1`` becomes ``input_1`` in the
package; this backend (and the artifact's manifest) keep speaking the ONNX names.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import platform
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgeopt.errors import EnvironmentFault, MissingDependency, UserInputError
from edgeopt.params import Param
from edgeopt.runtime import Runtime
from edgeopt.specs import TensorSpec

IO_NAMES_KEY = "edgeopt.io_names"  # metadata key: {"inputs": {coreml: onnx}, "outputs": {coreml: onnx}}
COMPUTE_UNITS = ("all", "cpu_only", "cpu_and_gpu", "cpu_and_ne")

# Core ML ArrayFeatureType.ArrayDataType values (Model.proto) → numpy dtype names.
_ARRAY_DTYPES = {65568: "float32", 65552: "float16", 65600: "float64", 131104: "int32", 131080: "int8"}


def import_coremltools():
    """Import coremltools without its import-time chatter.

    On Linux coremltools logs one "Failed to load _MLModelProxy ..." warning per missing native
    proxy, and warns about untested torch / scikit-learn versions; none of it matters for
    conversion, and printed on stderr it would break edgeopt's one-line error messages.
    """
    if "coremltools" in sys.modules:
        return sys.modules["coremltools"]
    logger = logging.getLogger("coremltools")
    old_level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            import coremltools
    except ImportError as exc:
        raise MissingDependency("coremltools", "coreml", "the Core ML target and runtime") from exc
    finally:
        logger.setLevel(old_level if old_level != logging.NOTSET else logging.WARNING)
    return coremltools


def read_io_names(spec: Any) -> dict[str, dict[str, str]]:
    """{"inputs": {coreml name: original name}, "outputs": {...}} from a model spec's metadata."""
    raw = spec.description.metadata.userDefined.get(IO_NAMES_KEY)
    if not raw:
        return {"inputs": {}, "outputs": {}}
    try:
        names = json.loads(raw)
        return {"inputs": dict(names.get("inputs", {})), "outputs": dict(names.get("outputs", {}))}
    except (ValueError, AttributeError, TypeError):
        return {"inputs": {}, "outputs": {}}


def feature_specs(spec: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of a Core ML model spec as TensorSpecs, under their original (ONNX) names."""
    names = read_io_names(spec)

    def convert(features, mapping: dict[str, str]) -> list[TensorSpec]:
        out = []
        for feature in features:
            if feature.type.WhichOneof("Type") != "multiArrayType":
                raise UserInputError(f"Core ML feature '{feature.name}' is not a multi-array "
                                     f"({feature.type.WhichOneof('Type')}); edgeopt runs tensor models only")
            arr = feature.type.multiArrayType
            dtype = _ARRAY_DTYPES.get(arr.dataType)
            if dtype is None:
                raise UserInputError(f"Core ML feature '{feature.name}' has an unsupported data type {arr.dataType}")
            out.append(TensorSpec(mapping.get(feature.name, feature.name), tuple(int(d) for d in arr.shape), dtype))
        return out

    return convert(spec.description.input, names["inputs"]), convert(spec.description.output, names["outputs"])


class CoreMLRuntime(Runtime):
    name: ClassVar[str] = "coreml"
    formats: ClassVar[tuple[str, ...]] = ("coreml",)
    params: ClassVar[tuple[Param, ...]] = Runtime.params + (
        Param("compute_units", str, "all", "Core ML compute units the model may use", choices=COMPUTE_UNITS),
    )

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if sys.platform != "darwin":
            return f"Core ML prediction needs macOS (the Core ML framework); this host runs {platform.system()}"
        return None

    def _load(self) -> None:
        if (reason := self.unavailable_reason()) is not None:
            raise EnvironmentFault(f"{self.model_path}: {reason}")
        ct = import_coremltools()
        units = {"all": ct.ComputeUnit.ALL, "cpu_only": ct.ComputeUnit.CPU_ONLY,
                 "cpu_and_gpu": ct.ComputeUnit.CPU_AND_GPU, "cpu_and_ne": ct.ComputeUnit.CPU_AND_NE}
        try:
            self.model = ct.models.MLModel(str(self.model_path), compute_units=units[self.config["compute_units"]])
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserInputError(f"{self.model_path}: Core ML cannot load the model: {first}") from exc
        spec = self.model.get_spec()
        self.inputs, self.outputs = feature_specs(spec)
        self._coreml_inputs = [f.name for f in spec.description.input]
        self._coreml_outputs = [f.name for f in spec.description.output]
        # ``threads`` is accepted for a uniform CLI; Core ML schedules its own threads.

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        batch = len(next(iter(feeds.values())))
        fixed = self.fixed_batch
        if fixed is not None and batch != fixed:
            raise UserInputError(f"{Path(self.model_path).name}: the model takes a batch of {fixed}, got {batch}")
        named = {cm: feeds[spec.name] for cm, spec in zip(self._coreml_inputs, self.inputs, strict=True)}
        result = self.model.predict(named)
        return [np.asarray(result[cm]) for cm in self._coreml_outputs]
