"""Axis orders: ONNX is channels-first (NCHW, NCL), TFLite's convolutions and pools channels-last.

A value in the TFLite graph is stored as ``onnx_value.transpose(perm)``; ``perm`` None means the
ONNX axis order. Layout-sensitive operators (Conv, pools, Resize, InstanceNorm) take and give
channels-last tensors; elementwise operators keep whatever order their input has; operators with
an axis attribute map the axis through ``perm``; only operators that depend on the memory order
(Reshape, Flatten, MatMul...) need the ONNX order back, so a network of convolutions has no
transposes between its layers.
"""

from __future__ import annotations

from collections.abc import Sequence

Perm = tuple[int, ...]


def channels_last(rank: int) -> Perm:
    """(0, 2, 3, ..., 1): NCHW → NHWC, NCL → NLC."""
    return (0, *range(2, rank), 1)


def identity(rank: int) -> Perm:
    return tuple(range(rank))


def normalize(perm: Sequence[int] | None, rank: int) -> Perm | None:
    """None for the identity order (the canonical spelling), else a tuple."""
    if perm is None:
        return None
    perm = tuple(int(p) for p in perm)
    return None if perm == identity(rank) else perm


def inverse(perm: Sequence[int]) -> Perm:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def compose(first: Sequence[int], then: Sequence[int]) -> Perm:
    """The single transpose equal to ``x.transpose(first).transpose(then)``."""
    return tuple(first[t] for t in then)


def apply(shape: Sequence[int], perm: Sequence[int] | None) -> tuple[int, ...]:
    return tuple(shape) if perm is None else tuple(shape[p] for p in perm)


def axis_in(axis: int, perm: Sequence[int] | None) -> int:
    """Where ONNX axis ``axis`` (non-negative) sits in a tensor stored with ``perm``."""
    return axis if perm is None else list(perm).index(axis)


def same_memory_order(shape: Sequence[int], perm: Sequence[int] | None) -> bool:
    """True when storing ``shape`` transposed by ``perm`` leaves the elements in the same order
    (only size-1 axes move), so a reshape can read the stored tensor directly."""
    if perm is None:
        return True
    moved = [p for p in perm if shape[p] != 1]
    return moved == sorted(moved)
