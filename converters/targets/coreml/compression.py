"""Weight compression of a converted Core ML model with ``coremltools.optimize.coreml``.

One scheme per model: linear INT8 (symmetric, one scale per output channel), INT4 (symmetric,
one scale per block of input channels; iOS 18 opset), k-means palettization (a 2^n-entry lookup
table per tensor), or — without any of those — Core ML sparse weights (a bit mask plus the non-zero
values) for tensors that are mostly zeros already, as ``--prune-sparsity`` leaves them. Tensors with fewer than
``min_weights`` elements stay uncompressed (default 512, where coremltools defaults to 2048: a
compressed tensor carries its own scales or table, blob headers and a constexpr op in the program,
about 400 bytes, so tensors of a few hundred weights and up still get smaller).

INT4 blocks must tile the input-channel axis; coremltools skips a tensor whose axis the block size
does not divide (24 channels, blocks of 32). Such a tensor gets the largest block size that divides
its axis instead (24 → blocks of 24), down to ``MIN_INT4_BLOCK``; the details list each one.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_INT4_BLOCK = 4  # below this, a per-block scale costs more than INT4 saves


@dataclass(frozen=True)
class CompressionScheme:
    kind: str                  # "linear" | "palettize" | "sparse"
    dtype: str | None = None   # linear: "int8" | "int4"
    nbits: int | None = None   # palettize: 4 | 6 | 8
    block_size: int | None = None
    min_zeros: float | None = None  # sparse: store tensors with at least this fraction of exact zeros
    min_weights: int = 512     # smaller tensors stay uncompressed

    def describe(self) -> dict[str, Any]:
        if self.kind == "linear" and self.dtype == "int8":
            return {"scheme": "int8", "mode": "linear_symmetric", "granularity": "per_channel"}
        if self.kind == "linear":
            return {"scheme": "int4", "mode": "linear_symmetric", "granularity": "per_block",
                    "block_size": self.block_size}
        if self.kind == "palettize":
            return {"scheme": f"palettize-{self.nbits}", "mode": "kmeans", "nbits": self.nbits,
                    "granularity": "per_tensor"}
        return {"scheme": "sparse", "mode": "existing zeros", "min_zero_fraction": self.min_zeros}


def scheme_for(quantize: str, palettize: int | None, int4_block_size: int, min_weights: int,
               sparse_min_zeros: float, weights: list[np.ndarray]) -> CompressionScheme | None:
    """The scheme the flags ask for; without one, sparse storage when some tensor (of ``weights``,
    the converted program's) is at least ``sparse_min_zeros`` zeros."""
    if quantize == "int8":
        return CompressionScheme("linear", dtype="int8", min_weights=min_weights)
    if quantize == "int4":
        return CompressionScheme("linear", dtype="int4", block_size=int4_block_size, min_weights=min_weights)
    if palettize:
        return CompressionScheme("palettize", nbits=palettize, min_weights=min_weights)
    if any(w.size >= min_weights and w.ndim >= 2 and zero_fraction(w) >= sparse_min_zeros for w in weights):
        return CompressionScheme("sparse", min_zeros=sparse_min_zeros, min_weights=min_weights)
    return None


def zero_fraction(weight: np.ndarray) -> float:
    return 1.0 - np.count_nonzero(weight) / weight.size if weight.size else 0.0


@contextlib.contextmanager
def captured_coremltools_log() -> Iterator[list[str]]:
    """Collect coremltools' warnings (e.g. "Cannot perform quantization on X. Skipped this op.")
    and keep its progress bars off the terminal (they write to stderr)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("coremltools")
    handler = Collect(level=logging.WARNING)
    old_propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = old_propagate


def compress(mlmodel: Any, scheme: CompressionScheme, keep: frozenset[str] = frozenset()
             ) -> tuple[Any, list[str], list[dict[str, Any]]]:
    """The compressed model, coremltools' messages about tensors it left alone, and the tensors
    whose INT4 block size was reduced to fit their input axis. ``keep``: const ops left uncompressed
    (``weights_of_ops``, for --keep-float)."""
    import coremltools.optimize.coreml as cto

    adjusted: list[dict[str, Any]] = []
    if scheme.kind == "linear" and scheme.dtype == "int8":
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=scheme.min_weights - 1))
        run = cto.linear_quantize_weights
    elif scheme.kind == "linear":
        def int4(block: int):
            return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                               block_size=block, weight_threshold=scheme.min_weights - 1)

        adjusted = _int4_blocks_that_fit(mlmodel._mil_program, scheme.block_size, scheme.min_weights)
        config = cto.OptimizationConfig(global_config=int4(scheme.block_size),
                                        op_name_configs={a["tensor"]: int4(a["block_size"]) for a in adjusted})
        run = cto.linear_quantize_weights
    elif scheme.kind == "palettize":
        config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(
            mode="kmeans", nbits=scheme.nbits, granularity="per_tensor", weight_threshold=scheme.min_weights - 1))
        run = cto.palettize_weights
    else:  # zeros already there: the threshold pruner only drops values that are (float16-)zero
        config = cto.OptimizationConfig(global_config=cto.OpThresholdPrunerConfig(
            threshold=1e-30, minimum_sparsity_percentile=scheme.min_zeros, weight_threshold=scheme.min_weights - 1))
        run = cto.prune_weights
    for name in keep:  # None: coremltools leaves that op as it is
        config.set_op_name(name, None)
    # An all-zero channel has scale 0: coremltools divides 0 by 0 there (numpy warns) and stores 0 * q = 0.
    with captured_coremltools_log() as messages, np.errstate(divide="ignore", invalid="ignore"):
        compressed = run(mlmodel, config)
    return compressed, [m for m in messages if m.strip()], adjusted


def _int4_blocks_that_fit(program: Any, block_size: int, min_weights: int) -> list[dict[str, Any]]:
    """Weights whose input-channel axis ``block_size`` does not divide, with the block size used instead."""
    from coremltools.optimize._utils import select_input_output_channel_axis  # coremltools' own axis choice

    adjusted = []
    for op in program.functions["main"].operations:
        value = op.outputs[0].val if op.op_type == "const" else None
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.size < min_weights:
            continue
        axis, _ = select_input_output_channel_axis(op)
        if axis is None or not 0 <= axis < value.ndim or value.shape[axis] % block_size == 0:
            continue
        n = value.shape[axis]
        fitting = max(k for k in range(1, block_size + 1) if n % k == 0)
        if fitting >= MIN_INT4_BLOCK:
            adjusted.append({"tensor": op.name, "input_channels": n, "block_size": fitting})
    return adjusted


def weights_of_ops(program: Any, op_names: set[str]) -> frozenset[str]:
    """The const ops holding the float weights of the ops named ``op_names`` (ct.convert's fp16 pass
    renames an op X it casts to X_cast_fp16)."""
    found = set()
    for op in program.functions["main"].operations:
        if op.name in op_names or op.name.removesuffix("_cast_fp16") in op_names:
            for var in op.inputs.values():
                producer = None if isinstance(var, (list, tuple)) else getattr(var, "op", None)
                if producer is not None and producer.op_type == "const" and isinstance(var.val, np.ndarray) \
                        and var.val.dtype.kind == "f" and var.val.size > 1:
                    found.add(producer.name)
    return frozenset(found)


def weights_by_consumer(program: Any) -> dict[tuple[str, str], np.ndarray]:
    """Every constant tensor of a MIL program keyed by (consuming op name, input name).

    The compressed program keeps the op names of the uncompressed one, so this is how each
    compressed weight finds the source weight it must reproduce."""
    found: dict[tuple[str, str], np.ndarray] = {}
    for op in program.functions["main"].operations:
        for param, var in op.inputs.items():
            if isinstance(var, (list, tuple)):
                continue
            producer = getattr(var, "op", None)
            is_const = producer is not None and producer.op_type == "const" and isinstance(var.val, np.ndarray)
            if is_const and var.val.dtype.kind == "f" and var.val.size > 1:
                found[(op.name, param)] = var.val
    return found
