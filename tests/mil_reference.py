"""A reference evaluator for saved Core ML ML Programs, for tests on machines without Core ML.

Core ML prediction needs macOS. To check on Linux that the ONNX → MIL lowering computes what the
ONNX model computes, this module reloads the *saved* ``.mlpackage`` (program and weight file, via
coremltools' milproto loader) and evaluates its ops one by one, following the MIL op definitions in
coremltools' documentation, with numpy and torch. Tensors typed float16 in the program are held
as float16 between ops (each op computes in float32 and rounds its result), which approximates
Core ML's float16 execution. Compressed weights are decompressed by edgeopt's verifier.

This is a test oracle for the lowering, not a Core ML runtime: Core ML's own kernels (CPU, GPU,
Neural Engine) are only exercised by the macOS parity test.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.converters.targets.coreml.verify import decompress, load_saved_program
from edgeopt.runtime.coreml import read_io_names


def _np_dtype(mil_type: Any) -> Any:
    from coremltools.converters.mil.mil import types

    name = types.builtin_to_string(mil_type)
    return {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "int32": np.int32, "int64": np.int64,
            "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "bool": np.bool_}.get(name, np.float32)


def run_package(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Evaluate a saved .mlpackage on one batch; feeds and results keyed by the artifact's (ONNX) names."""
    spec, program = load_saved_program(path)
    names = read_io_names(spec)
    func = program.functions["main"]
    env: dict[str, np.ndarray] = {}
    for mil_name, var in func.inputs.items():
        env[var.name] = np.asarray(feeds[names["inputs"].get(mil_name, mil_name)]).astype(_np_dtype(var.dtype))
    for op in func.operations:
        if op.op_type == "const":  # its value is read from the output var where it is used
            continue
        args = {k: _value(v, env) for k, v in op.inputs.items()}
        outs = evaluate(op.op_type, args)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for var, out in zip(op.outputs, outs, strict=True):
            env[var.name] = np.asarray(out).astype(_np_dtype(var.dtype))  # var.dtype: the element type
    return {names["outputs"].get(v.name, v.name): env[v.name].astype(np.float32) for v in func.outputs}


def _value(v, env):
    if isinstance(v, (list, tuple)):
        return [_value(x, env) for x in v]
    if v.name in env:
        return env[v.name]
    return v.val


def _torch():
    import torch

    return torch


def _f32(x):
    return np.asarray(x, np.float32)


def _t(x):
    return _torch().from_numpy(np.ascontiguousarray(_f32(x)))


# -- ops ----------------------------------------------------------------------------------------------

def evaluate(op_type: str, a: dict[str, Any]):
    if op_type.startswith("constexpr_"):
        return decompress(op_type, a)[0]
    fn = OPS.get(op_type)
    if fn is None:
        raise NotImplementedError(f"mil_reference has no implementation of '{op_type}'")
    return fn(a)


def _spatial_pad(x, pad, value):
    """Pad the last len(pad)//2 axes by MIL's [begin0, end0, begin1, end1, ...]."""
    n = len(pad) // 2
    widths = [(0, 0)] * (x.ndim - n) + [(int(pad[2 * i]), int(pad[2 * i + 1])) for i in range(n)]
    return np.pad(x, widths, mode="constant", constant_values=value)


def _pads(a, n):
    pad_type = str(a.get("pad_type", "valid")).lower()
    if pad_type == "valid":
        return [0] * 2 * n
    if pad_type == "custom":
        return [int(p) for p in a["pad"]]
    raise NotImplementedError(f"pad_type {pad_type}")


def _conv(a):
    F = _torch().nn.functional
    x, w = _f32(a["x"]), _f32(a["weight"])
    n = x.ndim - 2
    x = _spatial_pad(x, _pads(a, n), 0.0)
    strides = [int(s) for s in a.get("strides", [1] * n)]
    dil = [int(d) for d in a.get("dilations", [1] * n)]
    bias = None if a.get("bias") is None else _t(a["bias"])
    fn = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return fn(_t(x), _t(w), bias, stride=strides, dilation=dil, groups=int(a.get("groups", 1))).numpy()


def _conv_transpose(a):
    F = _torch().nn.functional
    x, w = _f32(a["x"]), _f32(a["weight"])
    n = x.ndim - 2
    strides = [int(s) for s in a.get("strides", [1] * n)]
    dil = [int(d) for d in a.get("dilations", [1] * n)]
    fn = (F.conv_transpose1d, F.conv_transpose2d)[n - 1]
    y = fn(_t(x), _t(w), None, stride=strides, dilation=dil, groups=int(a.get("groups", 1))).numpy()
    pad = _pads(a, n)
    region = [slice(None), slice(None)] + [slice(pad[2 * i], y.shape[2 + i] - pad[2 * i + 1]) for i in range(n)]
    y = y[tuple(region)]
    if a.get("bias") is not None:
        y = y + _f32(a["bias"]).reshape([1, -1] + [1] * n)
    return y


