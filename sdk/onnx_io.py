"""Loading ONNX models with clear errors, and facts about them (inputs, ops, parameters).

Every function that reads a user's file turns parser and checker failures into a one-line
``UserInputError`` naming the file.
"""

from __future__ import annotations

import collections
import contextlib
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgeopt.errors import UserInputError
from edgeopt.specs import TensorSpec

# 2 GiB: protobuf's limit for one serialized message; bigger models keep weights as external data.
PROTOBUF_LIMIT = 2**31


def load_model(path: str | Path, check: bool = True) -> onnx.ModelProto:
    """Load and check an ONNX model file (with external data next to it, if any)."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"model file not found: {path}")
    if path.is_dir():
        raise UserInputError(f"expected an ONNX model file, got a directory: {path}")
    if path.stat().st_size == 0:
        raise UserInputError(f"{path}: file is empty, not an ONNX model")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, external-data OSError, ...
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserInputError(f"{path}: not a readable ONNX model ({first})") from exc
    # Random bytes can parse as a protobuf message that has no graph: reject those too.
    if model.ir_version <= 0 or not model.HasField("graph") or len(model.graph.node) == 0:
        raise UserInputError(f"{path}: not an ONNX model (no graph found; is the file truncated or another format?)")
    if check:
        check_model(model, path)
    return model


def model_bytes_on_disk(path: str | Path) -> int | None:
    """Bytes of a model file plus the external data it references, read without loading any
    weights (None when the file cannot be parsed: ``load_model`` then says why)."""
    path = Path(path)
    try:
        total = path.stat().st_size
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    files = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            if "length" in info:
                total += int(info["length"])
            elif "location" in info:
                files.add(info["location"])
    for name in files:
        with contextlib.suppress(OSError):
            total += (path.parent / name).stat().st_size
    return total


def check_model(model: onnx.ModelProto, path: str | Path | None = None) -> None:
    where = f"{path}: " if path else ""
    try:
        if model.ByteSize() < PROTOBUF_LIMIT:
            onnx.checker.check_model(model)
        elif path is not None:
            onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserInputError(f"{where}invalid ONNX model: {first}") from exc


def _dims(type_proto: onnx.TypeProto) -> tuple[int | str | None, ...]:
    dims: list[int | str | None] = []
    for d in type_proto.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def _spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    elem = vi.type.tensor_type.elem_type
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).name if elem else "float32"
    return TensorSpec(vi.name, _dims(vi.type), dtype)


def input_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The real inputs of a model (graph inputs that are not initializers)."""
    inits = {i.name for i in model.graph.initializer}
    return [_spec(vi) for vi in model.graph.input if vi.name not in inits]


def output_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    return [_spec(vi) for vi in model.graph.output]


def iter_nodes(graph: onnx.GraphProto):
    """Every node, including those inside subgraphs (If / Loop / Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_nodes(g)


def nodes_without_schema(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes whose op no ONNX schema knows (custom domains, misspelled ops), subgraphs included."""
    return [n for n in iter_nodes(model.graph)
            if n.domain not in ("", "ai.onnx", "ai.onnx.ml") or not onnx.defs.has(n.op_type, n.domain)]


def op_key(node: onnx.NodeProto) -> str:
    """'Conv' for the default domain, 'com.microsoft:MatMulNBits' otherwise."""
    domain = node.domain if node.domain not in ("", "ai.onnx") else ""
    return f"{domain}:{node.op_type}" if domain else node.op_type


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    return dict(collections.Counter(op_key(n) for n in iter_nodes(model.graph)).most_common())


def nodes_by_op(model: onnx.ModelProto) -> dict[str, list[str]]:
    out: dict[str, list[str]] = collections.defaultdict(list)
    for i, node in enumerate(iter_nodes(model.graph)):
        out[op_key(node)].append(node.name or f"#{i}:{node.op_type}")
    return dict(out)


def count_params(model: onnx.ModelProto) -> int:
    """Number of weight elements: initializers plus Constant node tensors."""
    total = sum(int(np.prod(init.dims)) for init in model.graph.initializer)
    for node in iter_nodes(model.graph):
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    total += int(np.prod(attr.t.dims))
    return total


