"""Quantization passes built on onnxruntime.quantization (and ORT's fp16 converter).

- ``quantize-int8``: static post-training quantization, QDQ format, per-channel weights, calibrated
  on the calibration set with min-max, entropy or percentile ranges;
- ``quantize-int8-dynamic``: int8 weights, activations quantized at run time;
- ``quantize-fp16``: float16 weights and compute, float32 I/O unless asked otherwise;
- ``quantize-int4``: block-wise weight-only INT4 for MatMul/Gemm (MatMulNBits, or blocked
  DequantizeLinear with ``format=qdq``).
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeopt.batching import calls, with_axes
from edgeopt.converters.passes import ConversionError, Pass, PassContext
from edgeopt.converters.passes.canonicalize import upgrade_opset
from edgeopt.converters.passes.mixed_precision import (
    Budget,
    Scorer,
    fewest_float_nodes,
    kept_float_nodes,
    quantized_nodes,
    refuse_unknown_nodes,
    sensitivities,
)
from edgeopt.data import Dataset
from edgeopt.errors import UserInputError
from edgeopt.onnx_io import input_specs, iter_nodes, toposort
from edgeopt.params import Param, in_range

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
INT16_OPSET = 21  # 16-bit QuantizeLinear / DequantizeLinear
# kept_precision → what the report says the kept nodes run at
KEPT_PRECISIONS = {"float": "float32", "int16": "int16 activations, int8 weights"}
RANKING_KEPT = 20  # the most sensitive nodes the report lists


class CalibrationReader:
    """Feeds the calibration samples to ORT as ``model`` takes them — one per call, or as many as its
    fixed batch holds (the last call padded with the last sample repeated) — ticking a progress bar."""

    def __init__(self, data: Dataset, model: onnx.ModelProto, tick):
        self._it = calls(with_axes(input_specs(model), data.axes), data.inputs, batch_size=1)
        self._tick = tick

    def get_next(self) -> dict[str, np.ndarray] | None:
        call = next(self._it, None)
        if call is None:
            return None
        self._tick(call[1])
        return call[0]

    def rewind(self) -> None:  # part of ORT's CalibrationDataReader protocol; one pass is all we need
        pass


class QuantizeInt8Static(Pass):
    name: ClassVar[str] = "quantize-int8"
    summary: ClassVar[str] = "static INT8 post-training quantization (QDQ, per-channel weights)"
    min_opset: ClassVar[int | None] = 13  # per-channel DequantizeLinear (its 'axis') is opset 13
    params: ClassVar[tuple[Param, ...]] = (
        Param("calibration_method", str, "minmax", "how activation ranges are chosen from the calibration set",
              choices=CALIBRATION_METHODS),
        Param("percentile", float, 99.999, "percentile kept when calibration_method=percentile",
              check=in_range(90.0, 100.0)),
        Param("per_channel", bool, True, "one scale per output channel of each weight"),
        Param("activation_type", str, "int8", "integer type of activations", choices=("int8", "uint8")),
        Param("reduce_range", bool, False, "7-bit weights, so that x86's u8 x s8 multiply (VPMADDUBSW, on CPUs "
              "without VNNI) cannot saturate its 16-bit sums"),
        Param("max_calibration_samples", int, 512, "use at most this many calibration samples",
              check=lambda v: None if v >= 1 else "must be >= 1"),
        Param("min_calibration_samples", int, 16, "refuse calibration sets smaller than this",
              check=lambda v: None if v >= 1 else "must be >= 1"),
        Param("keep_float", str, None, "comma-separated node names left in float (`edgeopt analyze` ranks "
              "the candidates)"),
        Param("kept_precision", str, "float",
              "what the nodes kept out of INT8 (keep_float, or the budget search) run at: float, or int16 "
              "activations with INT8 weights (QDQ int16, opset 21: a model nearly as small as all-INT8; ONNX "
              "Runtime's CPU kernels compute those nodes in float between the 16-bit Q/DQ pairs)",
              choices=tuple(KEPT_PRECISIONS)),
        Param("min_cosine", float, None, "when the INT8 model's cosine vs float on the validation inputs is "
              "below this, keep its most sensitive nodes in float, as few as meet it (set by --min-cosine)",
              check=in_range(-1.0, 1.0)),
        Param("max_accuracy_drop", float, None, "when the INT8 model loses more than this on the labelled "
              "validation set (top-1 points, or MAE for regression labels), keep its most sensitive nodes in "
              "float, as few as meet it (set by --max-accuracy-drop)", check=lambda v: None if v >= 0 else "must be >= 0"),
    )

    def _apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        if ctx.calibration is None:
            raise UserInputError("--quantize int8 needs calibration data: pass --calibration DATA "
                                 "(.npz with one array per input, or .npy)")
        data = ctx.calibration.take(self.config["max_calibration_samples"])
        if len(data) < self.config["min_calibration_samples"]:
            raise UserInputError(
                f"calibration set {data.source} has {len(data)} samples; int8 calibration needs at least "
                f"{self.config['min_calibration_samples']} for stable activation ranges")
        src, pre, out = (ctx.workdir / f"int8-{s}.onnx" for s in ("src", "pre", "out"))
        onnx.save_model(model, str(src))
        quant_pre_process(str(src), str(pre))
        pre.with_name(f"{pre.stem}-opset{INT16_OPSET}.onnx").unlink(missing_ok=True)  # made from this `pre` only
        keep = kept_float_nodes(self.config["keep_float"])
        refuse_unknown_nodes(keep, (n.name for n in onnx.load(str(pre), load_external_data=False).graph.node))
        budget = self.budget(ctx)
        cache = ctx.workdir / "int8-ranges.json" if budget else None
        if cache is not None:
            cache.unlink(missing_ok=True)
        with ctx.progress("calibrating", len(data)) as tick:
            self.quantize(pre, out, CalibrationReader(data, model, tick), nodes_to_exclude=keep,
                          calibration_cache=cache)
        details: dict[str, Any] = {"calibration_samples": len(data), "calibration_source": data.source,
                                   "kept_float": keep, "precision": KEPT_PRECISIONS[self.config["kept_precision"]]}
        if budget:
            details["mixed_precision"] = self._mixed_precision(
                pre, out, cache, keep, data if ctx.validation is None else ctx.validation, budget, ctx)
            details["kept_float"] = keep + details["mixed_precision"]["kept_float"]
        ctx.details[self.name] = details
        return onnx.load(str(out))

    def budget(self, ctx: PassContext) -> Budget:
        """The accuracy budget the pass keeps nodes float for; an accuracy drop only with labels."""
        return Budget.given(self.config["min_cosine"], self.config["max_accuracy_drop"], ctx.validation)

    def _mixed_precision(self, pre: Path, out: Path, cache: Path, keep: list[str], validation: Dataset,
                         budget: Budget, ctx: PassContext) -> dict[str, Any]:
        """When the INT8 model at ``out`` misses ``budget`` against the float model on the validation
        inputs: rank the nodes by sensitivity, keep the fewest most sensitive ones float that meet it
        (``mixed_precision.fewest_float_nodes``) and leave that model at ``out``."""
        data, labels = budget.scoring_data(validation)
        score = Scorer.onnx(pre, data.inputs, labels, data.task)
        all_int8 = score(out)
        found: dict[str, Any] = {**budget.to_json(), "cosine_all_int8": all_int8["cosine"], "kept_float": [],
                                 "precision": KEPT_PRECISIONS[self.config["kept_precision"]],
                                 "cosine": all_int8["cosine"], "size_bytes_all_int8": out.stat().st_size,
                                 "samples": len(data)}
        if "accuracy_drop" in all_int8:
            found["accuracy_drop_all_int8"] = found["accuracy_drop"] = all_int8["accuracy_drop"]
        if budget.met(all_int8):
            return found
        ctx.all_int8 = ctx.workdir / "int8-all.onnx"
        shutil.copyfile(out, ctx.all_int8)

        def quantize(path: Path, nodes_to_quantize=None, nodes_to_exclude=()) -> None:
            self.quantize(pre, path, None, nodes_to_quantize=nodes_to_quantize,
                          nodes_to_exclude=[*keep, *nodes_to_exclude], calibration_cache=cache)

        float_model = onnx.load(str(pre), load_external_data=False)
        nodes = [n for n in quantized_nodes(float_model, onnx.load(str(out), load_external_data=False))
                 if n.name not in keep]
        with ctx.progress("ranking nodes for mixed precision", len(nodes)) as tick:
            rows = sensitivities(quantize, score, nodes, ctx.workdir, tick)
        found["ranking"] = rows[:RANKING_KEPT]  # the report's analysis when the gate still fails
        ranking = [row["node"] for row in rows]
        with ctx.progress("keeping the fewest nodes float", None) as tick:
            search = fewest_float_nodes(quantize, score, ranking, budget, out, tick)
        if search is None:
            quantize(out)  # the all-INT8 model again; the quality gate reports the miss
            ctx.notes.append(f"quantize-int8: even with all {len(ranking)} quantized nodes in float the budget "
                             f"({budget}) is missed; the all-INT8 model is kept")
            return {**found, "candidates": len(ranking)}
        found.update(search, candidates=len(ranking))
        return found

    def quantize(self, pre: Path, out: Path, reader: Any | None, *, nodes_to_quantize: list[str] | None = None,
                 nodes_to_exclude: list[str] | None = None, calibration_cache: Path | None = None) -> None:
        """ONNX Runtime's ``quantize_static`` of the pre-processed model ``pre`` into ``out`` with this
        pass's settings. Given ``calibration_cache``, the activation ranges are written there by the
        first call (``reader`` given) and read back by later ones (``reader`` None): one calibration for
        many quantizations of the same model (``edgeopt.converters.analyze``)."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        cached: dict[str, Any] = {}
        if calibration_cache is not None:
            if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
                import onnxruntime

                raise UserInputError(f"ranking nodes for mixed precision calibrates once and needs ONNX Runtime's "
                                     f"calibration cache (quantize_static's calibration_cache_path), which "
                                     f"onnxruntime {onnxruntime.__version__} lacks: pip install -U onnxruntime")
            cached["calibration_cache_path"] = str(calibration_cache)
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[self.config["calibration_method"]]
        extra: dict[str, Any] = {"CalibMovingAverage": False}
        if method == CalibrationMethod.Percentile:
            extra["CalibPercentile"] = self.config["percentile"]
        if nodes_to_exclude and self.config["kept_precision"] == "int16":
            # the kept nodes stay quantized, their activations in 16 bits (ONNX Runtime's per-tensor
            # overrides); 16-bit QuantizeLinear is standard from opset 21, to which the model is upgraded
            wide = QuantType.QInt16 if self.config["activation_type"] == "int8" else QuantType.QUInt16
            extra["TensorQuantOverrides"] = {t: [{"quant_type": wide}] for t in _activations_of(pre, nodes_to_exclude)}
            nodes_to_exclude = None
            wide_pre = pre.with_name(f"{pre.stem}-opset{INT16_OPSET}.onnx")
            if not wide_pre.exists():  # once per conversion: the search quantizes the same model many times
                onnx.save_model(upgrade_opset(onnx.load(str(pre)), INT16_OPSET)[0], str(wide_pre))
            pre = wide_pre
        quantize_static(
            str(pre), str(out), reader,
            quant_format=QuantFormat.QDQ, per_channel=self.config["per_channel"],
            activation_type=QuantType.QInt8 if self.config["activation_type"] == "int8" else QuantType.QUInt8,
            weight_type=QuantType.QInt8, reduce_range=self.config["reduce_range"], calibrate_method=method,
            extra_options=extra, nodes_to_quantize=nodes_to_quantize, nodes_to_exclude=nodes_to_exclude, **cached,
        )


