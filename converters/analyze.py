"""Per-layer INT8 sensitivity for ``edgeopt analyze``: which nodes cost the most when quantized.

For the ONNX Runtime QDQ quantization that ``--target onnx`` (and ``tvm``) ship: the model is
canonicalised as ``edgeopt convert`` does, activation ranges are calibrated **once** (ONNX Runtime's
calibration cache), then

- the whole model is quantized (the all-INT8 baseline), and
- every quantizable node is quantized **alone** (``nodes_to_quantize``, the ranges read back from the
  cache) and the model run on the validation inputs: its *sensitivity* is what that costs end to
  end, ``1 - cosine`` of the outputs against the float model's (the worst output), with the top-1
  agreement where the first output is classifier-shaped.

The ranking is what ``--keep-float`` (convert) needs: the nodes worth leaving in float, most costly
first. ``--target`` analyses the quantization that target ships:

- ``onnx`` and ``tvm``: ONNX Runtime QDQ, as above (the TVM target imports that QDQ graph);
- ``tflite``: LiteRT's own quantizer, calibrated once, every ONNX node quantized alone through the
  operators it was lowered to, LiteRT running both models (``targets/tflite/mixed.py``);
- ``coreml``: its INT8 compresses weights only (linear symmetric, per output channel; computed in
  float16 on the device) and nothing runs Core ML on Linux, so every compressed weight's own error
  is what is ranked: 1 - cosine of the dequantized weight against the original. One quantization and one ONNX Runtime session per node: a few tenths of a second each on a
small CNN, minutes on a detector with hundreds of nodes (``--weights-only`` keeps to the nodes with
weights). The pieces are in ``passes/mixed_precision.py``, which the ``quantize-int8`` pass uses to
keep nodes float when ``--min-cosine`` asks for it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgeopt.converters.modes import INT8_QUANTIZERS
from edgeopt.converters.passes import PassContext, ProgressFactory, get_pass, no_progress
from edgeopt.converters.passes.mixed_precision import (
    WEIGHT_OPS,
    Scorer,
    cosine_distances,
    quantized_nodes,
    searched,
    sensitivities,
)
from edgeopt.converters.passes.quantize import CalibrationReader, QuantizeInt8Static
from edgeopt.converters.targets.coreml import CoreMLTarget
from edgeopt.converters.targets.onnx import OnnxTarget
from edgeopt.converters.targets.tflite import TFLiteTarget
from edgeopt.converters.targets.tflite.mixed import analyze_int8 as analyze_tflite
from edgeopt.converters.targets.tflite.quantize import MAX_CALIBRATION_SAMPLES
from edgeopt.data import load_dataset
from edgeopt.errors import UserInputError
from edgeopt.onnx_io import input_specs, load_model, output_specs, save_model
from edgeopt.profiles import Profile


@dataclass
class AnalyzeOptions:
    model: Path
    calibration: Path | None = None  # required but for target coreml, which reads no data
    validation: Path | None = None  # default: the calibration data
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    input_values: dict[str, str] = field(default_factory=dict)
    profile: Profile | None = None  # the board decides u8/s8 activations, as for convert
    validation_samples: int = 64
    weights_only: bool = False  # only nodes with weights (Conv, ConvTranspose, MatMul, Gemm)
    target: str = "onnx"  # whose INT8 is analysed: ANALYZE_TARGETS


ANALYZE_TARGETS = tuple(INT8_QUANTIZERS)


def analyze(opts: AnalyzeOptions, progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """``{"model", "target", "quantize", "validation", "float_vs_int8", "layers": [...]}``, layers most
    sensitive first."""
    if opts.target not in ANALYZE_TARGETS:
        raise UserInputError(f"--target {opts.target}: analyze takes {', '.join(ANALYZE_TARGETS)}")
    if opts.target == "coreml" and (opts.calibration or opts.validation):
        raise UserInputError("--target coreml: its INT8 compresses weights only and nothing runs Core ML here, so "
                             "--calibration and --validation would not be read; drop them")
    if opts.target != "coreml" and opts.calibration is None:
        raise UserInputError(f"--target {opts.target} needs --calibration DATA (the activation ranges)")
    source = load_model(opts.model)
    with tempfile.TemporaryDirectory(prefix="edgeopt-analyze-") as tmp:
        work = Path(tmp)
        canonical = get_pass("canonicalize")(input_shapes=opts.input_shapes or None,
                                             input_values=opts.input_values or None,
                                             min_opset=QuantizeInt8Static.min_opset).apply(source, PassContext(work))
        if opts.target == "coreml":
            return {"model": str(opts.model), "target": "coreml", "quantize": "int8", "activation_type": None,
                    "validation": None, "calibration": None, "float_vs_int8": None,
                    "layers": coreml_weight_errors(canonical, CoreMLTarget().config["compress_min_weights"])}
        specs, outputs = input_specs(canonical), output_specs(canonical)
        calibration = load_dataset(opts.calibration, specs, outputs=outputs)
        validation = (load_dataset(opts.validation, specs, outputs=outputs) if opts.validation else calibration)
        validation = validation.take(opts.validation_samples)
        described = {"model": str(opts.model), "target": opts.target, "quantize": "int8",
                     "validation": {"source": validation.source, "samples": len(validation)}}
        if opts.target == "tflite":
            target = TFLiteTarget(profile=opts.profile)
            ctx = PassContext(work, calibration=calibration, validation=validation, progress=progress)
            lowered = target.lower(canonical, ctx, "int8")
            baseline, layers = analyze_tflite(lowered.data, ctx, lowered.io_transposes, lowered.node_scopes,
                                              opts.weights_only)
            data = calibration.take(MAX_CALIBRATION_SAMPLES)
            return {**described, "activation_type": "int8", "calibration": {"source": data.source, "samples": len(data)},
                    "float_vs_int8": baseline, "layers": layers}
        settings = OnnxTarget(profile=opts.profile).pass_settings("quantize-int8")
        quantizer = QuantizeInt8Static(**settings)
        data = calibration.take(quantizer.config["max_calibration_samples"])
        if len(data) < quantizer.config["min_calibration_samples"]:
            raise UserInputError(f"calibration set {data.source} has {len(data)} samples; int8 calibration needs at "
                                 f"least {quantizer.config['min_calibration_samples']}")

        from onnxruntime.quantization.shape_inference import quant_pre_process

        src, pre, cache, whole = work / "float.onnx", work / "pre.onnx", work / "ranges.json", work / "int8.onnx"
        save_model(canonical, src)
        quant_pre_process(str(src), str(pre))
        with progress("calibrating", len(data)) as tick:
            quantizer.quantize(pre, whole, CalibrationReader(data, canonical, tick), calibration_cache=cache)
        score = Scorer.onnx(pre, validation.inputs)
        baseline = score(whole)
        nodes = quantized_nodes(onnx.load(str(pre), load_external_data=False),
                                onnx.load(str(whole), load_external_data=False), opts.weights_only)
        with progress("quantizing one node at a time", len(nodes)) as tick:
            layers = sensitivities(lambda out, **which: quantizer.quantize(pre, out, None, calibration_cache=cache,
                                                                           **which),
                                   score, nodes, work, tick)
        errors = onnx_layer_errors(pre, whole, nodes, validation.inputs)
        layers = [{**row, "layer_error": errors.get(row["node"])} for row in layers]
    return {**described, "activation_type": settings.get("activation_type"),
            "calibration": {"source": data.source, "samples": len(data)}, "float_vs_int8": baseline, "layers": layers}


def onnx_layer_errors(float_path: Path, int8_path: Path, nodes: list[onnx.NodeProto],
                      inputs: dict[str, np.ndarray]) -> dict[str, float | None]:
    """Where the all-INT8 model's error stands at each node: 1 - cosine of the node's output as the next
    layer sees it (after its QuantizeLinear / DequantizeLinear pair) against the float model's same tensor,
    over the same inputs. It accumulates from the layers before (a node's sensitivity is its own share)."""
    quantized, original = onnx.load(str(int8_path)), onnx.load(str(float_path))
    consumers = _consumers(quantized)

    def seen_as(tensor: str) -> str:
        q = next((c for c in consumers.get(tensor, ()) if c.op_type == "QuantizeLinear"), None)
        dq = q and next((c for c in consumers.get(q.output[0], ()) if c.op_type == "DequantizeLinear"), None)
        return dq.output[0] if dq else tensor

    # A Conv whose Relu / Clip the quantizer folded into it: its output is the activation's
    made = {o for n in quantized.graph.node for o in n.output}
    float_consumers = _consumers(original)

    def own_output(node: onnx.NodeProto) -> str:
        t = node.output[0]
        while t not in made and len(users := float_consumers.get(t, [])) == 1 and users[0].op_type in ("Relu", "Clip"):
            t = users[0].output[0]
        return t

    pairs = {n.name: (t, seen_as(t)) for n in nodes if n.output for t in [own_output(n)]}
    float_run = _session_with_outputs(original, [f for f, _ in pairs.values()])
    int8_run = _session_with_outputs(quantized, [q for _, q in pairs.values()])
    samples = ({k: v[i:i + 1] for k, v in inputs.items()} for i in range(len(next(iter(inputs.values())))))
    return cosine_distances(pairs, ((float_run(feeds), int8_run(feeds)) for feeds in samples))


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name → the nodes that read it."""
    found: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            found.setdefault(i, []).append(n)
    return found


def _session_with_outputs(model: onnx.ModelProto, names: list[str]):
    """A function running ``model`` (its graph's outputs extended in place) with the tensors ``names`` as
    outputs too: feeds → {name: float64 array}. ONNX Runtime computes a QDQ pair whose output is asked
    for in float, as written."""
    import onnxruntime as ort

    present = {o.name for o in model.graph.output}
    made = {o for n in model.graph.node for o in n.output}  # the quantizer drops some (a Relu after a Conv)
    for name in dict.fromkeys(names):
        if name in made and name not in present:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    wanted = [o.name for o in sess.get_outputs() if o.name in set(names)]
    return lambda feeds: {n: np.asarray(v, np.float64) for n, v in zip(wanted, sess.run(wanted, feeds), strict=True)}


def coreml_weight_errors(model: onnx.ModelProto, min_weights: int) -> list[dict[str, Any]]:
    """Every weight the Core ML target's INT8 compresses (constant inputs of Conv, ConvTranspose, Gemm
    and MatMul with at least ``min_weights`` values), with the error of its dequantized form, most
    sensitive first. The scheme is coremltools' linear_symmetric int8 per output channel (``compression.py``):
    scale = max |w| / 127 per channel, q = round(w / scale); computed here with numpy, because the
    conversion itself would only give the same numbers after building the whole package (a test checks
    they are coremltools' own)."""
    weights = {i.name: i for i in model.graph.initializer}
    rows = []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        for name in node.input[1:2]:
            if name not in weights:
                continue
            w = numpy_helper.to_array(weights[name]).astype(np.float64)
            if w.size < min_weights or w.ndim < 2:
                continue
            axis = 1 if node.op_type == "ConvTranspose" or (node.op_type == "Gemm" and not _attr(node, "transB")) \
                or node.op_type == "MatMul" else 0
            q = symmetric_int8(w, axis)
            norm = float(np.linalg.norm(w))
            cos = float(np.dot(w.ravel(), q.ravel()) / (norm * np.linalg.norm(q))) if norm and np.any(q) else None
            rows.append({"node": node.name, "op": node.op_type, "weight": name, "values": int(w.size),
                         "sensitivity": None if cos is None else max(0.0, 1.0 - cos), "cosine": cos,
                         "max_abs_err": float(np.abs(w - q).max()),
                         "rel_err": float(np.linalg.norm(w - q) / norm) if norm else 0.0, "top1_agreement": None})
    rows.sort(key=lambda r: -1.0 if r["sensitivity"] is None else r["sensitivity"], reverse=True)
    return rows


def symmetric_int8(w: np.ndarray, axis: int) -> np.ndarray:
    """``w`` quantized to int8 and back: one scale per index of ``axis``, max |w| / 127, zero point 0."""
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    scale = np.abs(w).max(axis=reduce, keepdims=True) / 127.0
    safe = np.where(scale > 0, scale, 1.0)
    return np.clip(np.round(w / safe), -127, 127) * scale


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), 0)


