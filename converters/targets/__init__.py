"""Targets: compile a canonicalised (and possibly compressed) ONNX model into one format.

A target declares which ONNX ops it supports, so unsupported ops are reported with their node names
before any work is done, and which ``--quantize`` modes it offers. It fills in ``_compile``, which
returns a ``CompiledModel``: a target keeps no state from one compile to the next, and the pipeline
reads every fact about the compiled model (layout, memory, the passes run) from that one value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import onnx

from edgeopt import registry
from edgeopt.converters.modes import MODE_SETTINGS, QUANTIZE_MODES, QuantizeMode, quantize_mode
from edgeopt.converters.passes import ConversionError, PassContext, get_pass, quiet_loggers
from edgeopt.errors import EdgeoptError, UnsupportedOpsError, UserInputError
from edgeopt.fsutil import ENVIRONMENT_ERRNOS, environment_fault
from edgeopt.logs import native_output, python_prints
from edgeopt.onnx_io import iter_nodes, op_key
from edgeopt.params import Configurable, Param
from edgeopt.profiles import Profile
from edgeopt.specs import TensorSpec

__all__ = ["QUANTIZE_MODES", "CompiledModel", "QuantizeMode", "Target", "get_target", "quantize_mode"]


@dataclass(frozen=True)
class CompiledModel:
    """What ``Target.compile`` returns."""
    path: Path                   # the model (file or directory) inside the staging directory
    # Set when the compiled model's I/O layout differs from the source model's: input/output name →
    # axes such that model tensor = numpy.transpose(source tensor, axes) (e.g. [0, 2, 3, 1] for NCHW →
    # NHWC). Validation, golden vectors and the manifest follow it.
    io_transposes: Mapping[str, list[int]] = field(default_factory=dict)
    # Bytes of weights the runtime expands in memory beyond the model file (e.g. sparse TFLite weights
    # that LiteRT densifies at load); the fit check adds them to its estimate.
    expanded_weight_bytes: int = 0
    activation_bytes: int = 4    # per activation element at run time, for the fit check's estimate
    # A build of the same model for this host, when ``path`` is for another CPU: validation, golden
    # vectors and latency run it instead.
    host_model: Path | None = None
    recipe: tuple[dict[str, Any], ...] = ()  # the passes the target ran, with their settings
    extra_files: tuple[str, ...] = ()  # files beside the model that belong to the artifact (micro/*.cc)
    problems: tuple[str, ...] = ()     # the target's own checks that failed: the report is marked failed
    arena_bytes: int | None = None     # RAM the model needs on the board, measured by running it there
    code_bytes: int | None = None      # flash the board's runtime code takes (an estimate from the profile)

    @property
    def runnable(self) -> Path:
        """The file that runs on this host and computes what ``path`` does."""
        return self.host_model or self.path


class Target(Configurable):
    name: ClassVar[str] = ""
    format: ClassVar[str] = ""            # manifest "format": onnx | tflite | coreml | tvm
    runtime: ClassVar[str] = ""           # registered runtime that runs the output
    model_file: ClassVar[str] = ""        # file (or directory) name inside the artifact
    quantize_modes: ClassVar[tuple[str, ...]] = ("none",)
    toolchain: ClassVar[tuple[str, ...]] = ()  # packages whose versions go into the manifest
    max_model_bytes: ClassVar[int | None] = None  # largest source model (weights included) the format holds
    # whether its runtime computes a calibrated mode's activations in integers (else in float: Core ML's
    # int8 compresses weights only; TVM runs the QDQ graph in float32)
    integer_activations: ClassVar[bool] = False
    params: ClassVar[tuple[Param, ...]] = ()

    def __init__(self, pass_params: dict[str, dict] | None = None, profile: Profile | None = None, **settings):
        """``pass_params``: settings for the passes this target runs, by pass name; ``profile``: the
        board being converted for, whose facts (deployment target, TVM target...) a target may use."""
        super().__init__(**settings)
        self.pass_params = pass_params or {}
        self.profile = profile

    def passes_for(self, quantize: str) -> list[str]:
        """Names of the registered passes this target runs for a quantize mode (for the recipe)."""
        return []

    def pass_settings(self, name: str) -> dict:
        """The settings this target runs pass ``name`` with: what was given, plus what the target
        chooses for the board (the recipe in the report records exactly these)."""
        return dict(self.pass_params.get(name, {}))

    def min_opset(self, quantize: str, model: onnx.ModelProto) -> int | None:
        """The oldest ONNX opset this target handles ``model`` at, for ``quantize``; canonicalize upgrades
        an older model to it. By default: what the passes it runs need."""
        return max((m for p in self.passes_for(quantize) if (m := get_pass(p).min_opset)), default=None)

    # -- which settings it uses: one it would not use is refused by name before any work -----------
    def honoured_pass_params(self, quantize: str) -> dict[str, frozenset[str]]:
        """Pass name → the parameters of that pass this target reads from ``pass_params`` for
        ``quantize``. By default: all of them, for the passes it runs (it builds them from ``pass_params``)."""
        return {p: frozenset(param.name for param in get_pass(p).params) for p in self.passes_for(quantize)}

    def mode_for(self, quantize: str) -> QuantizeMode:
        """The mode ``quantize`` with the settings this target honours for it (calibration method, block
        size: given as its passes' parameters)."""
        honoured = self.honoured_pass_params(quantize)
        return quantize_mode(quantize, {p: {k: (self.pass_params.get(p) or {}).get(k) for k in keys & MODE_SETTINGS}
                                        for p, keys in honoured.items()})

    def calibrates(self, quantize: str) -> bool:
        """Whether compiling for ``quantize`` reads the calibration data."""
        return "quantize-int8" in self.passes_for(quantize)

    def unused_params(self, quantize: str) -> dict[str, str]:
        """This target's own parameters that would not change what it writes for ``quantize`` (with the
        other settings it has): name → why, as "with X: it applies with Y". Checked for the ones given."""
        return {}

    # -- hooks ---------------------------------------------------------------------------------
    def is_supported(self, node: onnx.NodeProto) -> bool:
        """Whether this target can compile ``node`` (op type, domain and, where it matters, attributes)."""
        raise NotImplementedError

    def _compile(self, model: onnx.ModelProto, mode: QuantizeMode, ctx: PassContext, out: Path) -> CompiledModel:
        """Write the compiled model to ``out`` (a path inside the staging directory) and describe it."""
        raise NotImplementedError

    def float_activation_bytes(self) -> int:
        """Bytes per activation element where a mode keeps activations float (``QuantizeMode.activation_bytes``
        says it for integer ones), for the memory estimate of the fit check."""
        return 4

    def activation_bytes(self, mode: QuantizeMode) -> int:
        if self.integer_activations and mode.activation_bytes:
            return mode.activation_bytes
        return self.float_activation_bytes()

    def _run_passes(self, model: onnx.ModelProto, quantize: str, ctx: PassContext
                    ) -> tuple[onnx.ModelProto, tuple[dict[str, Any], ...]]:
        """Apply the passes this target runs for ``quantize``: the model, and each pass as the recipe records it."""
        recipe = []
        for name in self.passes_for(quantize):
            p = get_pass(name)(**self.pass_settings(name))
            model = p.apply(model, ctx)
            recipe.append(p.describe())
        return model, tuple(recipe)

    def canonicalize_settings(self) -> dict[str, Any]:
        """Settings this target needs from the canonicalize pass (e.g. ``{"batch_size": 1}`` for a
        format that takes fixed shapes); explicit canonicalize settings still win."""
        return {}

    def io_specs(self, model_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """Inputs and outputs of a compiled model, read from the file. Used for the manifest when no
        runtime for the format can load the model on this machine (``Runtime.unavailable_reason``)."""
        raise NotImplementedError(f"target '{self.name}' cannot describe a model without its runtime")

    # -- public --------------------------------------------------------------------------------
    def unsupported_nodes(self, model: onnx.ModelProto) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for i, node in enumerate(iter_nodes(model.graph)):
            if not self.is_supported(node):
                found.setdefault(op_key(node), []).append(node.name or f"#{i}")
        return found

    def check_supported(self, model: onnx.ModelProto) -> None:
        if unsupported := self.unsupported_nodes(model):
            raise UnsupportedOpsError(self.name, unsupported)

    def check_quantize(self, quantize: str) -> None:
        if quantize not in self.quantize_modes:
            raise UserInputError(f"target '{self.name}' does not offer --quantize {quantize}; "
                                 f"it offers: {', '.join(self.quantize_modes)}")

    def compile(self, model: onnx.ModelProto, quantize: str | QuantizeMode, ctx: PassContext,
                out_dir: Path) -> CompiledModel:
        mode = quantize if isinstance(quantize, QuantizeMode) else self.mode_for(quantize)
        self.check_quantize(mode.name)
        out = Path(out_dir) / self.model_file
        try:
            with quiet_loggers(), native_output(self.name), python_prints(self.name):
                return self._compile(model, mode, ctx, out)
        except EdgeoptError:
            raise
        except OSError as exc:
            if exc.errno not in ENVIRONMENT_ERRNOS:
                raise ConversionError(f"{self.name}: {exc}") from exc
            raise environment_fault(exc, out) from exc
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConversionError(f"target '{self.name}' failed to compile: {first}") from exc


def get_target(name: str) -> type[Target]:
    return registry.load(registry.TARGETS, name)