def _pool(a, kind):
    x = _f32(a["x"])
    n = x.ndim - 2
    if a.get("ceil_mode"):
        raise NotImplementedError("ceil_mode")
    kernel = [int(k) for k in a["kernel_sizes"]]
    strides = [int(s) for s in a.get("strides", [1] * n)]
    pad = _pads(a, n)
    torch = _torch()
    F = torch.nn.functional
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    if kind == "max":
        padded = _spatial_pad(x, pad, -np.inf)
        return (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1](_t(padded), kernel, strides).numpy()
    total = pool(_t(_spatial_pad(x, pad, 0.0)), kernel, strides).numpy() * math.prod(kernel)
    if a.get("exclude_padding_from_average"):
        count = pool(_t(_spatial_pad(np.ones_like(x), pad, 0.0)), kernel, strides).numpy() * math.prod(kernel)
        return total / count
    return total / math.prod(kernel)


def _axes(a, x):
    axes = a.get("axes")
    return tuple(range(x.ndim)) if axes is None else tuple(int(i) % x.ndim for i in np.asarray(axes).reshape(-1))


def _reduce(fn):
    def run(a):
        x = _f32(a["x"])
        return fn(x, axis=_axes(a, x), keepdims=bool(a.get("keep_dims", False)))

    return run


def _log_sum_exp(x, axis, keepdims):
    m = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


def _softmax(a):
    x = _f32(a["x"])
    axis = int(a.get("axis", -1))
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _batch_norm(a):
    x = _f32(a["x"])
    shape = [1, -1] + [1] * (x.ndim - 2)
    mean, var = _f32(a["mean"]).reshape(shape), _f32(a["variance"]).reshape(shape)
    gamma = _f32(a["gamma"]).reshape(shape) if a.get("gamma") is not None else 1.0
    beta = _f32(a["beta"]).reshape(shape) if a.get("beta") is not None else 0.0
    return (x - mean) / np.sqrt(var + float(a.get("epsilon", 1e-5))) * gamma + beta


def _instance_norm(a):
    x = _f32(a["x"])
    axes = tuple(range(2, x.ndim))
    shape = [1, -1] + [1] * (x.ndim - 2)
    norm = (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + float(a.get("epsilon", 1e-5)))
    gamma = _f32(a["gamma"]).reshape(shape) if a.get("gamma") is not None else 1.0
    beta = _f32(a["beta"]).reshape(shape) if a.get("beta") is not None else 0.0
    return norm * gamma + beta


def _layer_norm(a):
    x = _f32(a["x"])
    axes = _axes(a, x)
    norm = (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + float(a.get("epsilon", 1e-5)))
    gamma = _f32(a["gamma"]) if a.get("gamma") is not None else 1.0
    beta = _f32(a["beta"]) if a.get("beta") is not None else 0.0
    return norm * gamma + beta


def _slice_by_index(a):
    x = a["x"]
    n = x.ndim
    begin, end = [int(v) for v in a["begin"]], [int(v) for v in a["end"]]
    stride = [int(v) for v in a.get("stride")] if a.get("stride") is not None else [1] * n
    bmask = list(a.get("begin_mask")) if a.get("begin_mask") is not None else [False] * n
    emask = list(a.get("end_mask")) if a.get("end_mask") is not None else [False] * n
    smask = list(a.get("squeeze_mask")) if a.get("squeeze_mask") is not None else [False] * n
    index = []
    for i in range(n):
        if smask[i]:
            index.append(begin[i])
        else:
            index.append(slice(None if bmask[i] else begin[i], None if emask[i] else end[i], stride[i]))
    return x[tuple(index)]


def _pad(a):
    x = _f32(a["x"])
    pad = [int(p) for p in a["pad"]]
    n = len(pad) // 2
    widths = [(0, 0)] * (x.ndim - n) + [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    mode = str(a.get("mode", "constant"))
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=float(a.get("constant_val", 0.0)))
    return np.pad(x, widths, mode={"reflect": "reflect", "replicate": "edge"}[mode])


