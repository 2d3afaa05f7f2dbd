"""Elementwise operators and activations: they keep their input's axis order, so none of them adds
a transpose. Broadcasting operands are expanded to the output's rank and stored in its order
(constants are permuted here, at conversion time)."""

from __future__ import annotations

import numpy as np

from edgeopt.converters.targets.tflite.flatbuffer import schema
from edgeopt.converters.targets.tflite.lowering import GraphFacts, Lowering, Node, lowers

# -- unary ------------------------------------------------------------------------------------------
_UNARY = {"Relu": "RELU", "Sigmoid": "LOGISTIC", "Tanh": "TANH", "Exp": "EXP", "Log": "LOG", "Sqrt": "SQRT",
          "Abs": "ABS"}


def _same_order_output(ctx: Lowering, node: Node) -> tuple[int, int]:
    x, perm = ctx.get_stored(node.inputs[0])
    return x, ctx.output(node.outputs[0], perm)


@lowers(*_UNARY)
def lower_unary(ctx: Lowering, node: Node) -> None:
    x, out = _same_order_output(ctx, node)
    ctx.op(_UNARY[node.op], [x], [out])


def _check_dropout(node: Node, facts: GraphFacts) -> str | None:
    if len([o for o in node.outputs if o]) > 1:
        return "mask output"
    if facts.with_graph and node.has_input(2):
        mode = facts.const(node.inputs[2])
        if mode is not None and bool(mode.reshape(())):
            return "training mode"
    return None


@lowers("HardSwish")
def lower_hard_swish(ctx: Lowering, node: Node) -> None:
    """HARD_SWISH for float models. For a full-integer model x * relu6(x + 3) / 6 instead (ADD with RELU6
    fused, two MULs): XNNPACK has no integer HARD_SWISH, so LiteRT would run its slow reference kernel
    (a MobileNet-style net ran 6x slower in INT8 than in FP32), and LiteRT's quantizer has no int16 one."""
    x, out = _same_order_output(ctx, node)
    if not ctx.full_integer:
        ctx.op("HARD_SWISH", [x], [out])
        return
    n = node.name
    gate = ctx.tmp(f"{n}/relu6", ctx.b.shape(x))
    ctx.op("ADD", [x, ctx.const_tensor(np.array(3.0, np.float32), f"{n}/three")], [gate], "AddOptions",
           fusedActivationFunction=_relu6())
    scaled = ctx.binary("MUL", gate, ctx.const_tensor(np.array(1 / 6, np.float32), f"{n}/sixth"), f"{n}/gate")
    ctx.op("MUL", [x, scaled], [out], "MulOptions", fusedActivationFunction=0)


@lowers("Neg")
def lower_neg(ctx: Lowering, node: Node) -> None:
    """x * -1 (exact): MUL has full-integer kernels, NEG has none in LiteRT's quantizer."""
    x, out = _same_order_output(ctx, node)
    ctx.op("MUL", [x, ctx.const_tensor(np.array(-1.0, np.float32), f"{node.name}/minus_one")], [out], "MulOptions",
           fusedActivationFunction=0)


@lowers("Identity")
def lower_identity(ctx: Lowering, node: Node) -> None:
    x, perm = ctx.get_stored(node.inputs[0])
    ctx.alias(node.outputs[0], x, perm)


lowers("Dropout", check=_check_dropout, constant_inputs=(1, 2))(lower_identity)  # inference: Dropout passes its input through


@lowers("LeakyRelu")
def lower_leaky_relu(ctx: Lowering, node: Node) -> None:
    x, out = _same_order_output(ctx, node)
    ctx.op("LEAKY_RELU", [x], [out], "LeakyReluOptions", alpha=float(node.attr("alpha", 0.01)))


@lowers("PRelu", constant_inputs=(1,))
def lower_prelu(ctx: Lowering, node: Node) -> None:
    x, perm = ctx.get_stored(node.inputs[0])
    slope = ctx.broadcast_to_rank(node.inputs[1], ctx.rank(node.inputs[0]), perm)
    out = ctx.output(node.outputs[0], perm)
    ctx.op("PRELU", [x, slope], [out])


def _clip_bounds(node: Node, constants) -> tuple[float | None, float | None]:
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        return node.attr("min", None), node.attr("max", None)
    lo = float(constants(node.inputs[1]).reshape(())) if node.has_input(1) else None
    hi = float(constants(node.inputs[2]).reshape(())) if node.has_input(2) else None
    return lo, hi


