"""Quantizing a float .tflite with LiteRT's own quantizers.

- ``int8`` / ``int16x8`` (full integer): TFLite's post-training calibrator and quantizer, shipped in
  ai-edge-litert (``CalibrationWrapper``): per-channel int8 weights, int8 (or int16) activations,
  int32 (int64) biases, integer inputs and outputs unless ``float_io``. Every operator must be
  quantizable (what TFLite Micro needs); one that is not is named with the ONNX node it came from.
- ``int8-dynamic``: litert-quantizer, int8 channel-wise weights, activations quantized at run time.
- ``int4``: litert-quantizer, block-wise int4 weights for FULLY_CONNECTED (channel-wise when the
  input depth is not a multiple of the block), channel-wise int4 for CONV_2D, int8 for the other
  weight-carrying ops (LiteRT has no int4 kernels for them); activations quantized at run time.
- ``fp16``: litert-quantizer's float casting: float16 weights with DEQUANTIZE in front, float compute.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgeopt.converters.modes import QuantizeMode
from edgeopt.converters.passes import ConversionError, PassContext
from edgeopt.converters.targets.tflite.flatbuffer import FILE_IDENTIFIER, buffer_span, read_model, schema
from edgeopt.errors import UnsupportedOpsError, UserInputError
from edgeopt.runtime.litert import quiet_native_stderr

MIN_CALIBRATION_SAMPLES = 16
MAX_CALIBRATION_SAMPLES = 512
INT4_BLOCK_SIZES = (32, 64, 128, 256)
DEFAULT_INT4_BLOCK = 32
FLOAT16_MIN_NORMAL = 2.0**-14


def quantize_model(data: bytes, mode: QuantizeMode, ctx: PassContext, *, io_transposes: Mapping[str, list[int]],
                   float_io: bool = False, origins: dict[str, list[tuple[str, str]]] | None = None) -> bytes:
    """Quantized .tflite bytes of the float model ``data``; ``origins`` maps a TFLite operator name to
    the (ONNX op, node name) pairs it was lowered from, for error messages."""
    if mode.calibrated:
        if mode.calibration_method != "minmax":  # the target refuses it before any work; this is the backstop
            raise UserInputError(f"LiteRT's calibrator records min/max ranges, not {mode.calibration_method}")
        return full_integer(data, mode.name, ctx, dict(io_transposes), float_io, origins or {})
    if mode.name == "int8-dynamic":
        from litert_quantizer import recipe

        return litert_quantize(data, recipe.dynamic_wi8_afp32())
    if mode.name == "int4":
        return fix_zero_block_scales(litert_quantize(data, int4_recipe(data, mode.block_size or DEFAULT_INT4_BLOCK)))
    if mode.name == "fp16":
        return litert_quantize(data, fp16_recipe())
    raise UserInputError(f"target 'tflite' has no quantize mode '{mode}'")


# -- full integer (calibrated) ----------------------------------------------------------------------------
def calibration_batches(ctx: PassContext, mode: str, inputs: list[dict[str, Any]],
                        io_transposes: dict[str, list[int]]) -> list[list[np.ndarray]]:
    """The calibration set as the float model's inputs want it: its layout, its batch size."""
    if ctx.calibration is None:
        raise UserInputError(f"--quantize {mode} needs calibration data: pass --calibration DATA "
                             "(.npz with one array per input, .npy or a sensor .csv)")
    data = ctx.calibration.take(MAX_CALIBRATION_SAMPLES)
    if len(data) < MIN_CALIBRATION_SAMPLES:
        raise UserInputError(f"calibration set {data.source} has {len(data)} samples; {mode} calibration needs at "
                             f"least {MIN_CALIBRATION_SAMPLES} for stable activation ranges")
    # Samples stack along each input's batch axis (data.axes, source layout; axis 0 unless given),
    # then the tensor takes the model's layout.
    axes = {d["name"]: data.axes.get(d["name"], 0) for d in inputs}
    batch = 1
    if all(a is not None for a in axes.values()):
        first = inputs[0]["name"]
        axis = axes[first] if first not in io_transposes else io_transposes[first].index(axes[first])
        batch = int(inputs[0]["shape"][axis])
    batches = []
    for start in range(0, len(data) - batch + 1, batch):
        sample = []
        for detail in inputs:
            name = detail["name"]
            arr = data.inputs[name][start:start + batch].astype(np.float32)
            arr = arr[0] if axes[name] is None else np.moveaxis(arr, 0, axes[name])
            if name in io_transposes:
                arr = np.transpose(arr, io_transposes[name])
            sample.append(np.ascontiguousarray(arr))
        batches.append(sample)
    return batches


