"""Gemm and MatMul: FULLY_CONNECTED when the weight is a constant matrix (what quantizers and
XNNPACK optimise best), BATCH_MATMUL when both operands are computed at run time."""

from __future__ import annotations

import numpy as np

from edgeopt.converters.targets.tflite.lowering import Lowering, Node, lowers


def fully_connected(ctx: Lowering, x: int, weights: np.ndarray | int, bias: np.ndarray | None, out: int | None,
                    hint: str, keep_num_dims: bool = False) -> int:
    """FULLY_CONNECTED of tensor ``x`` (..., K) with constant ``weights`` (N, K) [+ bias (N,)], or a
    weights tensor already made (an index)."""
    n = ctx.b.shape(weights)[0] if isinstance(weights, int) else weights.shape[0]
    in_shape = ctx.b.shape(x)
    if out is None:
        shape = (*in_shape[:-1], n) if keep_num_dims else (int(np.prod(in_shape[:-1])), n)
        out = ctx.tmp(hint, shape)
    # no bias: the optional input is left out (-1) rather than a tensor of zeros, which a quantized
    # model would carry once per operator with its own scale
    bias_t = -1 if bias is None else ctx.const_tensor(np.asarray(bias, np.float32), hint + "/bias")
    w = weights if isinstance(weights, int) else ctx.const_tensor(weights.astype(np.float32), hint + "/weights")
    ctx.op("FULLY_CONNECTED", [x, w, bias_t], [out],
           "FullyConnectedOptions", fusedActivationFunction=0, weightsFormat=0, keepNumDims=keep_num_dims,
           asymmetricQuantizeInputs=False)
    return out


@lowers("Gemm")
def lower_gemm(ctx: Lowering, node: Node) -> None:
    """Y = alpha * A' B' + beta * C (A' = A or A^T, B' = B or B^T)."""
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    trans_a, trans_b = int(node.attr("transA", 0)), int(node.attr("transB", 0))
    a = ctx.get(node.inputs[0])
    if trans_a:
        a = ctx.transpose(a, (1, 0), f"{node.name}/a_t")
    out_shape = ctx.shape(node.outputs[0])
    n = out_shape[1]
    c_name = node.inputs[2] if node.has_input(2) else None
    bias = None
    c_is_bias = c_name is not None and ctx.is_const(c_name) and np.prod(ctx.shape(c_name)) in (1, n) and (
        ctx.rank(c_name) == 0 or ctx.shape(c_name)[-1] in (1, n))
    if c_is_bias:
        bias = np.broadcast_to(beta * ctx.const(c_name).astype(np.float64).reshape(-1), (n,))
    out = ctx.output(node.outputs[0])
    product_out = out if c_name is None or c_is_bias else None
    if ctx.is_const(node.inputs[1]):
        b = ctx.const(node.inputs[1]).astype(np.float64)
        weights = alpha * (b if trans_b else b.T)  # FULLY_CONNECTED wants (N, K)
        product = fully_connected(ctx, a, weights, bias, product_out, f"{node.name}/fc")
    else:
        b = ctx.get(node.inputs[1])
        product = product_out if product_out is not None else ctx.tmp(f"{node.name}/matmul", out_shape)
        raw = product if alpha == 1.0 and bias is None else ctx.tmp(f"{node.name}/ab", out_shape)
        ctx.op("BATCH_MATMUL", [a, b], [raw], "BatchMatMulOptions", adjX=False, adjY=bool(trans_b),
               asymmetricQuantizeInputs=False)
        if raw != product:
            scaled = raw
            if alpha != 1.0:
                target = product if bias is None else ctx.tmp(f"{node.name}/alpha_ab", out_shape)
                ctx.op("MUL", [raw, ctx.const_tensor(np.array(alpha, np.float32), f"{node.name}/alpha")], [target],
                       "MulOptions", fusedActivationFunction=0)
                scaled = target
            if bias is not None:
                ctx.op("ADD", [scaled, ctx.const_tensor(bias.astype(np.float32).reshape(1, n), f"{node.name}/bias")],
                       [product], "AddOptions", fusedActivationFunction=0)
    if c_name is None or c_is_bias:
        return
    # C is a full matrix or computed at run time: add beta * C with broadcasting
    if ctx.is_const(c_name):
        c = ctx.const_tensor((beta * ctx.const(c_name).astype(np.float64)).astype(np.float32).reshape(
            (1,) * (2 - ctx.rank(c_name)) + ctx.shape(c_name)), f"{node.name}/c")
    else:
        c = ctx.broadcast_to_rank(c_name, 2, None)
        if beta != 1.0:
            c = ctx.binary("MUL", c, ctx.const_tensor(np.array(beta, np.float32), f"{node.name}/beta"),
                           f"{node.name}/beta_c")
    ctx.op("ADD", [product, c], [out], "AddOptions", fusedActivationFunction=0)


@lowers("MatMul")
def lower_matmul(ctx: Lowering, node: Node) -> None:
    a_name, b_name = node.inputs[:2]
    a_shape, b_shape = ctx.shape(a_name), ctx.shape(b_name)
    out_shape = ctx.shape(node.outputs[0])
    a = ctx.get(a_name)
    if len(a_shape) == 1:
        a = ctx.reshape(a, (1, a_shape[0]), f"{node.name}/a2d")
    out = ctx.output(node.outputs[0])
    if ctx.is_const(b_name) and len(b_shape) <= 2:
        b = ctx.const(b_name).astype(np.float32)
        weights = b.reshape(-1, 1).T if b.ndim == 1 else b.T
        a_shape2 = ctx.b.shape(a)
        keep = len(a_shape2) > 2
        fc_shape = (*a_shape2[:-1], weights.shape[0])
        if fc_shape == tuple(out_shape):
            fully_connected(ctx, a, weights, None, out, f"{node.name}/fc", keep_num_dims=keep)
        else:  # a 1-D operand: ONNX drops its axis from the result
            product = fully_connected(ctx, a, weights, None, None, f"{node.name}/fc", keep_num_dims=keep)
            ctx.reshape(product, out_shape, node.name, out=out)
        return
    b = ctx.get(b_name)
    if len(b_shape) == 1:
        b = ctx.reshape(b, (b_shape[0], 1), f"{node.name}/b2d")
    a_rank, b_rank = len(ctx.b.shape(a)), len(ctx.b.shape(b))
    rank = max(a_rank, b_rank)
    a = ctx.reshape(a, (1,) * (rank - a_rank) + ctx.b.shape(a), f"{node.name}/a_rank")
    b = ctx.reshape(b, (1,) * (rank - b_rank) + ctx.b.shape(b), f"{node.name}/b_rank")
    batch = tuple(np.broadcast_shapes(ctx.b.shape(a)[:-2], ctx.b.shape(b)[:-2]))
    full = (*batch, ctx.b.shape(a)[-2], ctx.b.shape(b)[-1])
    target = out if full == out_shape else ctx.tmp(f"{node.name}/full", full)
    ctx.op("BATCH_MATMUL", [a, b], [target], "BatchMatMulOptions", adjX=False, adjY=False,
           asymmetricQuantizeInputs=False)
    if target != out:
        ctx.reshape(target, out_shape, node.name, out=out)
