"""LiteRT (TFLite) backend: ``ai_edge_litert``'s interpreter, falling back to ``tflite_runtime``.

XNNPACK, LiteRT's default CPU delegate, is on unless ``xnnpack=False``; devices run with it on, so
validation and benchmarks do too. Quantized inputs and outputs carry their scale and zero point in
``TensorSpec.quantization`` (what ``Runtime.run_float`` and a device need to feed raw integers).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np

from edgeopt.errors import MissingDependency, UserInputError
from edgeopt.params import Param
from edgeopt.runtime import Runtime, from_model_dtype
from edgeopt.specs import TensorSpec


def interpreter_module() -> Any:
    """``ai_edge_litert.interpreter``, or ``tflite_runtime.interpreter`` where only that is installed."""
    try:
        from ai_edge_litert import interpreter
    except ImportError:
        try:
            from tflite_runtime import interpreter  # type: ignore[no-redef]
        except ImportError:
            raise MissingDependency("ai-edge-litert", "litert", "running .tflite models") from None
    return interpreter


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """LiteRT's C++ logger prints 'INFO: Created TensorFlow Lite XNNPACK delegate' straight to file
    descriptor 2; keep it off the terminal while the interpreter is created (errors still raise)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


class LiteRtRuntime(Runtime):
    name: ClassVar[str] = "litert"
    formats: ClassVar[tuple[str, ...]] = ("tflite",)
    fork_safe: ClassVar[bool] = True  # XNNPACK at 1 thread runs on the caller's thread
    params: ClassVar[tuple[Param, ...]] = Runtime.params + (
        Param("xnnpack", bool, True, "use the XNNPACK delegate (LiteRT's default CPU acceleration)"),
        Param("preserve_all_tensors", bool, False, "keep every intermediate tensor after a run (all_tensors, for "
              "per-layer comparisons); with xnnpack off, since XNNPACK computes inside its delegate"),
    )

    def _load(self) -> None:
        module = interpreter_module()
        kwargs: dict[str, Any] = {"model_path": str(self.model_path), "num_threads": self.config["threads"]}
        if not self.config["xnnpack"] and hasattr(module, "OpResolverType"):
            kwargs["experimental_op_resolver_type"] = module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        if self.config["preserve_all_tensors"]:
            kwargs["experimental_preserve_all_tensors"] = True
        try:
            with quiet_native_stderr():
                self.interpreter = module.Interpreter(**kwargs)
                self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserInputError(f"{self.model_path}: LiteRT cannot load the model: {first}") from exc
        self._input_details = self.interpreter.get_input_details()
        self._output_details = self.interpreter.get_output_details()
        self.inputs = [self._spec(d) for d in self._input_details]
        self.outputs = [self._spec(d) for d in self._output_details]
        self._batch = {d["index"]: tuple(int(x) for x in d["shape"]) for d in self._input_details}

    @staticmethod
    def _spec(detail: dict[str, Any]) -> TensorSpec:
        signature = detail.get("shape_signature")
        dims = signature if signature is not None and len(signature) else detail["shape"]
        shape = tuple(int(d) if d > 0 else None for d in dims)
        quant = {}
        dtype = np.dtype(detail["dtype"])
        scale, zero_point = detail.get("quantization", (0.0, 0))
        if dtype.kind in "iu" and scale:
            quant = {"scale": float(scale), "zero_point": int(zero_point)}
        return TensorSpec(detail["name"], shape, dtype.name, quant)

    def all_tensors(self) -> dict[str, np.ndarray]:
        """Every tensor the last run computed, by name, as float (dequantized where it is quantized per
        tensor). Needs ``preserve_all_tensors``: LiteRT reuses the others' memory."""
        out = {}
        for detail in self.interpreter.get_tensor_details():
            try:
                value = self.interpreter.get_tensor(detail["index"])
            except ValueError:  # a tensor without data (an optional input left out)
                continue
            out[detail["name"]] = from_model_dtype(self._spec(detail), value)
        return out

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        it = self.interpreter
        resized = False
        for detail in self._input_details:
            arr = feeds[detail["name"]]
            if tuple(arr.shape) != self._batch[detail["index"]]:
                it.resize_tensor_input(detail["index"], list(arr.shape))
                self._batch[detail["index"]] = tuple(arr.shape)
                resized = True
        if resized:
            it.allocate_tensors()
        for detail in self._input_details:
            arr = feeds[detail["name"]]
            it.set_tensor(detail["index"], arr if arr.flags.c_contiguous else arr.copy(order="C"))
        it.invoke()
        return [it.get_tensor(d["index"]) for d in self._output_details]
