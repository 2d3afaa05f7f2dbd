"""The TFLite / LiteRT target: ONNX → .tflite FlatBuffer, written with LiteRT's own schema bindings
(no TensorFlow), quantized with LiteRT's own quantizers.

Pipeline inside ``_compile``: fix the batch dim and fold what that makes constant (prepare), check
every node against the lowering rules, lower to builtin operators (channels-last inside, NHWC or
NCHW at the edges), quantize, store mostly-zero weights sparse (``sparse``), write, and load the
result in LiteRT with XNNPACK on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import onnx

from edgeopt.converters.modes import MODES
from edgeopt.converters.passes import ConversionError, PassContext
from edgeopt.converters.passes.mixed_precision import Budget, kept_float_nodes
from edgeopt.converters.targets import CompiledModel, QuantizeMode, Target
from edgeopt.errors import MissingDependency, UnsupportedOpsError, UserInputError
from edgeopt.onnx_io import iter_nodes, op_key
from edgeopt.params import Param, in_range
from edgeopt.runtime.litert import LiteRtRuntime

# Importing the op modules registers their lowerings in ``lowering.RULES``.
from . import ops_conv, ops_dense, ops_elementwise, ops_reduce, ops_resize, ops_rnn, ops_shape  # noqa: F401
from .lowering import GraphFacts, Lowering, LoweringError, Node, graph_facts, unsupported_reason
from .micro import FILES as MICRO_FILES
from .micro import build as build_micro
from .micro import require_tflite_micro
from .mixed import mixed_int8
from .prepare import static_model
from .quantize import INT4_BLOCK_SIZES, quantize_model
from .sparse import store_sparse, summary

FLATBUFFER_LIMIT = 2**31  # FlatBuffers address at most 2 GiB

# quantize-int8's, read by mixed.py
MIXED_PRECISION_PARAMS = ("keep_float", "min_cosine", "max_accuracy_drop", "kept_precision")
CALIBRATION_METHODS = ("minmax",)  # what LiteRT's calibrator records


@dataclass(frozen=True)
class Lowered:
    """A canonical ONNX model lowered to a float .tflite, and what quantizing it needs to know."""
    data: bytes
    io_transposes: dict[str, list[int]]            # see ``CompiledModel.io_transposes``
    op_origins: dict[str, list[tuple[str, str]]]   # TFLite operator → (ONNX op, node) it came from
    node_scopes: dict[str, list[tuple[str, str]]]  # ONNX node → (builtin, quantizer scope) per operator
    weight_origins: dict[str, str]                 # constant tensor → the ONNX node it belongs to


def _has_dynamic_batch(model: onnx.ModelProto) -> bool:
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim  # after the front end, any dynamic dim is a batch axis
        if vi.name not in inits and any(not (d.HasField("dim_value") and d.dim_value > 0) for d in dims):
            return True
    return False


def require_litert(purpose: str) -> None:
    try:
        import ai_edge_litert  # noqa: F401
        import flatbuffers  # noqa: F401
    except ImportError as exc:
        raise MissingDependency(exc.name or "ai_edge_litert", "tflite", purpose) from exc


class TFLiteTarget(Target):
    name: ClassVar[str] = "tflite"
    format: ClassVar[str] = "tflite"
    runtime: ClassVar[str] = "litert"
    model_file: ClassVar[str] = "model.tflite"
    quantize_modes: ClassVar[tuple[str, ...]] = ("none", "fp16", "int8", "int8-dynamic", "int16x8", "int4")
    toolchain: ClassVar[tuple[str, ...]] = ("ai-edge-litert", "litert-quantizer", "flatbuffers")
    max_model_bytes: ClassVar[int | None] = FLATBUFFER_LIMIT
    integer_activations: ClassVar[bool] = True
    params: ClassVar[tuple[Param, ...]] = (
        Param("float_io", bool, False,
              "with --quantize int8/int16x8: keep float32 inputs and outputs (default: integer I/O, full-integer)"),
        Param("keep_io_layout", bool, False,
              "keep the ONNX (NCHW / NCL) layout of inputs and outputs (default: channels-last at the edges)"),
        Param("sparse_min_zeros", float, 0.5,
              "store conv / fully-connected weights that are at least this fraction zeros (e.g. after "
              "--prune-sparsity) in TFLite's sparse format behind a DENSIFY, where that is smaller and LiteRT "
              "runs it: at 50 % zeros float32 weights take 0.63-0.75x their dense bytes; with fewer zeros the "
              "saving is small next to the dense copy LiteRT makes at load. 1: never",
              check=in_range(0.0, 1.0, lo_open=True)),
    )

    # -- settings --------------------------------------------------------------------------------
    def honoured_pass_params(self, quantize: str) -> dict[str, frozenset[str]]:
        """LiteRT's own quantizers, not ONNX Runtime's passes: of those passes' parameters only the int4
        block size, the calibration method its calibrator has (min/max, checked in check_quantize), and
        for int8 the nodes kept out of INT8, their precision and the accuracy budget that chooses them
        (``mixed.py``)."""
        if quantize == "int4":
            return {"quantize-int4": frozenset({"block_size"})}
        if quantize == "int8":
            return {"quantize-int8": frozenset({"calibration_method", *MIXED_PRECISION_PARAMS})}
        if MODES[quantize].calibrated:
            return {"quantize-int8": frozenset({"calibration_method"})}
        return {}

    def calibrates(self, quantize: str) -> bool:
        return MODES[quantize].calibrated

    def unused_params(self, quantize: str) -> dict[str, str]:
        if MODES[quantize].calibrated:
            return {}
        return {"float_io": f"with --quantize {quantize}: it applies with --quantize int8 or int16x8 (integer I/O)"}

    @property
    def micro(self) -> bool:
        """For a microcontroller: a profile whose runtime is TFLite Micro (``micro.py``)."""
        return self.profile is not None and self.profile.runtime == "tflite-micro"

    def check_quantize(self, quantize: str) -> None:
        super().check_quantize(quantize)
        if self.micro and (quantize != "int8" or self.config["float_io"]):
            raise UserInputError(f"profile '{self.profile.name}' runs TFLite Micro, which needs a full-integer "
                                 f"model: --quantize int8 without --float-io (got --quantize {quantize}"
                                 f"{' --float-io' if self.config['float_io'] else ''})")
        if self.micro:
            require_tflite_micro()  # before any work: the model is run in it
        mode = self.mode_for(quantize)
        method, block = mode.calibration_method, mode.block_size
        if method not in (None, *CALIBRATION_METHODS):
            raise UserInputError(f"--calibration-method {method}: target 'tflite' calibrates with LiteRT's calibrator, "
                                 f"which records min/max ranges only: use --calibration-method minmax, or --target "
                                 f"onnx for {method}")
        if block is not None and block not in INT4_BLOCK_SIZES:
            raise UserInputError(f"--int4-block-size {block}: LiteRT's block-wise int4 supports "
                                 f"{', '.join(map(str, INT4_BLOCK_SIZES))}")

    # -- support ---------------------------------------------------------------------------------
    def is_supported(self, node: onnx.NodeProto) -> bool:
        return unsupported_reason(Node.of(node), GraphFacts()) is None

    def unsupported_nodes(self, model: onnx.ModelProto) -> dict[str, list[str]]:
        """Op type, attributes and graph context (constant weights, float tensors) per node; the key
        says why when the op type itself is supported, e.g. ``Pad[mode=edge]``."""
        found = self._unsupported(model)
        if found and _has_dynamic_batch(model):
            # Shape arithmetic on a dynamic batch dim (an RNN's zero initial state, a Reshape to
            # [batch, -1]) folds away once the batch is fixed, as compiling does: judge that graph.
            try:
                return self._unsupported(static_model(model, None))
            except Exception:  # a graph onnxslim cannot fold: report what the raw graph has
                return found
        return found

    @staticmethod
    def _unsupported(model: onnx.ModelProto) -> dict[str, list[str]]:
        facts = graph_facts(model)
        found: dict[str, list[str]] = {}
        for i, proto in enumerate(iter_nodes(model.graph)):
            reason = unsupported_reason(Node.of(proto, i), facts)
            if reason is not None:
                key = op_key(proto) + (f"[{reason}]" if reason else "")
                found.setdefault(key, []).append(proto.name or f"#{i}")
        return found

    # -- compile ---------------------------------------------------------------------------------
    def lower(self, model: onnx.ModelProto, ctx: PassContext, quantize: str = "none") -> Lowered:
        """The float .tflite of a canonical ONNX model; ``quantize`` lets the lowering pick
        integer-friendly forms for a model headed for full-integer quantization."""
        require_litert("the tflite target")
        model = static_model(model, ctx)
        self.check_supported(model)
        lowering = Lowering(model, keep_io_layout=self.config["keep_io_layout"],
                            full_integer=MODES[quantize].calibrated,
                            dynamic_recurrent_weights=quantize in ("none", "fp16"))
        try:
            data = lowering.run()
        except LoweringError as exc:
            raise UnsupportedOpsError(self.name, {f"{exc.node.op}[{exc.reason}]": [exc.node.name]}) from exc
        return Lowered(data, dict(lowering.io_perms), lowering.b.origins(), lowering.b.node_scopes(),
                       lowering.b.constant_origins())

    def _compile(self, model: onnx.ModelProto, mode: QuantizeMode, ctx: PassContext, out: Path) -> CompiledModel:
        lowered = self.lower(model, ctx, mode.name)
        data = lowered.data
        if mode.compresses:
            settings = self.honoured_pass_params(mode.name)
            given = {name: self.pass_params.get(name) or {} for name in settings}
            chosen = {k: given[name][k] for name, keys in settings.items() for k in keys if k in given[name]}
            keep = kept_float_nodes(chosen.get("keep_float"))
            budget = Budget.given(chosen.get("min_cosine"), chosen.get("max_accuracy_drop"), ctx.validation)
            if keep and self.config["float_io"]:
                raise UserInputError("--keep-float with --float-io on target 'tflite': LiteRT's "
                                     "quantizer, which leaves layers float, writes integer I/O; drop one of them")
            if budget and self.config["float_io"]:  # the budget stays a check, as before mixed precision
                ctx.notes.append("tflite: --float-io: no layers are kept float for the accuracy budget (LiteRT's "
                                 "quantizer, which would, writes integer I/O); the budget is only checked")
                budget = Budget()
            if not keep:
                data = quantize_model(data, mode, ctx, io_transposes=lowered.io_transposes,
                                      float_io=bool(mode.calibrated and self.config["float_io"]),
                                      origins=lowered.op_origins)
            if keep or budget:
                data, mixed = mixed_int8(lowered.data, None if keep else data, ctx, keep=keep, budget=budget,
                                         node_scopes=lowered.node_scopes, io_transposes=lowered.io_transposes,
                                         wide=chosen.get("kept_precision") == "int16")
                ctx.details.setdefault("quantize-tflite", {"mode": mode.name})["mixed_precision"] = mixed
        if len(data) >= FLATBUFFER_LIMIT:
            raise UserInputError(f"the converted model is {len(data) / 2**30:.1f} GiB; a .tflite FlatBuffer holds "
                                 f"at most 2 GiB")
        expanded = self._write_sparse_or_dense(data, ctx, out, lowered.weight_origins)
        compiled = CompiledModel(out, io_transposes=lowered.io_transposes, expanded_weight_bytes=expanded,
                                 activation_bytes=self.activation_bytes(mode))
        if not self.micro:
            return compiled
        made = build_micro(out, out.parent, lowered.op_origins, ctx.validation, dict(lowered.io_transposes))
        ctx.details["tflite-micro"] = made.details
        return dataclasses.replace(compiled, extra_files=MICRO_FILES, problems=made.problems, arena_bytes=made.arena_bytes,
                                   code_bytes=self.profile.code_bytes)

    def _write_sparse_or_dense(self, data: bytes, ctx: PassContext, out: Path,
                               weight_origins: Mapping[int, str] | None) -> int:
        """Write the model with its mostly-zero weights stored sparse, and check that LiteRT loads it;
        should LiteRT refuse it, write the dense model instead and say why in the report. Returns the
        bytes LiteRT densifies in memory at load (the sparse weights')."""
        # TFLite Micro has no DENSIFY kernel: a microcontroller's weights are stored dense
        min_zeros = 1.0 if self.micro else float(self.config["sparse_min_zeros"])
        sparse, records = store_sparse(data, min_zeros, origins=weight_origins)
        out.write_bytes(sparse)
        try:
            check_loads(out)
        except ConversionError as exc:
            if sparse is data:
                raise
            why = f"LiteRT refused the sparse model ({exc}); stored dense"
            for r in records:
                if r.stored == "sparse":
                    r.stored, r.reason = "dense", why
            out.write_bytes(data)
            check_loads(out)
        stored = [r for r in records if r.stored == "sparse"]
        expanded = sum(r.dense_bytes for r in stored)
        ctx.details.setdefault("tflite", {})["sparse_storage"] = summary(records, min_zeros)
        # mostly zeros, yet dense for a reason other than size: say so where the engineer looks first
        kept = [r for r in records if r.stored == "dense" and r.sparsity >= min_zeros
                and (r.sparse_bytes is None or r.reason.startswith("LiteRT refused"))]
        if kept:
            reasons = sorted({r.reason for r in kept if r.reason})
            ctx.notes.append(f"tflite: {len(kept)} weight tensor(s) are at least {min_zeros:.0%} zeros but stored "
                             f"dense: {'; '.join(reasons)} (see pass_details.tflite.sparse_storage)")
        return expanded


def check_loads(path: Path) -> None:
    """Load the written model as a device would (XNNPACK on) so a refused graph fails here."""
    try:
        LiteRtRuntime(path, threads=1)
    except UserInputError as exc:
        raise ConversionError(f"LiteRT cannot load the converted model: {exc}") from exc
