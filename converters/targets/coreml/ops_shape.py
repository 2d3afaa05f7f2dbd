"""Shape and layout ops (reshape, transpose, concat, slice, pad, resize, ...) → MIL.

Shapes, axes, pads and scales are read from constants at conversion time: after canonicalisation
every shape is static, so ``Shape`` itself lowers to a constant and the arithmetic on it folds.
"""

from __future__ import annotations

import math

import numpy as np

from edgeopt.converters.targets.coreml.rules import LoweringError, all_of, normalize_axis, only, rule

FLOAT_TYPES = (1, 10, 11)  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE


def _floats(value):
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return value.astype(np.float32)
    return value


@rule("Constant")
def constant(cx, node, attrs):
    from onnx import numpy_helper

    if "value" in attrs:
        value = numpy_helper.to_array(attrs["value"])
    elif "value_float" in attrs or "value_floats" in attrs:
        value = np.asarray(attrs.get("value_float", attrs.get("value_floats")), np.float32)
    elif "value_int" in attrs or "value_ints" in attrs:
        value = np.asarray(attrs.get("value_int", attrs.get("value_ints")), np.int64)
    else:
        raise LoweringError(f"Constant with {', '.join(attrs)}")
    return value.astype(np.float32) if value.dtype.kind == "f" else value


@rule("Shape")
def shape_of(cx, node, attrs):
    shape = cx.shape(cx.input(node, 0))
    start, end = attrs.get("start", 0), attrs.get("end")
    return np.asarray(shape[start:end] if end is not None else shape[start:], dtype=np.int64)


@rule("Size")
def size_of(cx, node, attrs):
    return np.asarray(int(np.prod(cx.shape(cx.input(node, 0)))), dtype=np.int64)


@rule("Reshape", check=only(allowzero=0), const_inputs=(1,))
def reshape(cx, node, attrs):
    x = cx.input(node, 0)
    in_shape = cx.shape(x)
    target = cx.const_ints(node, 1)
    target = [in_shape[i] if d == 0 else d for i, d in enumerate(target)]
    if target.count(-1) == 1:
        known = int(np.prod([d for d in target if d != -1]))
        target[target.index(-1)] = int(np.prod(in_shape)) // max(known, 1)
    return cx.mb.reshape(x=x, shape=np.asarray(target, np.int32), name=cx.name())


@rule("Flatten")
def flatten(cx, node, attrs):
    x = cx.input(node, 0)
    shape = cx.shape(x)
    axis = int(attrs.get("axis", 1))
    axis = axis + len(shape) if axis < 0 else axis
    target = [int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))]
    return cx.mb.reshape(x=x, shape=np.asarray(target, np.int32), name=cx.name())


@rule("Transpose")
def transpose(cx, node, attrs):
    x = cx.input(node, 0)
    perm = list(attrs.get("perm", reversed(range(len(cx.shape(x))))))
    return cx.mb.transpose(x=x, perm=perm, name=cx.name())


@rule("Concat")
def concat(cx, node, attrs):
    values = [_floats(cx.input(node, i)) for i in range(len(node.input)) if node.input[i]]
    rank = len(cx.shape(values[0]))
    return cx.mb.concat(values=values, axis=normalize_axis(int(attrs["axis"]), rank), name=cx.name())


@rule("Slice", const_inputs=(1, 2, 3, 4))
def slice_(cx, node, attrs):
    x = cx.input(node, 0)
    shape = cx.shape(x)
    rank = len(shape)
    if cx.opset < 10:
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes = list(attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = cx.const_ints(node, 1), cx.const_ints(node, 2)
        axes = cx.const_ints(node, 3) if cx.has(node, 3) else list(range(len(starts)))
        steps = cx.const_ints(node, 4) if cx.has(node, 4) else [1] * len(starts)
    begin, end, stride = [0] * rank, list(shape), [1] * rank
    end_mask = [False] * rank
    for axis, start, stop, step in zip(axes, starts, ends, steps, strict=True):
        if step == 0:
            raise LoweringError("Slice with step 0")
        axis = normalize_axis(axis, rank)
        # Python slicing clamps exactly as ONNX Slice does (including INT64_MAX / negative ends).
        b, e, s = slice(start, stop, step).indices(shape[axis])
        begin[axis], end[axis], stride[axis] = b, e, s
        end_mask[axis] = s < 0 and e < 0  # a negative step running past index 0
    return cx.mb.slice_by_index(x=x, begin=np.asarray(begin, np.int32), end=np.asarray(end, np.int32),
                                stride=np.asarray(stride, np.int32), end_mask=end_mask, name=cx.name())


PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}


