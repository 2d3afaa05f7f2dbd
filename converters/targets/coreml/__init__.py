"""The Core ML target: ONNX → Core ML ML Program (``model.mlpackage``), optionally with compressed weights.

ONNX (canonicalised, shapes fixed) is lowered op by op to a MIL program with coremltools' MIL
builder (``lowering``), converted with ``ct.convert`` at the deployment target's opset and compute
precision, its weights compressed with ``coremltools.optimize.coreml`` (``compression``), saved, and
the saved package verified (``verify``). The deployment target comes from the profile
(``[coreml] minimum_deployment_target``) unless ``--minimum-deployment-target`` overrides it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import onnx

from edgeopt.converters.passes import ConversionError, PassContext
from edgeopt.converters.passes.mixed_precision import kept_float_nodes, refuse_unknown_nodes
from edgeopt.converters.targets import CompiledModel, QuantizeMode, Target
from edgeopt.converters.targets.coreml.compression import (
    captured_coremltools_log,
    compress,
    scheme_for,
    weights_by_consumer,
    weights_of_ops,
    zero_fraction,
)
from edgeopt.converters.targets.coreml.deployment import (
    BLOCKWISE_INT4,
    COMPRESSED_WEIGHTS,
    DEFAULT_DEPLOYMENT_TARGET,
    DEPLOYMENT_TARGETS,
    SPEC_VERSIONS,
    deployment_target,
    releases_for,
)
from edgeopt.converters.targets.coreml.lowering import RULES, NodeLoweringError, lower
from edgeopt.converters.targets.coreml.packing import pass_pipeline, small_constants_inline
from edgeopt.converters.targets.coreml.rules import LoweringError
from edgeopt.converters.targets.coreml.verify import verify_package
from edgeopt.errors import UnsupportedOpsError, UserInputError
from edgeopt.onnx_io import input_specs, iter_nodes, op_key, output_specs
from edgeopt.params import Param, in_range
from edgeopt.profiles import Profile
from edgeopt.runtime.coreml import IO_NAMES_KEY, feature_specs, import_coremltools
from edgeopt.specs import TensorSpec

COMPUTE_PRECISIONS = ("fp16", "fp32")


def _batch_size(v: int) -> str | None:
    return None if v >= 1 else "must be >= 1"


class CoreMLTarget(Target):
    name: ClassVar[str] = "coreml"
    format: ClassVar[str] = "coreml"
    runtime: ClassVar[str] = "coreml"
    model_file: ClassVar[str] = "model.mlpackage"
    quantize_modes: ClassVar[tuple[str, ...]] = ("none", "fp16", "int8", "int4")
    toolchain: ClassVar[tuple[str, ...]] = ("coremltools",)
    params: ClassVar[tuple[Param, ...]] = (
        Param("compute_precision", str, "fp16", "Core ML compute precision (and weight storage without "
              "compression)", choices=COMPUTE_PRECISIONS),
        Param("minimum_deployment_target", deployment_target, None,
              f"oldest OS the model must run on (default: the profile's, else {DEFAULT_DEPLOYMENT_TARGET}); "
              "--quantize int4 needs iOS18 / macOS15", choices=DEPLOYMENT_TARGETS),
        Param("palettize", int, None, "k-means palettize weights to a 2^N-entry lookup table per tensor",
              choices=(4, 6, 8)),
        Param("sparse_min_zeros", float, 0.25, "without --quantize int8/int4 or --palettize: store weights that "
              "are at least this fraction zeros (e.g. after --prune-sparsity) as Core ML sparse weights",
              check=in_range(0.0, 1.0, lo_open=True)),
        Param("compress_min_weights", int, 512, "with weight compression: tensors with fewer weights stay "
              "uncompressed (their scales / table would cost more than they save)",
              check=lambda v: None if v >= 1 else "must be >= 1"),
        Param("batch_size", int, None, "batch size of the Core ML model when the ONNX batch dim is dynamic "
              "(default: the profile's, else 1)", check=_batch_size),
    )

    def __init__(self, pass_params: dict[str, dict] | None = None, profile: Profile | None = None, **settings):
        super().__init__(pass_params=pass_params, profile=profile, **settings)
        chosen = self.config["minimum_deployment_target"]
        from_profile = profile.coreml_deployment_target if profile else None
        if chosen is None and from_profile:
            chosen = deployment_target(from_profile)
            if chosen not in SPEC_VERSIONS:
                raise UserInputError(f"{profile.source}: [coreml] minimum_deployment_target {from_profile!r} is "
                                     f"not one of {', '.join(DEPLOYMENT_TARGETS)}")
            self.deployment_source = f"profile '{profile.name}'"
        elif chosen is None:
            chosen, self.deployment_source = DEFAULT_DEPLOYMENT_TARGET, "the default"
        else:
            self.deployment_source = "--minimum-deployment-target"
        self.config["minimum_deployment_target"] = chosen
        self.spec_version = SPEC_VERSIONS[chosen]

    # -- checks before any work --------------------------------------------------------------------
    def check_quantize(self, quantize: str) -> None:
        super().check_quantize(quantize)
        cfg = self.config
        chosen = [f"--quantize {quantize}"] if quantize in ("int8", "int4") else []
        chosen += [f"--palettize {cfg['palettize']}"] if cfg["palettize"] else []
        if len(chosen) > 1:
            raise UserInputError(f"target 'coreml' compresses weights one way at a time; got {' and '.join(chosen)}")
        if quantize == "fp16" and cfg["compute_precision"] == "fp32":
            raise UserInputError("--compute-precision fp32: target 'coreml' with --quantize fp16 stores weights in "
                                 "float16, which needs --compute-precision fp16")
        where = f"{cfg['minimum_deployment_target']} (from {self.deployment_source})"
        if quantize == "int4" and self.spec_version < BLOCKWISE_INT4:
            raise UserInputError(
                f"--quantize int4 needs Core ML's per-block INT4 weights, which run on {releases_for(BLOCKWISE_INT4)} "
                f"and later; the deployment target is {where}. Use --minimum-deployment-target iOS18 for newer "
                f"devices, or --quantize int8 / --palettize 4 for this one")
        if chosen and self.spec_version < COMPRESSED_WEIGHTS:
            raise UserInputError(f"{chosen[0]}: compressed Core ML weights run on {releases_for(COMPRESSED_WEIGHTS)} "
                                 f"and later; the deployment target is {where}")

    def honoured_pass_params(self, quantize: str) -> dict[str, frozenset[str]]:
        """Weights are compressed by coremltools, not ONNX Runtime's passes: only the int4 block size,
        and for int8 the nodes whose weights stay uncompressed (--keep-float)."""
        return {"quantize-int4": frozenset({"block_size"})} if quantize == "int4" else \
            {"quantize-int8": frozenset({"keep_float"})} if quantize == "int8" else {}

    def unused_params(self, quantize: str) -> dict[str, str]:
        compressed = [f"--quantize {quantize}"] if quantize in ("int8", "int4") else []
        compressed += ["--palettize"] if self.config["palettize"] else []
        if not compressed:
            return {}
        return {"sparse_min_zeros": f"with {compressed[0]}: weights are stored compressed then, never sparse; it "
                                    f"applies without --quantize int8/int4 and --palettize"}

    def canonicalize_settings(self) -> dict[str, Any]:
        batch = self.config["batch_size"] or (self.profile.default_batch if self.profile else None) or 1
        return {"batch_size": batch}

    def is_supported(self, node: onnx.NodeProto) -> bool:
        return self.node_problem(node) is None

    @staticmethod
    def node_problem(node: onnx.NodeProto) -> str | None:
        """Why the target cannot lower ``node`` ('' when the op is unknown), or None."""
        rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is None:
            return ""
        return rule.problem(node)

    def unsupported_nodes(self, model: onnx.ModelProto) -> dict[str, list[str]]:
        """Ops with no Core ML lowering, attributes the lowering cannot express, and weights / shapes /
        axes that are computed at run time where Core ML needs constants — each named by node."""
        found: dict[str, list[str]] = {}
        constants = {i.name for i in model.graph.initializer}
        computed_from_inputs = self._computed_from_inputs(model)
        for i, node in enumerate(iter_nodes(model.graph)):
            problem = self.node_problem(node)
            if problem is None:
                rule = RULES[node.op_type]
                dynamic = [node.input[k] for k in rule.const_inputs
                           if k < len(node.input) and node.input[k] and node.input[k] not in constants
                           and node.input[k] in computed_from_inputs]
                if dynamic:
                    problem = f"a computed input {dynamic[0]!r} where Core ML needs a constant"
            if problem is not None:
                key = op_key(node) + (f" with {problem}" if problem else "")
                found.setdefault(key, []).append(node.name or f"#{i}")
        for spec in input_specs(model):
            if spec.dtype != "float32":
                found.setdefault(f"input of type {spec.dtype} (Core ML inputs here are float32)", []).append(spec.name)
        return found

    @staticmethod
    def _computed_from_inputs(model: onnx.ModelProto) -> set[str]:
        """Tensors that depend on a model input through something other than its shape (Shape of a
        tensor is a constant once shapes are fixed, so ``Reshape(x, Shape(y))`` stays foldable)."""
        live = {s.name for s in input_specs(model)}
        for node in model.graph.node:
            if node.op_type in ("Shape", "Size"):
                continue
            if any(i in live for i in node.input if i):
                live.update(o for o in node.output if o)
        return live

    def float_activation_bytes(self) -> int:
        return 2 if self.config["compute_precision"] == "fp16" else 4

    # -- compile -------------------------------------------------------------------------------------
    def _compile(self, model: onnx.ModelProto, mode: QuantizeMode, ctx: PassContext, out: Path) -> CompiledModel:
        quantize = mode.name
        lowered = self._lower(model)
        with small_constants_inline():  # both steps write the program and weight blob (see packing)
            mlmodel, messages = self._convert(lowered)
            weights = weights_by_consumer(mlmodel._mil_program)
            scheme = self._compression_scheme(mode, weights)
            adjusted: list[dict[str, Any]] = []
            keep = self._kept_weights(quantize, lowered, mlmodel, ctx)
            if scheme is not None:
                mlmodel, compression_messages, adjusted = compress(mlmodel, scheme, keep)
                messages += compression_messages
        self._save(mlmodel, lowered, model, out)
        verification = verify_package(
            out, spec_version=self.spec_version,
            inputs=[TensorSpec(s.name, s.concrete_shape(), "float32") for s in input_specs(model)],
            outputs=[TensorSpec(s.name, tuple(s.shape), "float32") for s in output_specs(model)],
            reference_weights=weights if scheme is not None else None)
        checked = verification.pop("compressed_weights")
        description = scheme.describe() if scheme else None
        if adjusted:
            description = {**description, "block_size_reduced": adjusted}
        ctx.details["coreml"] = {
            "minimum_deployment_target": self.config["minimum_deployment_target"],
            "deployment_target_from": self.deployment_source,
            "specification_version": self.spec_version,
            "compute_precision": self.config["compute_precision"],
            "compression": description,
            "verification": {**verification, "compressed_weights_checked": len(checked),
                             "compressed_weights_ok": all(w["ok"] for w in checked)},
            "compressed_weights": checked,
            "converter_messages": [m for m in messages if m.strip()][:20],
        }
        ctx.notes.extend(self._compression_notes(scheme, weights, checked))
        return CompiledModel(out, activation_bytes=self.activation_bytes(mode))

    def _lower(self, model: onnx.ModelProto) -> Any:
        """The MIL program; a node the lowering cannot express is reported like an unsupported op."""
        try:
            return lower(model, self.spec_version)
        except NodeLoweringError as exc:
            if exc.expected:  # a limit of the Core ML op set, found once shapes are known
                raise UnsupportedOpsError(self.name, {f"{op_key(exc.node)} ({exc.reason})": [exc.node_name]}) from exc
            raise ConversionError(f"target 'coreml' cannot lower {exc}") from exc
        except LoweringError as exc:
            raise ConversionError(f"target 'coreml': {exc}") from exc

    def _kept_weights(self, quantize: str, lowered: Any, mlmodel: Any, ctx: PassContext) -> frozenset[str]:
        """--keep-float with --quantize int8: the const ops of those nodes' weights, left uncompressed
        (at the compute precision); the report's mixed_precision lists the nodes."""
        given = (self.pass_params.get("quantize-int8") or {}).get("keep_float") if quantize == "int8" else None
        nodes = kept_float_nodes(given)
        if not nodes:
            return frozenset()
        refuse_unknown_nodes(nodes, lowered.ops_of, "Core ML")
        keep = weights_of_ops(mlmodel._mil_program, {op for n in nodes for op in lowered.ops_of[n]})
        precision = "float16" if self.config["compute_precision"] == "fp16" else "float32"
        ctx.details["quantize-coreml"] = {"mixed_precision": {"kept_float": nodes, "precision": precision,
                                                              "weights_kept": sorted(keep)}}
        return keep

    def _convert(self, lowered: Any) -> tuple[Any, list[str]]:
        """``ct.convert`` of the MIL program at the deployment target and compute precision."""
        ct = import_coremltools()
        precision = ct.precision.FLOAT16 if self.config["compute_precision"] == "fp16" else ct.precision.FLOAT32
        with captured_coremltools_log() as messages:
            mlmodel = ct.convert(lowered.program, convert_to="mlprogram", compute_precision=precision,
                                 minimum_deployment_target=ct.target(self.spec_version), skip_model_load=True,
                                 pass_pipeline=pass_pipeline(ct))
        return mlmodel, messages

    def _compression_scheme(self, mode: QuantizeMode, weights: dict[tuple[str, str], Any]) -> Any:
        # each setting is read only where it applies (unused_params refuses it elsewhere)
        quantize, block = mode.name, mode.block_size or 0
        compressed = quantize in ("int8", "int4") or self.config["palettize"]
        sparse_min_zeros = 1.0 if compressed else self.config["sparse_min_zeros"]
        candidates = list(weights.values()) if self.spec_version >= COMPRESSED_WEIGHTS else []
        return scheme_for(quantize, self.config["palettize"], block, self.config["compress_min_weights"],
                          sparse_min_zeros, candidates)

    def _save(self, mlmodel: Any, lowered: Any, model: onnx.ModelProto, out: Path) -> None:
        io_names = self._io_name_map(mlmodel.get_spec(), lowered)
        mlmodel.user_defined_metadata[IO_NAMES_KEY] = json.dumps(io_names, sort_keys=True)
        mlmodel.short_description = f"converted by edgeopt from {model.graph.name or 'an ONNX model'}"
        mlmodel.save(str(out))

    def _compression_notes(self, scheme: Any, weights: dict[tuple[str, str], Any], checked: list) -> list[str]:
        if scheme is None:
            return []
        notes = []
        name = scheme.describe()["scheme"]
        # compressed weights are never stored sparse, so --sparse-min-zeros does not apply: "mostly zeros"
        # here means at least the default fraction
        mostly = self.param("sparse_min_zeros").default
        mostly_zeros = scheme.kind != "sparse" and sum(
            w.size >= self.config["compress_min_weights"] and zero_fraction(w) >= mostly for w in weights.values())
        if mostly_zeros:
            notes.append(f"{mostly_zeros} weight tensor(s) are mostly zeros (pruned); {name} stores them densely "
                         "(sparse and quantized weights together are not offered)")
        if not checked:
            notes.append(f"{name}: no weight tensor was large enough to compress "
                         f"(--compress-min-weights {self.config['compress_min_weights']})")
        return notes

    @staticmethod
    def _io_name_map(spec: Any, lowered: Any) -> dict[str, dict[str, str]]:
        """Core ML feature name → ONNX name, for inputs and outputs (the converter may rename a MIL
        name once more when it is not a valid Core ML feature name)."""
        inputs = [f.name for f in spec.description.input]
        outputs = [f.name for f in spec.description.output]
        if len(inputs) != len(lowered.input_names) or len(outputs) != len(lowered.output_names):
            raise ConversionError("target 'coreml': the converted model's inputs/outputs differ from the ONNX model's")
        return {"inputs": dict(zip(inputs, lowered.input_names.values(), strict=True)),
                "outputs": dict(zip(outputs, lowered.output_names.values(), strict=True))}

    def io_specs(self, model_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return feature_specs(import_coremltools().utils.load_spec(str(model_path)))