WEIGHTS_ONLY_ABOVE = 200  # nodes: past this, the report's analysis ranks only the nodes with weights
REPORT_LAYERS = 10


def gate_analysis(details: dict[str, Any], *, model: Path, calibration: Path, validation: Path | None,
                  input_shapes: dict[str, tuple[int, ...]], input_values: dict[str, str], profile: Profile | None,
                  target: str = "onnx", source_nodes: int = 0, progress: ProgressFactory = no_progress
                  ) -> dict[str, Any]:
    """What a convert report carries when INT8 misses a quality gate: the most sensitive nodes and the
    ``--keep-float`` that would keep them float. The mixed-precision search's own ranking where it ran,
    else ``edgeopt analyze --target TARGET``'s: both rank with the quantizer the target ships."""
    if (search := searched(details)) and search[0].get("ranking"):
        return _gate_result(search[0]["ranking"], f"the mixed-precision search, {search[1]}")
    weights_only = source_nodes > WEIGHTS_ONLY_ABOVE
    result = analyze(AnalyzeOptions(model=model, calibration=calibration, validation=validation,
                                    input_shapes=input_shapes, input_values=input_values, profile=profile,
                                    weights_only=weights_only, target=target), progress)
    what = f"edgeopt analyze --target {target}, {INT8_QUANTIZERS[target]}" + (
        ", nodes with weights only" if weights_only else "")
    return {**_gate_result(result["layers"], what), "float_vs_int8": result["float_vs_int8"]}


def _gate_result(layers: list[dict[str, Any]], source: str) -> dict[str, Any]:
    top = layers[:REPORT_LAYERS]
    return {"source": source, "layers": top, "keep_float": ",".join(r["node"] for r in top[:3])}
