"""The ONNX target: an optimised (and optionally quantized) ONNX model for ONNX Runtime."""

from __future__ import annotations

import platform
import re
from pathlib import Path
from typing import ClassVar

import onnx

from edgeopt.converters.passes import ConversionError, PassContext
from edgeopt.converters.targets import CompiledModel, QuantizeMode, Target
from edgeopt.errors import UnsupportedOpsError
from edgeopt.onnx_io import save_model
from edgeopt.runtime.onnxruntime import quiet_onnxruntime

# quantize mode → pass that implements it for ONNX Runtime
QUANTIZE_PASSES = {"int8": "quantize-int8", "int8-dynamic": "quantize-int8-dynamic", "fp16": "quantize-fp16",
                   "int4": "quantize-int4"}
ORT_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "avx512vnni", "avxvnni"})  # /proc/cpuinfo spellings


def host_cpu_flags() -> set[str]:
    """This machine's CPU flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


class OnnxTarget(Target):
    name: ClassVar[str] = "onnx"
    format: ClassVar[str] = "onnx"
    runtime: ClassVar[str] = "onnxruntime"
    model_file: ClassVar[str] = "model.onnx"
    quantize_modes: ClassVar[tuple[str, ...]] = ("none", *QUANTIZE_PASSES)
    toolchain: ClassVar[tuple[str, ...]] = ()
    integer_activations: ClassVar[bool] = True  # QDQ pairs fused into QLinear* kernels

    def is_supported(self, node: onnx.NodeProto) -> bool:
        if node.domain not in ORT_DOMAINS:
            return False
        if node.domain in ("", "ai.onnx", "ai.onnx.ml"):
            return onnx.defs.has(node.op_type, node.domain)
        return True  # com.microsoft contrib ops: ONNX Runtime's own check at load time names a missing one

    def passes_for(self, quantize: str) -> list[str]:
        return [QUANTIZE_PASSES[quantize]] if quantize in QUANTIZE_PASSES else []

    def pass_settings(self, name: str) -> dict:
        """Static INT8 for an x86-64 board (the profile's, else this host's) quantizes activations to
        uint8: ONNX Runtime's x86 kernels multiply u8 activations by s8 weights (VPMADDUBSW, VNNI's
        VPDPBUSD), and run s8 activations far slower — measured on AVX-512 VNNI, a YOLOX detector runs
        2.39x faster than float with u8 activations and 0.72x with s8 (docs/benchmarks.md,
        benchmarks/int8_speed.py). Elsewhere (ARM's SDOT) s8 stays.

        Without VNNI, VPMADDUBSW adds pairs of u8 x s8 products into 16 bits, which saturate: on an AVX2
        EPYC the PP-LCNet classifier's INT8 cosine was 0.922 (0.993 with 7-bit weights). So there the
        weights get ``reduce_range`` (ONNX Runtime's advice for such CPUs)."""
        settings = super().pass_settings(name)
        if name == "quantize-int8" and "activation_type" not in settings:
            arch = self.profile.arch if self.profile else platform.machine().lower()
            settings["activation_type"] = "uint8" if arch in ("x86_64", "amd64") else "int8"
        if name == "quantize-int8" and settings.get("activation_type") == "uint8" and "reduce_range" not in settings:
            features = set(self.profile.cpu_features) if self.profile else host_cpu_flags()
            settings["reduce_range"] = not features & VNNI_FLAGS
        return settings

    def _compile(self, model: onnx.ModelProto, mode: QuantizeMode, ctx: PassContext, out: Path) -> CompiledModel:
        model, recipe = self._run_passes(model, mode.name, ctx)
        save_model(model, out)
        self._check_loads(out)
        return CompiledModel(out, activation_bytes=self.activation_bytes(mode), recipe=recipe)

    @staticmethod
    def _check_loads(path: Path) -> None:
        """Catch ops ONNX Runtime has no kernel for (e.g. an op/type pair) and name the node."""
        import onnxruntime as ort

        quiet_onnxruntime()
        so = ort.SessionOptions()
        so.log_severity_level = 3
        try:
            ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            text = str(exc)
            m = re.search(r"implementation for (\w+)\(\d+\) node with name '([^']*)'", text)
            if m:
                raise UnsupportedOpsError("onnx", {m.group(1): [m.group(2)]}) from exc
            first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            raise ConversionError(f"ONNX Runtime cannot load the converted model: {first}") from exc