def full_integer(data: bytes, mode: str, ctx: PassContext, io_transposes: dict[str, list[int]], float_io: bool,
                 origins: dict[str, list[tuple[str, str]]]) -> bytes:
    from ai_edge_litert import _pywrap_tensorflow_lite_calibration_wrapper as calibration

    inputs = input_details(data)
    batches = calibration_batches(ctx, mode, inputs, io_transposes)
    activations, bias = (np.int8, np.int32) if mode == "int8" else (np.int16, np.int64)
    io_type = np.float32 if float_io else activations
    wrapper = calibration.CalibrationWrapper(data, [], [])
    with ctx.progress("calibrating", len(batches)) as tick:
        wrapper.Prepare([list(a.shape) for a in batches[0]])
        for sample in batches:
            wrapper.FeedTensor(sample)
            tick(1)
    try:
        with quiet_native_stderr():
            quantized = wrapper.QuantizeModel(np.dtype(io_type).num, np.dtype(io_type).num, False,
                                              np.dtype(activations).num, np.dtype(bias).num, False, False)
    except (RuntimeError, ValueError) as exc:
        raise _explain_quantize_failure(exc, mode, origins) from exc
    quantized = quantize_pad_values(bytes(quantized))
    ctx.details["quantize-tflite"] = {"mode": mode, "calibration_method": "minmax",
                                      "calibration_samples": len(batches) * int(inputs[0]["shape"][0]),
                                      "calibration_source": ctx.calibration.source, "io": np.dtype(io_type).name}
    return quantized


def quantize_pad_values(data: bytes) -> bytes:
    """TFLite's quantizer leaves PADV2's padding value float32, and the integer PADV2 kernel then
    refuses the graph ("INT8 != FLOAT32"). No tool fixes this, so: give each such PADV2 its own copy
    of the value, quantized with the scale and zero point of the tensor it pads (a max-pool's -inf
    padding becomes the type's minimum)."""
    import flatbuffers

    s = schema()
    model = read_model(data)
    sub = model.subgraphs[0]
    int_types = {s.TensorType.INT8: np.int8, s.TensorType.INT16: np.int16}
    changed = False
    for op in sub.operators:
        code = model.operatorCodes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) != s.BuiltinOperator.PADV2 or len(op.inputs) < 3:
            continue
        x, value = sub.tensors[op.inputs[0]], sub.tensors[op.inputs[2]]
        if x.type not in int_types or value.type != s.TensorType.FLOAT32 or not x.quantization:
            continue
        dtype = int_types[x.type]
        info = np.iinfo(dtype)
        scale, zero_point = float(x.quantization.scale[0]), int(x.quantization.zeroPoint[0])
        raw = np.frombuffer(bytes(model.buffers[value.buffer].data), np.float32)
        q = np.clip(np.round(raw.astype(np.float64) / scale + zero_point), info.min, info.max).astype(dtype)
        buffer = s.BufferT()
        buffer.data = np.frombuffer(q.tobytes(), np.uint8)
        model.buffers.append(buffer)
        tensor = s.TensorT()
        tensor.name = (value.name.decode() if isinstance(value.name, bytes) else value.name) + "/quantized"
        tensor.shape = list(value.shape) if value.shape is not None else []
        tensor.type = x.type
        tensor.buffer = len(model.buffers) - 1
        tensor.quantization = s.QuantizationParametersT()
        tensor.quantization.scale = [scale]
        tensor.quantization.zeroPoint = [zero_point]
        sub.tensors.append(tensor)
        op.inputs[2] = len(sub.tensors) - 1
        changed = True
    if not changed:
        return data
    builder = flatbuffers.Builder(len(data) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())


def _explain_quantize_failure(exc: Exception, mode: str, origins: dict[str, list[tuple[str, str]]]) -> Exception:
    text = str(exc)
    m = re.search(r"op[: ]+'?([A-Z0-9_]+)'?", text)
    if m and m.group(1) in origins:
        nodes: dict[str, list[str]] = {}
        for op, name in origins[m.group(1)]:
            nodes.setdefault(f"{op}[{mode} full-integer quantization]", []).append(name)
        return UnsupportedOpsError("tflite", nodes)
    first = (text.strip().splitlines() or [type(exc).__name__])[0]
    return ConversionError(f"LiteRT's quantizer failed ({mode}): {first}")


def input_details(data: bytes) -> list[dict[str, Any]]:
    model = read_model(data)
    sub = model.subgraphs[0]
    return [{"name": sub.tensors[i].name.decode() if isinstance(sub.tensors[i].name, bytes) else sub.tensors[i].name,
             "shape": list(sub.tensors[i].shape)} for i in sub.inputs]