def _resize_grid(x_in: int, x_out: int, mode: str) -> np.ndarray:
    """Sampling positions of resize_bilinear, as its documentation defines each sampling mode."""
    i = np.arange(x_out, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if x_out == 1:
            return np.full(1, (x_in - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0)
        grid = i * (x_in - 1) / (x_out - 1)
    elif mode == "DEFAULT":
        grid = i * (x_in - x_in / x_out) / (x_out - 1) if x_out > 1 else np.zeros(1)
    elif mode == "UNALIGN_CORNERS":
        spacing = x_in / x_out
        grid = i * spacing + 0.5 * spacing - 0.5
    else:
        raise NotImplementedError(mode)
    return np.clip(grid, 0, x_in - 1)


def _interp_axis(x, axis, grid):
    lo = np.floor(grid).astype(int)
    hi = np.minimum(lo + 1, x.shape[axis] - 1)
    frac = (grid - lo).reshape([-1 if d == axis % x.ndim else 1 for d in range(x.ndim)])
    return np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac


def _resize_bilinear(a):
    x = _f32(a["x"]).astype(np.float64)
    mode = str(a.get("sampling_mode", "DEFAULT"))
    y = _interp_axis(x, -2, _resize_grid(x.shape[-2], int(a["target_size_height"]), mode))
    return _interp_axis(y, -1, _resize_grid(x.shape[-1], int(a["target_size_width"]), mode))


def _upsample_nearest(a):
    x = a["x"]
    sh, sw = int(a.get("scale_factor_height", 1)), int(a.get("scale_factor_width", 1))
    return np.repeat(np.repeat(x, sh, axis=-2), sw, axis=-1)


def _split(a):
    x, axis = a["x"], int(a["axis"])
    if a.get("split_sizes") is not None:
        points = np.cumsum([int(s) for s in a["split_sizes"]])[:-1]
        return np.split(x, points, axis=axis)
    return np.split(x, int(a["num_splits"]), axis=axis)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _lstm(a):
    """MIL lstm: gates stacked (input, forget, output, cell) in weight_ih / weight_hh / bias."""
    x = _f32(a["x"]).astype(np.float64)
    seq = x.shape[0]
    direction = str(a.get("direction", "forward"))
    out_seq = bool(a.get("output_sequence", False))
    for act, want in (("recurrent_activation", "sigmoid"), ("cell_activation", "tanh"), ("activation", "tanh")):
        if str(a.get(act, want)) != want:
            raise NotImplementedError(f"lstm {act}={a.get(act)}")

    def run(w_ih, w_hh, bias, h, c, reverse):
        hidden = w_hh.shape[1]
        ys = [None] * seq
        for t in (range(seq - 1, -1, -1) if reverse else range(seq)):
            g = x[t] @ w_ih.T + h @ w_hh.T + bias
            i, f, o, z = (g[:, k * hidden:(k + 1) * hidden] for k in range(4))
            c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(z)
            h = _sigmoid(o) * np.tanh(c)
            ys[t] = h
        return np.stack(ys), h, c

    def weights(suffix):
        w_ih = _f32(a[f"weight_ih{suffix}"]).astype(np.float64)
        bias = a.get(f"bias{suffix}")
        return (w_ih, _f32(a[f"weight_hh{suffix}"]).astype(np.float64),
                np.zeros(w_ih.shape[0]) if bias is None else _f32(bias).astype(np.float64))

    h0, c0 = _f32(a["initial_h"]).astype(np.float64), _f32(a["initial_c"]).astype(np.float64)
    if direction == "bidirectional":
        hidden = h0.shape[1] // 2
        yf, hf, cf = run(*weights(""), h0[:, :hidden], c0[:, :hidden], False)
        yb, hb, cb = run(*weights("_back"), h0[:, hidden:], c0[:, hidden:], True)
        y, h, c = np.concatenate([yf, yb], -1), np.concatenate([hf, hb], -1), np.concatenate([cf, cb], -1)
    else:
        y, h, c = run(*weights(""), h0, c0, direction == "reverse")
    return (y if out_seq else h[None]), h, c


def _gelu(a):
    x = _f32(a["x"]).astype(np.float64)
    mode = str(a.get("mode", "EXACT"))
    if mode == "EXACT":
        return 0.5 * x * (1 + _torch().erf(_torch().from_numpy(x / math.sqrt(2))).numpy())
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return x * _sigmoid(1.702 * x)


def _prelu(a):
    x = _f32(a["x"])
    alpha = _f32(a["alpha"]).reshape([1, -1] + [1] * (x.ndim - 2))
    return np.where(x > 0, x, alpha * x)


def _cast(a):
    return np.asarray(a["x"]).astype({"fp16": np.float16, "fp32": np.float32, "int32": np.int32,
                                      "bool": np.bool_}[str(a["dtype"])])


def _matmul(a):
    x, y = _f32(a["x"]), _f32(a["y"])
    if a.get("transpose_x"):
        x = np.swapaxes(x, -1, -2)
    if a.get("transpose_y"):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _linear(a):
    y = _f32(a["x"]) @ _f32(a["weight"]).T
    return y + _f32(a["bias"]) if a.get("bias") is not None else y


def _erf(a):
    return _torch().erf(_t(a["x"])).numpy()


OPS = {
    "identity": lambda a: a["x"],
    "cast": _cast,
    "conv": _conv,
    "conv_transpose": _conv_transpose,
    "max_pool": lambda a: _pool(a, "max"),
    "avg_pool": lambda a: _pool(a, "avg"),
    "linear": _linear,
    "matmul": _matmul,
    "add": lambda a: _f32(a["x"]) + _f32(a["y"]),
    "sub": lambda a: _f32(a["x"]) - _f32(a["y"]),
    "mul": lambda a: _f32(a["x"]) * _f32(a["y"]),
    "real_div": lambda a: _f32(a["x"]) / _f32(a["y"]),
    "pow": lambda a: np.power(_f32(a["x"]), _f32(a["y"])),
    "maximum": lambda a: np.maximum(_f32(a["x"]), _f32(a["y"])),
    "minimum": lambda a: np.minimum(_f32(a["x"]), _f32(a["y"])),
    "relu": lambda a: np.maximum(_f32(a["x"]), 0),
    "sigmoid": lambda a: _sigmoid(_f32(a["x"])),
    "tanh": lambda a: np.tanh(_f32(a["x"])),
    "exp": lambda a: np.exp(_f32(a["x"])),
    "log": lambda a: np.log(_f32(a["x"])),
    "sqrt": lambda a: np.sqrt(_f32(a["x"])),
    "rsqrt": lambda a: 1.0 / np.sqrt(_f32(a["x"]) + float(a.get("epsilon", 1e-12))),
    "inverse": lambda a: 1.0 / (_f32(a["x"]) + float(a.get("epsilon", 1e-4))),
    "abs": lambda a: np.abs(_f32(a["x"])),
    "floor": lambda a: np.floor(_f32(a["x"])),
    "ceil": lambda a: np.ceil(_f32(a["x"])),
    "sign": lambda a: np.sign(_f32(a["x"])),
    "sin": lambda a: np.sin(_f32(a["x"])),
    "cos": lambda a: np.cos(_f32(a["x"])),
    "square": lambda a: np.square(_f32(a["x"])),
    "erf": _erf,
    "softplus": lambda a: np.logaddexp(0, _f32(a["x"])),
    "softsign": lambda a: _f32(a["x"]) / (1 + np.abs(_f32(a["x"]))),
    "silu": lambda a: _f32(a["x"]) * _sigmoid(_f32(a["x"])),
    "leaky_relu": lambda a: np.where(_f32(a["x"]) > 0, _f32(a["x"]), float(a.get("alpha", 0.01)) * _f32(a["x"])),
    "elu": lambda a: np.where(_f32(a["x"]) > 0, _f32(a["x"]), float(a.get("alpha", 1.0)) * np.expm1(_f32(a["x"]))),
    "sigmoid_hard": lambda a: np.clip(float(a.get("alpha", 0.2)) * _f32(a["x"]) + float(a.get("beta", 0.5)), 0, 1),
    "clip": lambda a: np.clip(_f32(a["x"]), float(a["alpha"]), float(a["beta"])),
    "gelu": _gelu,
    "prelu": _prelu,
    "softmax": _softmax,
    "reduce_mean": _reduce(np.mean),
    "reduce_sum": _reduce(np.sum),
    "reduce_max": _reduce(np.max),
    "reduce_min": _reduce(np.min),
    "reduce_prod": _reduce(np.prod),
    "reduce_l1_norm": _reduce(lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims)),
    "reduce_l2_norm": _reduce(lambda x, axis, keepdims: np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims))),
    "reduce_sum_square": _reduce(lambda x, axis, keepdims: np.sum(x * x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum_exp": _reduce(_log_sum_exp),
    "batch_norm": _batch_norm,
    "instance_norm": _instance_norm,
    "layer_norm": _layer_norm,
    "reshape": lambda a: np.reshape(a["x"], [int(d) for d in a["shape"]]),
    "transpose": lambda a: np.transpose(a["x"], [int(p) for p in a["perm"]]),
    "concat": lambda a: np.concatenate([np.asarray(v) for v in a["values"]], axis=int(a["axis"])),
    "stack": lambda a: np.stack([np.asarray(v) for v in a["values"]], axis=int(a["axis"])),
    "slice_by_index": _slice_by_index,
    "squeeze": lambda a: np.squeeze(a["x"], axis=tuple(int(i) for i in a["axes"])),
    "expand_dims": lambda a: np.expand_dims(a["x"], axis=tuple(int(i) for i in a["axes"])),
    "split": _split,
    "gather": lambda a: np.take(a["x"], np.asarray(a["indices"]).astype(np.int64), axis=int(a.get("axis", 0))),
    "tile": lambda a: np.tile(a["x"], [int(r) for r in a["reps"]]),
    "pad": _pad,
    "upsample_nearest_neighbor": _upsample_nearest,
    "resize_bilinear": _resize_bilinear,
    "lstm": _lstm,
}
