"""Make a canonical ONNX model fully static for lowering: fix a dynamic batch dim, fold the shape
arithmetic that a dynamic batch kept alive, and know every value's shape."""

from __future__ import annotations

import numpy as np
import onnx

from edgeopt.converters.passes import PassContext
from edgeopt.onnx_io import input_specs


def fix_batch(model: onnx.ModelProto, ctx: PassContext | None, batch: int = 1) -> onnx.ModelProto:
    """A .tflite has static shapes: a dynamic batch dim (the leading one, or wherever the input's batch
    axis is: an RNN state [layers, N, hidden]) becomes ``batch``. The front end has already rejected
    every dynamic dim that is not a batch axis, so every dynamic dim left is one."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    fixed, example = [], ""
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        dynamic = [i for i, d in enumerate(dims) if not (d.HasField("dim_value") and d.dim_value > 0)]
        if not dynamic:
            continue
        fixed.append(vi.name)
        example = example or f"{vi.name}:" + ",".join("N" if i in dynamic else str(d.dim_value)
                                                      for i, d in enumerate(dims))
        for i in dynamic:
            dims[i].ClearField("dim_param")
            dims[i].dim_value = batch
    if fixed:
        del model.graph.value_info[:]
        for out in model.graph.output:  # shape inference fills them in again
            for d in out.type.tensor_type.shape.dim:
                if not d.HasField("dim_value"):
                    d.ClearField("dim_param")
        if ctx is not None:
            ctx.notes.append(f"tflite: the dynamic batch dim of {', '.join(repr(n) for n in fixed)} is fixed to {batch} "
                             f"(a .tflite has static shapes; for another batch size convert with --input-shape {example})")
    return model


def static_model(model: onnx.ModelProto, ctx: PassContext | None) -> onnx.ModelProto:
    """Batch fixed, constants folded, every value with a static shape in ``value_info``."""
    import onnxslim

    model = fix_batch(model, ctx)
    model = onnxslim.slim(model)
    # Shapes are recomputed from the inputs by ONNX's own inference: onnxslim's can be wrong (it gives
    # every output of an uneven Split the size of the last one), and the lowering trusts them.
    del model.graph.value_info[:]
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    missing = _values_without_static_shape(model)
    if missing:
        _fill_shapes_by_running(model, missing)
    return fuse_erf_gelu(model)


def fuse_erf_gelu(model: onnx.ModelProto) -> onnx.ModelProto:
    """x * 0.5 * (1 + erf(x / sqrt(2))) — how torch exports GELU before opset 20 — as one Gelu node,
    which lowers to TFLite's GELU builtin (fast, and full-integer quantizable, unlike an erf built
    from DIV and SIGN). onnxslim ships this pattern but leaves it disabled, so it is matched here."""
    g = model.graph
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def scalar(name: str) -> float | None:
        arr = consts.get(name)
        return float(arr.reshape(())) if arr is not None and arr.size == 1 else None

    def other(node: onnx.NodeProto, name: str) -> str:
        return node.input[1] if node.input[0] == name else node.input[0]

    def only_consumer(name: str) -> onnx.NodeProto | None:
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in {o.name for o in g.output} else None

    fused: list[tuple[list[onnx.NodeProto], onnx.NodeProto]] = []
    for erf in [n for n in g.node if n.op_type == "Erf"]:
        scale = producer.get(erf.input[0])
        if scale is None or scale.op_type not in ("Div", "Mul") or scale.input[1] not in consts:
            continue
        c = scalar(scale.input[1])
        if c is None or not np.isclose(c if scale.op_type == "Div" else 1 / c, np.sqrt(2), rtol=1e-4):
            continue
        x = scale.input[0]
        add = only_consumer(erf.output[0])
        if add is None or add.op_type != "Add" or scalar(other(add, erf.output[0])) != 1.0:
            continue
        mul = only_consumer(add.output[0])
        if mul is None or mul.op_type != "Mul":
            continue
        partner = other(mul, add.output[0])
        half = producer.get(partner)
        if partner == x:  # (x * (1 + erf)) * 0.5
            last = only_consumer(mul.output[0])
            if last is None or last.op_type != "Mul" or scalar(other(last, mul.output[0])) != 0.5:
                continue
            nodes = [scale, erf, add, mul, last]
        elif half is not None and half.op_type == "Mul" and x in half.input and scalar(other(half, x)) == 0.5 \
                and only_consumer(half.output[0]) is mul:  # (x * 0.5) * (1 + erf)
            last = mul
            nodes = [scale, erf, add, half, mul]
        else:
            continue
        if any(only_consumer(n.output[0]) is None for n in nodes[:-1] if n is not scale) or \
                only_consumer(scale.output[0]) is not erf:
            continue
        gelu = onnx.helper.make_node("Gelu", [x], [last.output[0]], name=f"{erf.name or 'erf'}_gelu")
        fused.append((nodes, gelu))
    if not fused:
        return model
    drop = {id(n) for nodes, _ in fused for n in nodes}
    replacement = {id(nodes[-1]): gelu for nodes, gelu in fused}  # Gelu takes the place of the last Mul
    kept = []
    for n in g.node:
        if id(n) in replacement:
            kept.append(replacement[id(n)])
        elif id(n) not in drop:
            kept.append(n)
    del g.node[:]
    g.node.extend(kept)
    return model


def _values_without_static_shape(model: onnx.ModelProto) -> list[str]:
    known = set()
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            known.add(vi.name)
    known |= {i.name for i in model.graph.initializer}
    return [o for n in model.graph.node for o in n.output if o and o not in known]


def _fill_shapes_by_running(model: onnx.ModelProto, names: list[str]) -> None:
    """Shape inference could not work some shapes out (e.g. an op without a shape function): run the
    model once on zeros with those values as extra outputs and record what they are."""
    import onnxruntime as ort

    probe = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {}
    for spec in input_specs(model):
        feeds[spec.name] = np.zeros(spec.concrete_shape(1), dtype=spec.dtype)
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    by_name = {vi.name: vi for vi in model.graph.value_info}
    for name in names:
        arr = np.asarray(values[name])
        vi = by_name.get(name)
        if vi is None:
            vi = model.graph.value_info.add()
            vi.name = name
        vi.type.tensor_type.elem_type = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
        shape = vi.type.tensor_type.shape
        del shape.dim[:]
        for d in arr.shape:
            shape.dim.add().dim_value = int(d)
