"""ONNX graph → Core ML MIL program, built with coremltools' MIL builder.

coremltools dropped its ONNX front end (coremltools 6), so the walk over the ONNX graph is written
here; every op is emitted through ``coremltools.converters.mil.Builder``, which type-checks each op
against the opset of the deployment target. The graph must be canonical (static shapes, constants
folded): the Core ML target fixes a dynamic batch dim before it gets here.

After each node, the shapes MIL infers are compared with the shapes ONNX shape inference gave the
same tensors, so a lowering mistake is reported at the node where it happens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgeopt.converters.targets.coreml import ops_conv, ops_elementwise, ops_rnn, ops_shape  # noqa: F401 (rules)
from edgeopt.converters.targets.coreml.rules import (
    RULES,
    LoweringContext,
    LoweringError,
    attributes,
    identifier,
)
from edgeopt.onnx_io import input_specs, op_key, opset_version
from edgeopt.runtime.coreml import import_coremltools


class NodeLoweringError(Exception):
    """Lowering failed at one node. ``expected``: a limit of Core ML's op set (a ``LoweringError``),
    as opposed to an unexpected failure inside the MIL builder."""

    def __init__(self, node: onnx.NodeProto, index: int, reason: str, expected: bool):
        self.node = node
        self.node_name = node.name or f"#{index}"
        self.reason = reason
        self.expected = expected
        super().__init__(f"node '{self.node_name}' ({op_key(node)}): {reason}")


class ShapeMismatch(Exception):
    """MIL inferred another shape than ONNX for a node's output: a bug in the lowering, not a limit."""


@dataclass
class LoweredProgram:
    program: Any                 # coremltools.converters.mil.mil.Program
    input_names: dict[str, str]  # MIL name → ONNX name
    output_names: dict[str, str]
    ops_of: dict[str, list[str]]  # ONNX node name → the MIL ops named after it


def _constant(init: onnx.TensorProto) -> np.ndarray:
    arr = numpy_helper.to_array(init)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    return arr


def _onnx_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Static shapes ONNX shape inference found for intermediate and output tensors."""
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if all(d is not None and d > 0 for d in dims) or dims == []:
            shapes[vi.name] = tuple(int(d) for d in dims)  # type: ignore[arg-type]
    return shapes


def _fold(node: onnx.NodeProto, values: list[np.ndarray], model: onnx.ModelProto) -> list[np.ndarray]:
    """Evaluate a node whose inputs are all constants with ONNX's reference evaluator (the same
    folding onnxslim does; here it also covers Shape outputs, which only become constant once MIL
    has fixed every shape)."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for n, v in zip(node.input, values, strict=True) if n]
    outputs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
    graph = helper.make_graph([node], "fold", inputs, outputs)
    tiny = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    feeds = {n: v for n, v in zip(node.input, values, strict=True) if n}
    return [np.asarray(r) for r in ReferenceEvaluator(tiny).run(None, feeds)]


def lower(model: onnx.ModelProto, spec_version: int) -> LoweredProgram:
    """Build the MIL program for ``model`` (static shapes) at the opset of ``spec_version``."""
    ct = import_coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, types

    opset = ct.target(spec_version)
    cx = LoweringContext(mb, opset_version(model) or 1)
    inits = {i.name for i in model.graph.initializer}
    for init in model.graph.initializer:
        cx.values[init.name] = _constant(init)

    input_names: dict[str, str] = {}
    placeholders = {}
    for spec in input_specs(model):
        if spec.dtype != "float32":
            raise LoweringError(f"input '{spec.name}' is {spec.dtype}; the Core ML target takes float32 inputs")
        mil_name = _unique(identifier(spec.name), input_names)
        input_names[mil_name] = spec.name
        placeholders[mil_name] = mb.placeholder(shape=spec.concrete_shape(), dtype=types.fp32)

    onnx_shapes = _onnx_shapes(model)
    output_names: dict[str, str] = {}
    with Function(placeholders, opset_version=opset) as func:
        for mil_name, onnx_name in input_names.items():
            cx.values[onnx_name] = func.inputs[mil_name]
        for index, node in enumerate(model.graph.node):
            cx.node = node
            try:
                _lower_node(cx, node, model, onnx_shapes)
            except Exception as exc:  # MIL type inference raises ValueError / TypeError / AssertionError
                first = (str(exc).strip().splitlines() or [""])[0]
                expected = isinstance(exc, LoweringError)
                if not expected:
                    first = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
                raise NodeLoweringError(node, index, first, expected) from exc
        outputs = []
        for out in model.graph.output:
            value = cx.values.get(out.name)
            if value is None or isinstance(value, np.ndarray) or out.name in inits:
                raise LoweringError(f"output '{out.name}' does not depend on any input (a constant); "
                                    "Core ML models must compute their outputs")
            mil_name = _unique(identifier(out.name), output_names | input_names)
            output_names[mil_name] = out.name
            outputs.append(mb.identity(x=value, name=mil_name))
        func.set_outputs(outputs)
    program = Program()
    program.add_function("main", func)
    return LoweredProgram(program, input_names, output_names, cx.ops_of)


def _unique(name: str, taken: dict[str, str]) -> str:
    candidate, k = name, 1
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    return candidate


def _lower_node(cx: LoweringContext, node: onnx.NodeProto, model: onnx.ModelProto,
                onnx_shapes: dict[str, tuple[int, ...]]) -> None:
    present = [n for n in node.input if n]
    if present and all(cx.is_const(n) for n in present) and node.op_type not in ("Shape", "Size"):
        values = [cx.values[n] if n else None for n in node.input]
        for name, value in zip([o for o in node.output if o], _fold(node, values, model), strict=False):
            cx.values[name] = value
        return
    rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if rule is None:
        raise LoweringError("no Core ML lowering for this op")
    if (problem := rule.problem(node)) is not None:
        raise LoweringError(f"not supported with {problem}")
    result = rule.lower(cx, node, attributes(node))
    results = list(result) if isinstance(result, (list, tuple)) else [result]
    for name, value in zip(node.output, results, strict=False):
        if not name:
            continue
        cx.values[name] = value
        want = onnx_shapes.get(name)
        if want is not None and not isinstance(value, np.ndarray):
            got = tuple(value.shape)
            if got != want:
                raise ShapeMismatch(f"output '{name}' has shape {list(got)} in Core ML, "
                                    f"but {list(want)} in ONNX (a lowering bug; please report it)")
    missing = [o for o in node.output[len(results):] if o]
    if missing:
        raise LoweringError(f"output(s) {', '.join(missing)} are not supported")