# -- litert-quantizer recipes ------------------------------------------------------------------------------
def litert_quantize(data: bytes, recipe: Any, calibration: dict[str, Any] | None = None) -> bytes:
    from litert_quantizer import quantizer

    qt = quantizer.Quantizer(bytearray(data))
    qt.load_quantization_recipe(recipe)
    with quiet_litert_quantizer(), np.errstate(divide="ignore", invalid="ignore"):
        # (zero int4 block scales divide by zero: see fix_zero_block_scales)
        return bytes(qt.quantize(calibration, enable_progress_bar=False, enable_progress_report=False).quantized_model)


@contextlib.contextmanager
def quiet_litert_quantizer():
    """litert-quantizer 0.11 does not hand enable_progress_bar on to its transformation step, and its
    calibration always draws one: tqdm bars on sys.stderr (past -q and into the terminal). What it
    writes there goes to the log instead."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            yield
    finally:
        for line in re.split(r"[\r\n]+", stderr.getvalue()):
            if line.strip():
                logging.getLogger("edgeopt.toolchain.tflite").debug(line.strip())


def int4_recipe(data: bytes, block_size: int) -> Any:
    from litert_quantizer import qtyping
    from litert_quantizer.recipe_manager import RecipeManager

    if block_size not in INT4_BLOCK_SIZES:
        raise UserInputError(f"--int4-block-size {block_size}: LiteRT's block-wise int4 supports "
                             f"{', '.join(map(str, INT4_BLOCK_SIZES))}")
    ops = qtyping.TFLOperationName
    granularity = getattr(qtyping.QuantGranularity, f"BLOCKWISE_{block_size}")
    rm = RecipeManager()
    for op in (ops.DEPTHWISE_CONV_2D, ops.CONV_2D_TRANSPOSE, ops.BATCH_MATMUL, ops.EMBEDDING_LOOKUP):
        rm.add_dynamic_config(".*", op, 8)
    rm.add_dynamic_config(".*", ops.CONV_2D, 4)
    rm.add_dynamic_config(".*", ops.FULLY_CONNECTED, 4, granularity)
    # Blocks run along the input depth: a FULLY_CONNECTED whose depth the block does not divide gets
    # channel-wise int4 (the latest matching recipe entry wins; an op's scope is its output names + ';').
    model = read_model(data)
    sub = model.subgraphs[0]
    fc = schema().BuiltinOperator.FULLY_CONNECTED
    for op in sub.operators:
        code = model.operatorCodes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) != fc:
            continue
        if sub.tensors[op.inputs[1]].shape[-1] % block_size:
            name = sub.tensors[op.outputs[0]].name
            name = name.decode() if isinstance(name, bytes) else name
            rm.add_dynamic_config(f"^{re.escape(name)};$", ops.FULLY_CONNECTED, 4)
    return rm.get_quantization_recipe()


def fix_zero_block_scales(data: bytes) -> bytes:
    """litert-quantizer writes a zero float16 scale for an int4 block whose weights are all (nearly)
    zero — the scale underflows float16 — and divides by it; XNNPACK then refuses the model. Trained
    networks have such blocks (inputs that are always zero, decayed neurons). Their weights are below
    float16's resolution, so: the smallest normal float16 scale, and weights 0 (what quantizing them
    at that scale gives). Patched in place; no tool does it."""
    s = schema()
    model = read_model(data)
    out = bytearray(data)
    for tensor in model.subgraphs[0].tensors:
        q = tensor.quantization
        if tensor.type != s.TensorType.INT4 or q is None or not isinstance(q.details, s.BlockwiseQuantizationT):
            continue
        scales_tensor = model.subgraphs[0].tensors[q.details.scales]
        start, length = buffer_span(data, scales_tensor.buffer)
        scales = np.frombuffer(out, np.float16, count=length // 2, offset=start)
        zero = scales == 0
        if not zero.any():
            continue
        scales[zero] = FLOAT16_MIN_NORMAL
        rows, depth = int(tensor.shape[0]), int(tensor.shape[-1])
        block = int(q.details.blockSize)
        w_start, _ = buffer_span(data, tensor.buffer)
        for row, blk in zip(*np.nonzero(zero.reshape(rows, depth // block)), strict=True):
            first = w_start + (row * depth + blk * block) // 2  # two int4 values per byte
            out[first:first + block // 2] = bytes(block // 2)
    return bytes(out)


def fp16_recipe() -> Any:
    from litert_quantizer import qtyping
    from litert_quantizer.algorithm_manager import AlgorithmName
    from litert_quantizer.recipe_manager import RecipeManager

    rm = RecipeManager()
    rm.add_weight_only_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED, 16, algorithm_key=AlgorithmName.FLOAT_CASTING)
    return rm.get_quantization_recipe()