@lowers("Clip", constant_inputs=(1, 2))
def lower_clip(ctx: Lowering, node: Node) -> None:
    lo, hi = _clip_bounds(node, ctx.const)
    x, perm = ctx.get_stored(node.inputs[0])
    out = ctx.output(node.outputs[0], perm)
    fused = {(0.0, 6.0): "RELU6", (0.0, None): "RELU", (-1.0, 1.0): "RELU_N1_TO_1"}.get((lo, hi))
    if fused:
        ctx.op(fused, [x], [out])
        return
    if lo is not None and hi is not None and lo > hi:  # ONNX: every output is max
        lo = hi
    t = x
    if lo is not None:
        bound = ctx.const_tensor(np.array(lo, np.float32), f"{node.name}/min")
        t_next = out if hi is None else ctx.tmp(f"{node.name}/lower", ctx.b.shape(x))
        ctx.op("MAXIMUM", [t, bound], [t_next])
        t = t_next
    if hi is not None:
        bound = ctx.const_tensor(np.array(hi, np.float32), f"{node.name}/max")
        ctx.op("MINIMUM", [t, bound], [out])
    if lo is None and hi is None:
        ctx.reshape(x, ctx.b.shape(x), node.name, out=out)


@lowers("HardSigmoid")
def lower_hard_sigmoid(ctx: Lowering, node: Node) -> None:
    """max(0, min(1, alpha x + beta)) = relu6(6 alpha x + 6 beta) / 6: a MUL (left out when 6 alpha = 1),
    an ADD with RELU6 fused, a MUL; no MINIMUM / MAXIMUM, which full-integer graphs must requantize for."""
    alpha, beta = float(node.attr("alpha", 0.2)), float(node.attr("beta", 0.5))
    x, out = _same_order_output(ctx, node)
    n = node.name
    if abs(6 * alpha - 1) > 1e-7:
        x = ctx.binary("MUL", x, ctx.const_tensor(np.array(6 * alpha, np.float32), f"{n}/alpha6"), f"{n}/scaled")
    clipped = ctx.tmp(f"{n}/relu6", ctx.b.shape(x))
    ctx.op("ADD", [x, ctx.const_tensor(np.array(6 * beta, np.float32), f"{n}/beta6")], [clipped], "AddOptions",
           fusedActivationFunction=_relu6())
    ctx.op("MUL", [clipped, ctx.const_tensor(np.array(1 / 6, np.float32), f"{n}/sixth")], [out], "MulOptions",
           fusedActivationFunction=0)


def _relu6() -> int:
    return schema().ActivationFunctionType.RELU6


def _check_gelu(node: Node, facts: GraphFacts) -> str | None:
    if node.attr("approximate", "none") not in ("none", "tanh"):
        return f"approximate={node.attr('approximate')}"
    return None


@lowers("Gelu", check=_check_gelu)
def lower_gelu(ctx: Lowering, node: Node) -> None:
    x, out = _same_order_output(ctx, node)
    ctx.op("GELU", [x], [out], "GeluOptions", approximate=node.attr("approximate", "none") == "tanh")


# Abramowitz & Stegun 7.1.26: |error| <= 1.5e-7 over the real line. TFLite has no ERF builtin, so
# erf is built from builtins (ABS, MUL, ADD, DIV, EXP, SIGN); GELU itself maps to the GELU builtin.
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


@lowers("Erf")
def lower_erf(ctx: Lowering, node: Node) -> None:
    x, out = _same_order_output(ctx, node)
    n = node.name
    shape = ctx.b.shape(x)

    def c(v: float, tag: str) -> int:
        return ctx.const_tensor(np.array(v, np.float32), f"{n}/{tag}")

    ax = ctx.unary("ABS", x, f"{n}/abs")
    denom = ctx.binary("ADD", ctx.binary("MUL", ax, c(_ERF_P, "p"), f"{n}/px"), c(1.0, "one"), f"{n}/den")
    t = ctx.binary("DIV", c(1.0, "one"), denom, f"{n}/t", out_shape=shape)
    poly = ctx.binary("MUL", t, c(_ERF_A[4], "a5"), f"{n}/h4")
    for i in (3, 2, 1, 0):
        poly = ctx.binary("ADD", poly, c(_ERF_A[i], f"a{i + 1}"), f"{n}/h{i}a")
        poly = ctx.binary("MUL", poly, t, f"{n}/h{i}m")
    gauss = ctx.unary("EXP", ctx.unary("NEG", ctx.binary("MUL", ax, ax, f"{n}/sq"), f"{n}/negsq"), f"{n}/gauss")
    magnitude = ctx.binary("SUB", c(1.0, "one"), ctx.binary("MUL", poly, gauss, f"{n}/tail"), f"{n}/mag",
                           out_shape=shape)
    ctx.op("MUL", [magnitude, ctx.unary("SIGN", x, f"{n}/sign")], [out], "MulOptions", fusedActivationFunction=0)