def opset_version(model: onnx.ModelProto, domain: str = "") -> int | None:
    for imp in model.opset_import:
        if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
            return int(imp.version)
    return None


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save a model; weights go to an external data file only when protobuf cannot hold them."""
    path = Path(path)
    if model.ByteSize() >= PROTOBUF_LIMIT:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    else:
        onnx.save_model(model, str(path))


def toposort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` in place so every node comes after the producers of its inputs.

    Some converters (ONNX Runtime's float16 converter with ``keep_io_types``) append nodes whose
    outputs earlier nodes consume; the ONNX checker and several runtimes reject such graphs.
    Subgraph inputs captured from the outer scope count as inputs of the node that owns the subgraph.
    """
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)

    def needs(node: onnx.NodeProto) -> set[str]:
        names = set(node.input)
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for g in subgraphs:
                inner = {o for n in iter_nodes(g) for o in n.output} | {i.name for i in g.initializer} | {
                    i.name for i in g.input}
                names |= {i for n in iter_nodes(g) for i in n.input if i not in inner}
        return names

    requirements = [needs(n) for n in pending]
    produced_by_graph = {o for n in pending for o in n.output}
    ordered: list[onnx.NodeProto] = []
    while pending:
        progress = False
        rest, rest_req = [], []
        for node, req in zip(pending, requirements, strict=True):
            # names no node produces (outer-scope values of a subgraph) do not block
            if all(r in available or r not in produced_by_graph for r in req):
                ordered.append(node)
                available.update(node.output)
                progress = True
            else:
                rest.append(node)
                rest_req.append(req)
        if not progress:
            raise ValueError(f"graph '{graph.name}' has a cycle through node '{rest[0].name or rest[0].op_type}'")
        pending, requirements = rest, rest_req
    del graph.node[:]
    graph.node.extend(ordered)


SKELETON_KEEP_ELEMENTS = 1024  # tensors up to this size keep their values (shapes, axes, small constants)


def _tensor_skeleton(tensor: onnx.TensorProto) -> onnx.TensorProto:
    if int(np.prod(tensor.dims)) <= SKELETON_KEEP_ELEMENTS:
        return tensor
    return onnx.TensorProto(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type)


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without the values of its big tensors (initializers and Constant values over
    SKELETON_KEEP_ELEMENTS elements keep their name, type and dims), for shape inference.

    ``onnx.shape_inference.infer_shapes`` serialises the whole model and parses it back, so on a
    model with 54 MB of weights each call held ~200 MB more at its peak (issue 15); shapes never
    depend on a weight's values, only on small tensors such as a Reshape's target, which stay."""
    graph = model.graph
    light = onnx.GraphProto(name=graph.name, input=graph.input, output=graph.output, value_info=graph.value_info,
                            initializer=[_tensor_skeleton(t) for t in graph.initializer])
    for node in graph.node:
        copy = light.node.add()
        copy.CopyFrom(node)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in copy.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    attr.t.CopyFrom(_tensor_skeleton(attr.t))
    return onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, graph=light,
                           functions=model.functions, producer_name=model.producer_name)


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Inferred shapes of every tensor, a dynamic (batch) dim counted as 1."""
    inferred = onnx.shape_inference.infer_shapes(weightless(model), strict_mode=False)
    shapes: dict[str, tuple[int, ...]] = {
        i.name: tuple(int(d) for d in i.dims) for i in inferred.graph.initializer}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else 1
                                    for d in vi.type.tensor_type.shape.dim)
    return shapes


def count_macs(model: onnx.ModelProto) -> int | None:
    """Multiply-accumulates of one inference at batch 1: Conv, ConvTranspose, Gemm and MatMul.

    Computed from inferred shapes (a dynamic batch dim counts as 1); other ops (activations, pooling,
    elementwise) are not counted, as is usual for MAC figures. ``None`` when a shape is unknown.
    """
    per_node = node_macs(model)
    return None if per_node is None or None in per_node.values() else sum(per_node.values())  # type: ignore[arg-type]


MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def node_macs(model: onnx.ModelProto) -> dict[str, int | None] | None:
    """MACs of each Conv / ConvTranspose / Gemm / MatMul node at batch 1, by node name (None where a
    shape is unknown). Shapes come from the model without its weights' values, so this neither
    serialises the weights (upb's ``ByteSize`` alone encodes the whole model) nor stops at 2 GB."""
    shapes = static_shapes(model)
    macs: dict[str, int | None] = {}
    for i, node in enumerate(iter_nodes(model.graph)):
        if node.op_type not in MAC_OPS or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or f"#{i}"
        ins = [shapes.get(n) for n in node.input[:2]]
        out = shapes.get(node.output[0])
        if out is None or any(s is None for s in ins):
            macs[name] = None
            continue
        x, w = ins
        if node.op_type == "Conv":  # each output element sums C_in/group x kernel products
            macs[name] = int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":  # each input element scatters into C_out/group x kernel outputs
            macs[name] = int(np.prod(x)) * int(np.prod(w[1:]))
        elif node.op_type == "Gemm":
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            macs[name] = int(np.prod(out)) * int(x[0] if trans_a else x[-1])
        else:  # MatMul: every output element is a dot product over A's last dim
            macs[name] = int(np.prod(out)) * int(x[-1])
    return macs
