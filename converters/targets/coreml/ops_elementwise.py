"""Elementwise ops, activations, softmax, reductions and normalisations → MIL."""

from __future__ import annotations

import numpy as np

from edgeopt.converters.targets.coreml.rules import LoweringError, normalize_axis, only, rule

BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "real_div", "Pow": "pow"}
VARIADIC = {"Max": "maximum", "Min": "minimum", "Sum": "add"}
UNARY = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Exp": "exp", "Log": "log", "Sqrt": "sqrt",
         "Abs": "abs", "Floor": "floor", "Ceil": "ceil", "Erf": "erf", "Softplus": "softplus",
         "Softsign": "softsign", "Sin": "sin", "Cos": "cos", "Sign": "sign"}
REDUCE = {"ReduceMean": "reduce_mean", "ReduceSum": "reduce_sum", "ReduceMax": "reduce_max",
          "ReduceMin": "reduce_min", "ReduceProd": "reduce_prod", "ReduceL1": "reduce_l1_norm",
          "ReduceL2": "reduce_l2_norm", "ReduceLogSumExp": "reduce_log_sum_exp",
          "ReduceSumSquare": "reduce_sum_square"}


def _float_operand(value):
    """Integer constants meeting float tensors (``x * 2``) become float32 constants."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "iub":
        return value.astype(np.float32)
    return value


@rule(*BINARY)
def binary(cx, node, attrs):
    x, y = (_float_operand(cx.input(node, i)) for i in (0, 1))
    if node.op_type == "Pow" and isinstance(y, np.ndarray) and y.size == 1:
        exponent = float(y.reshape(-1)[0])
        if exponent == 2.0:
            return cx.mb.mul(x=x, y=x, name=cx.name())
        if exponent == 0.5:
            return cx.mb.sqrt(x=x, name=cx.name())
    return getattr(cx.mb, BINARY[node.op_type])(x=x, y=y, name=cx.name())


@rule(*VARIADIC)
def variadic(cx, node, attrs):
    values = [_float_operand(cx.input(node, i)) for i in range(len(node.input))]
    out = values[0]
    fn = getattr(cx.mb, VARIADIC[node.op_type])
    for i, v in enumerate(values[1:]):
        out = fn(x=out, y=v, **cx.name_if(i == len(values) - 2))
    return out if len(values) > 1 else cx.mb.identity(x=out, name=cx.name())


@rule(*UNARY)
def unary(cx, node, attrs):
    return getattr(cx.mb, UNARY[node.op_type])(x=cx.input(node, 0), name=cx.name())


@rule("Identity")
def identity(cx, node, attrs):
    return cx.input(node, 0)


@rule("Neg")
def neg(cx, node, attrs):
    return cx.mb.mul(x=cx.input(node, 0), y=np.float32(-1.0), name=cx.name())


@rule("Reciprocal")
def reciprocal(cx, node, attrs):
    return cx.mb.real_div(x=np.float32(1.0), y=cx.input(node, 0), name=cx.name())


@rule("LeakyRelu")
def leaky_relu(cx, node, attrs):
    return cx.mb.leaky_relu(x=cx.input(node, 0), alpha=float(attrs.get("alpha", 0.01)), name=cx.name())


@rule("Elu")
def elu(cx, node, attrs):
    return cx.mb.elu(x=cx.input(node, 0), alpha=float(attrs.get("alpha", 1.0)), name=cx.name())


@rule("Selu")
def selu(cx, node, attrs):
    alpha = float(attrs.get("alpha", 1.67326319217681884765625))
    gamma = float(attrs.get("gamma", 1.05070102214813232421875))
    return cx.mb.mul(x=cx.mb.elu(x=cx.input(node, 0), alpha=alpha), y=np.float32(gamma), name=cx.name())


@rule("HardSigmoid")
def hard_sigmoid(cx, node, attrs):
    return cx.mb.sigmoid_hard(x=cx.input(node, 0), alpha=float(attrs.get("alpha", 0.2)),
                              beta=float(attrs.get("beta", 0.5)), name=cx.name())


@rule("HardSwish")
def hard_swish(cx, node, attrs):
    x = cx.input(node, 0)
    return cx.mb.mul(x=x, y=cx.mb.sigmoid_hard(x=x, alpha=1.0 / 6, beta=0.5), name=cx.name())


@rule("Gelu", check=only(approximate=("none", "tanh")))
def gelu(cx, node, attrs):
    mode = "TANH_APPROXIMATION" if attrs.get("approximate", "none") == "tanh" else "EXACT"
    return cx.mb.gelu(x=cx.input(node, 0), mode=mode, name=cx.name())


@rule("Mish")
def mish(cx, node, attrs):
    x = cx.input(node, 0)
    return cx.mb.mul(x=x, y=cx.mb.tanh(x=cx.mb.softplus(x=x)), name=cx.name())


@rule("PRelu", const_inputs=(1,))
def prelu(cx, node, attrs):
    x, slope = cx.input(node, 0), cx.const(node, 1).astype(np.float32)
    shape = cx.shape(x)
    channels = shape[1] if len(shape) >= 3 else None
    if channels and slope.size in (1, channels) and (slope.ndim <= 1 or slope.shape[0] == slope.size):
        return cx.mb.prelu(x=x, alpha=np.broadcast_to(slope.reshape(-1), (channels,)).copy(), name=cx.name())
    # General broadcast: max(x, 0) + slope * min(x, 0)
    return cx.mb.add(x=cx.mb.relu(x=x), y=cx.mb.mul(x=cx.mb.minimum(x=x, y=np.float32(0.0)), y=slope),
                     name=cx.name())


@rule("Clip")
def clip(cx, node, attrs):
    x = cx.input(node, 0)
    if cx.opset < 11:
        lo, hi = attrs.get("min"), attrs.get("max")
    else:
        lo = float(cx.const(node, 1).reshape(-1)[0]) if cx.has(node, 1) else None
        hi = float(cx.const(node, 2).reshape(-1)[0]) if cx.has(node, 2) else None
    if lo is not None and hi is not None:
        return cx.mb.clip(x=x, alpha=np.float32(lo), beta=np.float32(hi), name=cx.name())
    if lo is not None:
        return cx.mb.maximum(x=x, y=np.float32(lo), name=cx.name())
    if hi is not None:
        return cx.mb.minimum(x=x, y=np.float32(hi), name=cx.name())
    return x


def _softmax_axis(cx, node, attrs, rank: int) -> tuple[int, bool]:
    """(axis, coerce_2d): before opset 13 Softmax flattens the input to 2D at ``axis``."""
    if cx.opset < 13:
        return normalize_axis(int(attrs.get("axis", 1)), rank), True
    return normalize_axis(int(attrs.get("axis", -1)), rank), False


def _over_flattened(cx, x, axis: int, fn):
    """Apply ``fn(x2d, axis=1)`` to ``x`` viewed as [prod(shape[:axis]), prod(shape[axis:])]."""
    shape = cx.shape(x)
    flat = cx.mb.reshape(x=x, shape=[int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))])
    return cx.mb.reshape(x=fn(flat, 1), shape=list(shape), name=cx.name())


@rule("Softmax")
def softmax(cx, node, attrs):
    x = cx.input(node, 0)
    rank = len(cx.shape(x))
    axis, coerce = _softmax_axis(cx, node, attrs, rank)
    if coerce and axis != rank - 1:
        return _over_flattened(cx, x, axis, lambda v, a: cx.mb.softmax(x=v, axis=a))
    return cx.mb.softmax(x=x, axis=axis, name=cx.name())


@rule("LogSoftmax")
def log_softmax(cx, node, attrs):
    x = cx.input(node, 0)
    rank = len(cx.shape(x))
    axis, coerce = _softmax_axis(cx, node, attrs, rank)

    def log_softmax_at(v, a, name=None):
        lse = cx.mb.reduce_log_sum_exp(x=v, axes=[a], keep_dims=True)
        return cx.mb.sub(x=v, y=lse, name=name) if name else cx.mb.sub(x=v, y=lse)

    if coerce and axis != rank - 1:
        return _over_flattened(cx, x, axis, log_softmax_at)
    return log_softmax_at(x, axis, cx.name())


def _reduce_axes(cx, node, attrs, rank: int) -> list[int] | None:
    """The reduced axes (None: all); axes come from an attribute or, in newer opsets, input 1."""
    if "axes" in attrs:
        axes = list(attrs["axes"])
    elif cx.has(node, 1):
        axes = cx.const_ints(node, 1)
    else:
        axes = []
    if not axes:
        return None
    return sorted(normalize_axis(a, rank) for a in axes)


@rule(*REDUCE, check=only(noop_with_empty_axes=0))
def reduce(cx, node, attrs):
    x = cx.input(node, 0)
    rank = len(cx.shape(x))
    axes = _reduce_axes(cx, node, attrs, rank)
    keep = bool(attrs.get("keepdims", 1))
    return getattr(cx.mb, REDUCE[node.op_type])(x=x, axes=axes if axes is not None else list(range(rank)),
                                                keep_dims=keep, name=cx.name())


@rule("GlobalAveragePool", "GlobalMaxPool")
def global_pool(cx, node, attrs):
    x = cx.input(node, 0)
    axes = list(range(2, len(cx.shape(x))))
    fn = cx.mb.reduce_mean if node.op_type == "GlobalAveragePool" else cx.mb.reduce_max
    return fn(x=x, axes=axes, keep_dims=True, name=cx.name())


@rule("BatchNormalization", check=only(training_mode=0), const_inputs=(1, 2, 3, 4))
def batch_norm(cx, node, attrs):
    x = cx.input(node, 0)
    scale, bias, mean, var = (cx.const(node, i).astype(np.float32) for i in (1, 2, 3, 4))
    eps = float(attrs.get("epsilon", 1e-5))
    rank = len(cx.shape(x))
    if 3 <= rank <= 5:
        return cx.mb.batch_norm(x=x, mean=mean, variance=var, gamma=scale, beta=bias, epsilon=np.float32(eps),
                                name=cx.name())
    # [N, C] (BatchNorm1d after a Linear): the same affine map, folded into one multiply-add
    mul = (scale / np.sqrt(var + eps)).astype(np.float32)
    add = (bias - mean * mul).astype(np.float32)
    shape = [1, -1] + [1] * (rank - 2)
    return cx.mb.add(x=cx.mb.mul(x=x, y=mul.reshape(shape)), y=add.reshape(shape), name=cx.name())


@rule("InstanceNormalization", const_inputs=(1, 2))
def instance_norm(cx, node, attrs):
    x = cx.input(node, 0)
    if len(cx.shape(x)) not in (3, 4):
        raise LoweringError("InstanceNormalization is supported on rank-3 and rank-4 inputs")
    return cx.mb.instance_norm(x=x, gamma=cx.const(node, 1).astype(np.float32),
                               beta=cx.const(node, 2).astype(np.float32),
                               epsilon=np.float32(attrs.get("epsilon", 1e-5)), name=cx.name())


def _single_output(node, attrs):
    if len([o for o in node.output if o]) > 1:
        return "the Mean / InvStdDev outputs"
    return None


@rule("LayerNormalization", check=_single_output, const_inputs=(1, 2))
def layer_norm(cx, node, attrs):
    x = cx.input(node, 0)
    shape = cx.shape(x)
    axis = normalize_axis(int(attrs.get("axis", -1)), len(shape))
    norm_shape = shape[axis:]
    gamma = np.broadcast_to(cx.const(node, 1).astype(np.float32), norm_shape).copy()
    beta = (np.broadcast_to(cx.const(node, 2).astype(np.float32), norm_shape).copy() if cx.has(node, 2)
            else np.zeros(norm_shape, np.float32))
    return cx.mb.layer_norm(x=x, axes=list(range(axis, len(shape))), gamma=gamma, beta=beta,
                            epsilon=np.float32(attrs.get("epsilon", 1e-5)), name=cx.name())