def _activations_of(model_path: Path, nodes: list[str]) -> list[str]:
    """The activation tensors (not initializers) that ``nodes`` read or write."""
    model = onnx.load(str(model_path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    chosen = set(nodes)
    return sorted({t for n in model.graph.node if n.name in chosen for t in [*n.input, *n.output]
                   if t and t not in weights})


class QuantizeInt8Dynamic(Pass):
    name: ClassVar[str] = "quantize-int8-dynamic"
    summary: ClassVar[str] = "INT8 weights; activations quantized at run time (no calibration data)"
    min_opset: ClassVar[int | None] = 13
    params: ClassVar[tuple[Param, ...]] = (
        Param("per_channel", bool, True, "one scale per output channel of each weight"),
    )

    def _apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process

        src, pre, out = (ctx.workdir / f"dyn-{s}.onnx" for s in ("src", "pre", "out"))
        onnx.save_model(model, str(src))
        quant_pre_process(str(src), str(pre))
        quantize_dynamic(str(pre), str(out), per_channel=self.config["per_channel"], weight_type=QuantType.QInt8)
        return onnx.load(str(out))


class QuantizeFp16(Pass):
    name: ClassVar[str] = "quantize-fp16"
    summary: ClassVar[str] = "float16 weights and compute"
    params: ClassVar[tuple[Param, ...]] = (
        Param("keep_io_types", bool, True, "keep model inputs and outputs float32 (casts inside the model)"),
    )

    def _apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        out = convert_float_to_float16(model, keep_io_types=self.config["keep_io_types"])
        toposort(out.graph)  # the converter appends its I/O casts after the nodes that read them
        return out


class QuantizeInt4(Pass):
    name: ClassVar[str] = "quantize-int4"
    summary: ClassVar[str] = "block-wise weight-only INT4 for MatMul/Gemm"
    params: ClassVar[tuple[Param, ...]] = (
        Param("block_size", int, 32, "weights per quantization block along the reduction axis",
              choices=(16, 32, 64, 128, 256)),
        Param("symmetric", bool, True, "symmetric blocks (no zero points)"),
        Param("format", str, "matmulnbits", "MatMulNBits contrib op (ONNX Runtime) or standard blocked "
              "DequantizeLinear + MatMul (opset 21)", choices=("matmulnbits", "qdq")),
    )

    def _apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        from onnxruntime.quantization import QuantFormat
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        model = gemm_to_matmul(model)
        quantizer = MatMulNBitsQuantizer(
            model, bits=4, block_size=self.config["block_size"], is_symmetric=self.config["symmetric"],
            quant_format=QuantFormat.QOperator if self.config["format"] == "matmulnbits" else QuantFormat.QDQ,
            op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
        out = quantizer.model.model
        quantized = sum(n.op_type in ("MatMulNBits", "DequantizeLinear") for n in out.graph.node)
        if quantized == 0:
            raise ConversionError("pass 'quantize-int4' found no MatMul/Gemm with constant weights to quantize")
        ctx.details[self.name] = {"quantized_matmuls": quantized}
        return out


def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite Gemm with a constant B (alpha=beta=1, no transA) as MatMul (+ Add of C).

    ORT's MatMulNBits quantizer only handles MatMul, and torch exports every Linear as Gemm; this
    small rewrite is the missing piece (no library does it in the direction we need: onnxslim fuses
    MatMul+Add *into* Gemm).
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    specs = {s.name for s in input_specs(model)}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or node.input[1] in specs):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        wname = f"{node.input[1]}_kn"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), wname))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], wname], [mm_out], name=f"{node.name}_matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in iter_nodes(graph) for i in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return model