@rule("Pad", check=only(mode=tuple(PAD_MODES)), const_inputs=(1, 2, 3))
def pad(cx, node, attrs):
    x = cx.input(node, 0)
    rank = len(cx.shape(x))
    if cx.opset < 11:
        pads, value = list(attrs["pads"]), float(attrs.get("value", 0.0))
        axes = list(range(rank))
    else:
        pads = cx.const_ints(node, 1)
        value = float(cx.const(node, 2).reshape(-1)[0]) if cx.has(node, 2) else 0.0
        axes = [normalize_axis(a, rank) for a in cx.const_ints(node, 3)] if cx.has(node, 3) else list(range(rank))
    if any(p < 0 for p in pads):
        raise LoweringError("negative pads (cropping)")
    per_axis = {a: (pads[i], pads[i + len(axes)]) for i, a in enumerate(axes)}
    padded = [a for a in range(rank) if any(per_axis.get(a, (0, 0)))]
    if not padded:
        return x
    mode = PAD_MODES[attrs.get("mode", "constant")]
    first = min(padded)
    if mode != "constant" and first < rank - 2:
        raise LoweringError(f"{attrs['mode']} padding of axis {first} (Core ML pads only the last two axes "
                            "in reflect / edge mode)")
    mil_pad = [p for a in range(first, rank) for p in per_axis.get(a, (0, 0))]
    return cx.mb.pad(x=x, pad=np.asarray(mil_pad, np.int32), mode=mode, constant_val=np.float32(value),
                     name=cx.name())


def _resize_check(node, attrs):
    if attrs.get("antialias", 0):
        return "antialias=1"
    if attrs.get("exclude_outside", 0):
        return "exclude_outside=1"
    if attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        return f"keep_aspect_ratio_policy={attrs['keep_aspect_ratio_policy']!r}"
    return None


LINEAR_SAMPLING = {"half_pixel": "UNALIGN_CORNERS", "pytorch_half_pixel": "UNALIGN_CORNERS",
                   "align_corners": "STRICT_ALIGN_CORNERS", "asymmetric": "DEFAULT"}


def _nearest_source_index(out_size: int, in_size: int, scale: float, coord: str, nearest: str) -> np.ndarray:
    """The input index ONNX Resize (mode nearest) reads for each output index of one axis."""
    i = np.arange(out_size, dtype=np.float64)
    if coord == "half_pixel" or (coord == "pytorch_half_pixel" and out_size > 1):
        x = (i + 0.5) / scale - 0.5
    elif coord == "pytorch_half_pixel":
        x = np.zeros_like(i)
    elif coord == "align_corners":
        x = i * (in_size - 1) / (out_size - 1) if out_size > 1 else np.zeros_like(i)
    elif coord == "asymmetric":
        x = i / scale
    else:
        raise LoweringError(f"coordinate_transformation_mode={coord!r}")
    if nearest == "floor":
        idx = np.floor(x)
    elif nearest == "ceil":
        idx = np.ceil(x)
    elif nearest == "round_prefer_ceil":
        idx = np.floor(x + 0.5)
    else:  # round_prefer_floor
        idx = np.ceil(x - 0.5)
    return np.clip(idx, 0, in_size - 1).astype(np.int64)


@rule("Resize", "Upsample", check=all_of(only(mode=("nearest", "linear", "bilinear")), _resize_check),
      const_inputs=(1, 2, 3))
def resize(cx, node, attrs):
    x = cx.input(node, 0)
    shape = cx.shape(x)
    if len(shape) != 4:
        raise LoweringError(f"resizing a rank-{len(shape)} tensor (Core ML resizes the last two axes of rank 4)")
    if node.op_type == "Upsample" or cx.opset < 11:
        scales = [float(s) for s in (attrs["scales"] if "scales" in attrs else cx.const(node, 1).reshape(-1))]
        sizes = [int(math.floor(d * s)) for d, s in zip(shape, scales, strict=True)]
        coord, nearest = "asymmetric", "floor"
    else:
        if cx.has(node, 3):
            sizes = cx.const_ints(node, 3)
            scales = [o / i for o, i in zip(sizes, shape, strict=True)]
        else:
            scales = [float(s) for s in cx.const(node, 2).reshape(-1)]
            sizes = [int(math.floor(d * s)) for d, s in zip(shape, scales, strict=True)]
        coord = attrs.get("coordinate_transformation_mode", "half_pixel")
        nearest = attrs.get("nearest_mode", "round_prefer_floor")
    if "axes" in attrs or len(sizes) != 4:
        raise LoweringError("Resize with axes")
    if sizes[:2] != list(shape[:2]):
        raise LoweringError("resizing the batch or channel axis")
    (h, w), (oh, ow), (sh, sw) = shape[2:], sizes[2:], scales[2:]
    if attrs.get("mode", "nearest") == "nearest":
        for out_size, in_size, scale in ((oh, h, sh), (ow, w, sw)):
            if out_size % in_size:
                raise LoweringError(f"nearest resize from {in_size} to {out_size} (Core ML needs an integer factor)")
            expected = np.arange(out_size) // (out_size // in_size)
            if not np.array_equal(_nearest_source_index(out_size, in_size, scale, coord, nearest), expected):
                raise LoweringError(f"nearest resize with coordinate_transformation_mode={coord!r} and "
                                    f"nearest_mode={nearest!r} (not a pixel-repeating upsample)")
        return cx.mb.upsample_nearest_neighbor(x=x, scale_factor_height=oh // h, scale_factor_width=ow // w,
                                               name=cx.name())
    sampling = LINEAR_SAMPLING.get(coord)
    if sampling is None:
        raise LoweringError(f"linear resize with coordinate_transformation_mode={coord!r}")
    if coord == "pytorch_half_pixel" and min(oh, ow) == 1:
        raise LoweringError("pytorch_half_pixel resize to a size of 1")
    if coord != "align_corners" and (not math.isclose(h * sh, oh) or not math.isclose(w * sw, ow)):
        raise LoweringError(f"linear resize whose scales {sh, sw} do not give whole output sizes")
    return cx.mb.resize_bilinear(x=x, target_size_height=oh, target_size_width=ow, sampling_mode=sampling,
                                 name=cx.name())


