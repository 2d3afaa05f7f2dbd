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
first. One quantization and one ONNX Runtime session per node: a few tenths of a second each on a
small CNN, minutes on a detector with hundreds of nodes (``--weights-only`` keeps to the nodes with
weights). The pieces are in ``passes/mixed_precision.py``, which the ``quantize-int8`` pass uses to
keep nodes float when ``--min-cosine`` asks for it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from edgeopt.converters.passes import PassContext, ProgressFactory, get_pass, no_progress
from edgeopt.converters.passes.mixed_precision import Scorer, quantized_nodes, searched, sensitivities
from edgeopt.converters.passes.quantize import CalibrationReader, QuantizeInt8Static
from edgeopt.converters.targets.onnx import OnnxTarget
from edgeopt.data import load_dataset
from edgeopt.errors import UserInputError
from edgeopt.onnx_io import input_specs, load_model, output_specs, save_model
from edgeopt.profiles import Profile


@dataclass
class AnalyzeOptions:
    model: Path
    calibration: Path
    validation: Path | None = None  # default: the calibration data
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    input_values: dict[str, str] = field(default_factory=dict)
    profile: Profile | None = None  # the board decides u8/s8 activations, as for convert
    validation_samples: int = 64
    weights_only: bool = False  # only nodes with weights (Conv, ConvTranspose, MatMul, Gemm)


def analyze(opts: AnalyzeOptions, progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """``{"model", "quantize", "validation", "float_vs_int8", "layers": [...]}``, layers most sensitive first."""
    source = load_model(opts.model)
    with tempfile.TemporaryDirectory(prefix="edgeopt-analyze-") as tmp:
        work = Path(tmp)
        canonical = get_pass("canonicalize")(input_shapes=opts.input_shapes or None,
                                             input_values=opts.input_values or None,
                                             min_opset=QuantizeInt8Static.min_opset).apply(source, PassContext(work))
        specs, outputs = input_specs(canonical), output_specs(canonical)
        calibration = load_dataset(opts.calibration, specs, outputs=outputs)
        validation = (load_dataset(opts.validation, specs, outputs=outputs) if opts.validation else calibration)
        validation = validation.take(opts.validation_samples)
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
    return {"model": str(opts.model), "quantize": "int8", "activation_type": settings.get("activation_type"),
            "validation": {"source": validation.source, "samples": len(validation)},
            "calibration": {"source": data.source, "samples": len(data)},
            "float_vs_int8": baseline, "layers": layers}


WEIGHTS_ONLY_ABOVE = 200  # nodes: past this, the report's analysis ranks only the nodes with weights
REPORT_LAYERS = 10


def gate_analysis(details: dict[str, Any], *, model: Path, calibration: Path, validation: Path | None,
                  input_shapes: dict[str, tuple[int, ...]], input_values: dict[str, str], profile: Profile | None,
                  source_nodes: int, progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """What a convert report carries when INT8 misses a quality gate: the most sensitive nodes and the
    ``--keep-float`` that would keep them float. The mixed-precision search's own ranking where it ran
    (it ranked with the target's quantizer), else ``edgeopt analyze``'s (ONNX Runtime QDQ)."""
    if (search := searched(details)) and search[0].get("ranking"):
        return _gate_result(search[0]["ranking"], f"the mixed-precision search, {search[1]}")
    weights_only = source_nodes > WEIGHTS_ONLY_ABOVE
    result = analyze(AnalyzeOptions(model=model, calibration=calibration, validation=validation,
                                    input_shapes=input_shapes, input_values=input_values, profile=profile,
                                    weights_only=weights_only), progress)
    what = "edgeopt analyze, ONNX Runtime QDQ" + (", nodes with weights only" if weights_only else "")
    return {**_gate_result(result["layers"], what), "float_vs_int8": result["float_vs_int8"]}


def _gate_result(layers: list[dict[str, Any]], source: str) -> dict[str, Any]:
    top = layers[:REPORT_LAYERS]
    return {"source": source, "layers": top, "keep_float": ",".join(r["node"] for r in top[:3])}