@lowers("Pow")
def lower_pow(ctx: Lowering, node: Node) -> None:
    exponent = ctx.const(node.inputs[1]) if ctx.is_const(node.inputs[1]) else None
    if exponent is not None and exponent.size == 1 and ctx.rank(node.outputs[0]) == ctx.rank(node.inputs[0]):
        e = float(exponent.reshape(()))
        x, out = _same_order_output(ctx, node)
        if e == 2.0:
            ctx.op("MUL", [x, x], [out], "MulOptions", fusedActivationFunction=0)
            return
        if e == 0.5:
            ctx.op("SQRT", [x], [out])
            return
        if e == 1.0:
            ctx.reshape(x, ctx.b.shape(x), node.name, out=out)
            return
        ctx.op("POW", [x, ctx.const_tensor(np.array(e, np.float32), f"{node.name}/exponent")], [out])
        return
    _broadcast_binary(ctx, node, "POW")


# -- binary with broadcasting ---------------------------------------------------------------------
_BINARY = {"Add": "ADD", "Sub": "SUB", "Mul": "MUL", "Div": "DIV", "Max": "MAXIMUM", "Min": "MINIMUM"}


def _choose_perm(ctx: Lowering, names: list[str], rank: int):
    for name in names:
        if not ctx.is_const(name) and ctx.rank(name) == rank and ctx.perm(name) is not None:
            return ctx.perm(name)
    return None


def _broadcast_binary(ctx: Lowering, node: Node, builtin: str) -> None:
    names = [n for n in node.inputs if n]
    rank = ctx.rank(node.outputs[0])
    perm = _choose_perm(ctx, names, rank)
    operands = [ctx.broadcast_to_rank(n, rank, perm) for n in names]
    out = ctx.output(node.outputs[0], perm)
    if len(operands) == 1:
        ctx.reshape(operands[0], ctx.b.shape(out), node.name, out=out)
        return
    acc = operands[0]
    for i, operand in enumerate(operands[1:], start=1):
        target = out if i == len(operands) - 1 else None
        if target is None:
            acc = ctx.binary(builtin, acc, operand, f"{node.name}/partial{i}")
        elif builtin in ("ADD", "SUB", "MUL", "DIV"):
            ctx.op(builtin, [acc, operand], [target], builtin.capitalize() + "Options", fusedActivationFunction=0)
        else:
            ctx.op(builtin, [acc, operand], [target])


@lowers(*_BINARY)
def lower_binary(ctx: Lowering, node: Node) -> None:
    if node.op == "Div" and ctx.is_const(node.inputs[1]) and not ctx.is_const(node.inputs[0]):
        # x / c as x * (1 / c): within an ulp in float, and MUL is full-integer quantizable (DIV is not)
        divisor = ctx.const(node.inputs[1]).astype(np.float64)
        if np.all(divisor != 0):
            reciprocal = f"{node.name}/reciprocal"
            ctx.facts.constants[reciprocal] = (1.0 / divisor).astype(np.float32)
            ctx.facts.shapes[reciprocal] = tuple(divisor.shape)
            node = Node(node.proto, "Mul", node.name, [node.inputs[0], reciprocal], node.outputs, node.attrs)
    _broadcast_binary(ctx, node, _BINARY[node.op])


# -- BatchNormalization (inference): a per-channel scale and shift --------------------------------
def _check_batch_norm(node: Node, facts: GraphFacts) -> str | None:
    if len([o for o in node.outputs if o]) > 1 or node.attr("training_mode", 0):
        return "training mode"
    return None


@lowers("BatchNormalization", check=_check_batch_norm, constant_inputs=(1, 2, 3, 4))
def lower_batch_norm(ctx: Lowering, node: Node) -> None:
    scale, bias, mean, var = (ctx.const(n).astype(np.float64) for n in node.inputs[1:5])
    eps = float(node.attr("epsilon", 1e-5))
    a = scale / np.sqrt(var + eps)
    b = bias - mean * a
    x_name = node.inputs[0]
    rank = ctx.rank(x_name)
    x, perm = ctx.get_stored(x_name)
    per_channel = (1, -1) + (1,) * (rank - 2)
    a_arr = a.astype(np.float32).reshape(per_channel)
    b_arr = b.astype(np.float32).reshape(per_channel)
    if perm is not None:
        a_arr, b_arr = np.transpose(a_arr, perm), np.transpose(b_arr, perm)
    scaled = ctx.binary("MUL", x, ctx.const_tensor(a_arr, f"{node.name}/scale"), f"{node.name}/scaled")
    out = ctx.output(node.outputs[0], perm)
    ctx.op("ADD", [scaled, ctx.const_tensor(b_arr, f"{node.name}/shift")], [out], "AddOptions",
           fusedActivationFunction=0)

