"""The table of ONNX ops the Core ML target lowers, and the context the lowering functions share.

Each rule pairs a lowering function with a check of the node's attributes (returning the reason a
node cannot be lowered, or None) and the positions of inputs that must be constants (weights,
shapes, axes). The checks run on the ONNX graph alone, before coremltools is even imported, so
``edgeopt inspect`` and the pre-flight op check can name every node the target cannot compile.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

Check = Callable[[onnx.NodeProto, dict[str, Any]], str | None]


class LoweringError(Exception):
    """A node could not be lowered although its attributes passed the check (the message says why)."""


@dataclass(frozen=True)
class OpRule:
    lower: Callable[..., Any]          # (cx: LoweringContext, node, attrs) -> output value(s)
    check: Check | None = None          # reason the node is not supported, or None
    const_inputs: tuple[int, ...] = ()  # input positions that must be initializers

    def problem(self, node: onnx.NodeProto) -> str | None:
        return self.check(node, attributes(node)) if self.check else None


RULES: dict[str, OpRule] = {}


def rule(*op_types: str, check: Check | None = None, const_inputs: tuple[int, ...] = ()):
    """Register a lowering function for one or more ONNX op types (default domain)."""

    def register(fn):
        for op_type in op_types:
            RULES[op_type] = OpRule(fn, check, const_inputs)
        return fn

    return register


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        out[attr.name] = value.decode() if isinstance(value, bytes) else value
    return out


def only(**allowed: Any) -> Check:
    """A check that an attribute, when present, has one of the allowed values."""

    def check(node: onnx.NodeProto, attrs: dict[str, Any]) -> str | None:
        for name, values in allowed.items():
            values = values if isinstance(values, tuple) else (values,)
            if name in attrs and attrs[name] not in values:
                return f"{name}={attrs[name]!r}"
        return None

    return check


def all_of(*checks: Check) -> Check:
    def check(node: onnx.NodeProto, attrs: dict[str, Any]) -> str | None:
        for c in checks:
            if (problem := c(node, attrs)) is not None:
                return problem
        return None

    return check


def identifier(name: str) -> str:
    """A MIL-safe name (letters, digits, underscore; not starting with a digit)."""
    safe = re.sub(r"[^A-Za-z0-9_]", "_", name) or "v"
    return f"v_{safe}" if safe[0].isdigit() else safe


class LoweringContext:
    """Values by ONNX name while one graph is lowered: MIL vars for computed tensors, numpy arrays
    for constants (initializers) — lowering functions read constants directly, so shapes, axes and
    weights never become run-time computations."""

    def __init__(self, mb: Any, opset: int):
        self.mb = mb
        self.opset = opset  # the ONNX model's default-domain opset
        self.values: dict[str, Any] = {}
        self.node: onnx.NodeProto | None = None
        self._names: set[str] = set()
        self.ops_of: dict[str, list[str]] = {}  # ONNX node name → the MIL ops named after it (--keep-float)

    # -- values --------------------------------------------------------------------------------
    def has(self, node: onnx.NodeProto, i: int) -> bool:
        return len(node.input) > i and node.input[i] != ""

    def value(self, name: str) -> Any:
        if name not in self.values:
            raise LoweringError(f"tensor '{name}' is used before it is computed")
        return self.values[name]

    def input(self, node: onnx.NodeProto, i: int) -> Any:
        return self.value(node.input[i])

    def is_const(self, name: str) -> bool:
        return isinstance(self.values.get(name), np.ndarray)

    def const(self, node: onnx.NodeProto, i: int) -> np.ndarray:
        value = self.input(node, i)
        if not isinstance(value, np.ndarray):
            raise LoweringError(f"input {i} ('{node.input[i]}') must be a constant")
        return value

    def const_ints(self, node: onnx.NodeProto, i: int) -> list[int]:
        return [int(v) for v in np.asarray(self.const(node, i)).reshape(-1)]

    def shape(self, value: Any) -> tuple[int, ...]:
        shape = value.shape if isinstance(value, np.ndarray) else value.shape
        if any(not isinstance(d, (int, np.integer)) for d in shape):
            raise LoweringError(f"shape {shape} is not static")
        return tuple(int(d) for d in shape)

    def var(self, value: Any) -> Any:
        """A MIL var for a value (a constant becomes a const op)."""
        return self.mb.const(val=value) if isinstance(value, np.ndarray) else value

    # -- naming ----------------------------------------------------------------------------------
    def name_if(self, condition: bool, suffix: str = "") -> dict[str, str]:
        """``name=`` keyword arguments for a MIL op that is the node's result only when ``condition``
        holds (the MIL builder names other ops itself; it rejects ``name=None``)."""
        return {"name": self.name(suffix)} if condition else {}

    def name(self, suffix: str = "") -> str:
        """A unique MIL op name derived from the current ONNX node's name."""
        assert self.node is not None
        base = identifier((self.node.name or self.node.output[0] or self.node.op_type) + suffix)
        name, k = base, 1
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        self.ops_of.setdefault(self.node.name, []).append(name)
        return name


def normalize_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise LoweringError(f"axis {axis} is out of range for rank {rank}")
    return axis % rank