def _axes(cx, node, attrs) -> list[int] | None:
    if "axes" in attrs:
        return list(attrs["axes"])
    if cx.has(node, 1):
        return cx.const_ints(node, 1)
    return None


@rule("Squeeze", const_inputs=(1,))
def squeeze(cx, node, attrs):
    x = cx.input(node, 0)
    shape = cx.shape(x)
    axes = _axes(cx, node, attrs)
    axes = [i for i, d in enumerate(shape) if d == 1] if axes is None else [normalize_axis(a, len(shape)) for a in axes]
    if not axes:
        return x
    return cx.mb.squeeze(x=x, axes=sorted(axes), name=cx.name())


@rule("Unsqueeze", const_inputs=(1,))
def unsqueeze(cx, node, attrs):
    x = cx.input(node, 0)
    axes = _axes(cx, node, attrs) or []
    out_rank = len(cx.shape(x)) + len(axes)
    return cx.mb.expand_dims(x=x, axes=sorted(normalize_axis(a, out_rank) for a in axes), name=cx.name())


@rule("Split", const_inputs=(1,))
def split(cx, node, attrs):
    x = cx.input(node, 0)
    shape = cx.shape(x)
    axis = normalize_axis(int(attrs.get("axis", 0)), len(shape))
    if "split" in attrs:
        sizes = list(attrs["split"])
    elif cx.has(node, 1):
        sizes = cx.const_ints(node, 1)
    else:
        n = int(attrs.get("num_outputs", len(node.output)))
        chunk = math.ceil(shape[axis] / n)
        sizes = [min(chunk, shape[axis] - k * chunk) for k in range(n)]
    parts = cx.mb.split(x=x, split_sizes=np.asarray(sizes, np.int32), axis=axis, name=cx.name())
    return list(parts) if isinstance(parts, (list, tuple)) else [parts]


@rule("Gather", const_inputs=(1,))
def gather(cx, node, attrs):
    x = cx.input(node, 0)
    shape = cx.shape(x)
    axis = normalize_axis(int(attrs.get("axis", 0)), len(shape))
    indices = np.asarray(cx.const(node, 1)).astype(np.int64)
    indices = np.where(indices < 0, indices + shape[axis], indices)
    if indices.ndim == 0:  # one index: a slice with that axis squeezed away
        k = int(indices)
        begin, end = [0] * len(shape), list(shape)
        begin[axis], end[axis] = k, k + 1
        squeeze = [i == axis for i in range(len(shape))]
        return cx.mb.slice_by_index(x=x, begin=np.asarray(begin, np.int32), end=np.asarray(end, np.int32),
                                    squeeze_mask=squeeze, name=cx.name())
    return cx.mb.gather(x=x, indices=indices.astype(np.int32), axis=axis, name=cx.name())


@rule("Tile", const_inputs=(1,))
def tile(cx, node, attrs):
    return cx.mb.tile(x=cx.input(node, 0), reps=np.asarray(cx.const_ints(node, 1), np.int32), name=cx.name())


@rule("Expand", const_inputs=(1,))
def expand(cx, node, attrs):
    x = cx.input(node, 0)
    shape = cx.shape(x)
    target = tuple(np.broadcast_shapes(shape, tuple(cx.const_ints(node, 1))))
    if len(target) > len(shape):
        x = cx.mb.reshape(x=x, shape=np.asarray((1,) * (len(target) - len(shape)) + shape, np.int32))
        shape = (1,) * (len(target) - len(shape)) + shape
    reps = [t // s for t, s in zip(target, shape, strict=True)]
    return cx.mb.tile(x=x, reps=np.asarray(reps, np.int32), name=cx.name())


@rule("Cast", check=only(to=FLOAT_TYPES))
def cast(cx, node, attrs):
    from coremltools.converters.mil.mil import types

    x = cx.input(node, 0)
    if not types.is_float(x.dtype):
        raise LoweringError("a cast from a non-float tensor (models converted here compute in float)")
    return x  # float → float: Core ML's compute precision decides the float type
