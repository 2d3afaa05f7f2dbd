"""Resize (nearest, bilinear) → RESIZE_NEAREST_NEIGHBOR / RESIZE_BILINEAR, channels-last.

ONNX has five coordinate transformations and four rounding modes; TFLite has two flags
(align_corners, half_pixel_centers). Rather than trusting a table, the lowering computes, for the
actual sizes, which source pixel (nearest) or source coordinate (bilinear) every output pixel reads
under ONNX's rule and under each TFLite setting, and uses a setting that agrees everywhere; when none
does, the node is reported as unsupported.
"""

from __future__ import annotations

import numpy as np

from edgeopt.converters.targets.tflite import layout
from edgeopt.converters.targets.tflite.lowering import GraphFacts, Lowering, LoweringError, Node, lowers

_TRANSFORMS = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn")
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _check_resize(node: Node, facts: GraphFacts) -> str | None:
    mode = node.attr("mode", "nearest")
    if mode not in ("nearest", "linear"):
        return f"mode={mode}"
    transform = node.attr("coordinate_transformation_mode", "half_pixel")
    if transform not in _TRANSFORMS:
        return f"coordinate_transformation_mode={transform}"
    if node.attr("antialias", 0):
        return "antialias"
    if node.attr("nearest_mode", "round_prefer_floor") not in _NEAREST_MODES:
        return f"nearest_mode={node.attr('nearest_mode')}"
    if facts.with_graph:
        shape = facts.shapes.get(node.inputs[0])
        out = facts.shapes.get(node.outputs[0])
        if shape is not None and len(shape) not in (3, 4):
            return f"rank-{len(shape)} input"
        if shape is not None and out is not None and tuple(shape[:2]) != tuple(out[:2]):
            return "resizing the batch or channel axis"
    return None


def _onnx_scale(ctx: Lowering, node: Node, axis: int, in_size: int, out_size: int) -> float:
    """The scale ONNX's coordinate transform uses: the given scale, or out / in for sizes."""
    scales_input = 1 if ctx.opset < 11 else 2
    if node.has_input(scales_input):
        scales = ctx.const(node.inputs[scales_input])
        if scales.size:
            axes = node.attr("axes")
            if axes is not None:
                rank = ctx.rank(node.inputs[0])
                full = np.ones(rank, np.float32)
                full[[a % rank for a in axes]] = scales
                scales = full
            return float(scales[axis])
    return out_size / in_size


def onnx_source_coords(transform: str, out_size: int, in_size: int, scale: float) -> np.ndarray:
    """ONNX's source coordinate of every output index; ``length_resized`` is in_size * scale, which
    with given scales need not be the (floored) output size."""
    i = np.arange(out_size, dtype=np.float64)
    length_resized = in_size * scale
    if transform == "align_corners":
        return i * (in_size - 1) / (length_resized - 1) if length_resized > 1 else np.zeros(out_size)
    if transform == "asymmetric":
        return i / scale
    if transform == "tf_half_pixel_for_nn":
        return (i + 0.5) / scale
    if transform == "pytorch_half_pixel" and length_resized <= 1:
        return np.zeros(out_size)
    return (i + 0.5) / scale - 0.5


def onnx_nearest(coords: np.ndarray, mode: str, in_size: int) -> np.ndarray:
    rounded = {"round_prefer_floor": np.ceil(coords - 0.5), "round_prefer_ceil": np.floor(coords + 0.5),
               "floor": np.floor(coords), "ceil": np.ceil(coords)}[mode]
    return np.clip(rounded, 0, in_size - 1).astype(np.int64)


def tflite_nearest(out_size: int, in_size: int, align_corners: bool, half_pixel: bool) -> np.ndarray:
    """Source index per output index, as TFLite's resize_nearest_neighbor kernel computes it (float32)."""
    scale = np.float32(in_size - 1) / np.float32(out_size - 1) if align_corners and out_size > 1 else \
        np.float32(in_size) / np.float32(out_size)
    y = (np.arange(out_size, dtype=np.float32) + np.float32(0.5 if half_pixel else 0.0)) * scale
    idx = np.sign(y) * np.floor(np.abs(y) + 0.5) if align_corners else np.floor(y)
    idx = np.minimum(idx, in_size - 1)
    if half_pixel:
        idx = np.maximum(idx, 0)
    return idx.astype(np.int64)


def tflite_bilinear(out_size: int, in_size: int, align_corners: bool, half_pixel: bool) -> np.ndarray:
    scale = (in_size - 1) / (out_size - 1) if align_corners and out_size > 1 else in_size / out_size
    i = np.arange(out_size, dtype=np.float64)
    coords = (i + 0.5) * scale - 0.5 if half_pixel else i * scale
    return np.clip(coords, 0, in_size - 1)


_FLAGS = ((False, True), (False, False), (True, False))  # (align_corners, half_pixel_centers)


@lowers("Resize", check=_check_resize, constant_inputs=(1, 2, 3))
def lower_resize(ctx: Lowering, node: Node) -> None:
    in_shape, out_shape = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
    rank = len(in_shape)
    transform = node.attr("coordinate_transformation_mode", "half_pixel")
    nearest = node.attr("mode", "nearest") == "nearest"
    rounding = node.attr("nearest_mode", "round_prefer_floor")
    spatial_axes = list(range(2, rank))
    chosen = None
    for align, half in _FLAGS:
        ok = True
        for axis in spatial_axes:
            i_sz, o_sz = in_shape[axis], out_shape[axis]
            coords = onnx_source_coords(transform, o_sz, i_sz, _onnx_scale(ctx, node, axis, i_sz, o_sz))
            if nearest:
                ok &= np.array_equal(onnx_nearest(coords, rounding, i_sz), tflite_nearest(o_sz, i_sz, align, half))
            else:
                ok &= np.allclose(np.clip(coords, 0, i_sz - 1), tflite_bilinear(o_sz, i_sz, align, half), atol=1e-5)
        if ok:
            chosen = (align, half)
            break
    if chosen is None:
        raise LoweringError(node, f"no TFLite resize reproduces coordinate_transformation_mode={transform}"
                                  + (f", nearest_mode={rounding}" if nearest else "") + " for these sizes")
    x = ctx.get_channels_last(node.inputs[0])
    n, c = in_shape[:2]
    if rank == 3:  # (N, L, C) → (N, 1, L, C)
        x = ctx.reshape(x, (n, 1, in_shape[2], c), f"{node.name}/as2d")
    size = [1, out_shape[2]] if rank == 3 else list(out_shape[2:])
    builtin, opts = ("RESIZE_NEAREST_NEIGHBOR", "ResizeNearestNeighborOptions") if nearest else \
        ("RESIZE_BILINEAR", "ResizeBilinearOptions")
    out = ctx.output(node.outputs[0], layout.channels_last(rank))
    target = out if rank == 4 else ctx.tmp(f"{node.name}/2d", (n, 1, out_shape[2], c))
    ctx.op(builtin, [x, ctx.const_tensor(np.array(size, np.int32), f"{node.name}/size")], [target], opts,
           alignCorners=chosen[0], halfPixelCenters=chosen[1])
    if rank == 3:
        ctx.reshape(target, ctx.b.shape(out), node.name, out=out)
