"""ONNX Runtime backend (CPU execution provider)."""

from __future__ import annotations

import os
from typing import ClassVar

import numpy as np

from edgeopt.errors import UserInputError
from edgeopt.params import Param
from edgeopt.runtime import Runtime
from edgeopt.specs import TensorSpec

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(uint16)": "uint16",
    "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool",
}


_quieted = [False]


def no_telemetry() -> None:
    """ONNX Runtime 1.32 starts a telemetry client when imported: it writes a session file ``.ses`` into
    $TMPDIR, stores a device id under $XDG_CACHE_HOME, and warns on every start where it cannot ("Failed
    to persist telemetry device ID", e.g. the agent under systemd's ProtectHome). Only its environment
    variable, set before the import, stops all three; a device has no business phoning home anyway."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def quiet_onnxruntime() -> None:
    """Before the first session: no telemetry, and only errors from ONNX Runtime's native logger (the
    process-wide one, which per-session ``log_severity_level`` does not cover)."""
    if _quieted[0]:
        return
    no_telemetry()
    try:
        import onnxruntime as ort
    except ImportError:
        return
    ort.disable_telemetry_events()
    ort.set_default_logger_severity(3)
    _quieted[0] = True


class OnnxRuntime(Runtime):
    name: ClassVar[str] = "onnxruntime"
    formats: ClassVar[tuple[str, ...]] = ("onnx",)
    fork_safe: ClassVar[bool] = True  # intra_op_num_threads=1, inter_op_num_threads=1: no pool threads
    params: ClassVar[tuple[Param, ...]] = Runtime.params + (
        Param("optimization", str, "all", "graph optimization level", choices=("disable", "basic", "extended", "all")),
        Param("memory_arena", bool, True, "keep freed activation memory for the next run (ONNX Runtime's CPU "
              "arena); off, a run's activations are returned when it ends"),
    )

    def _load(self) -> None:
        import onnxruntime as ort

        quiet_onnxruntime()
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        so.enable_cpu_mem_arena = self.config["memory_arena"]
        if self.config["threads"]:
            so.intra_op_num_threads = self.config["threads"]
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.config["optimization"]]
        try:
            self.session = ort.InferenceSession(str(self.model_path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            first = str(exc).strip().splitlines()[0]
            raise UserInputError(f"{self.model_path}: ONNX Runtime cannot load the model: {first}") from exc
        self.inputs = [self._spec(i) for i in self.session.get_inputs()]
        self.outputs = [self._spec(o) for o in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    @staticmethod
    def _spec(arg) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) and d > 0 else (d if isinstance(d, str) else None) for d in arg.shape)
        return TensorSpec(arg.name, shape, _ORT_TYPES.get(arg.type, "float32"))

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self._output_names, feeds)
