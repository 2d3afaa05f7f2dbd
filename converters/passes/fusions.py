"""Graph rewrites that make a model cheaper on every runtime without changing what it computes:

- **Conv → Mul(const) → Add(const)** folded into the Conv's weights and bias. Paddle exports of
  PP-LCNetV3 / PP-OCRv4 ("learnable affine blocks") carry one per conv: 28 Mul + 28 Add in the
  PP-OCRv4 detector, each a full pass over a feature map, and in INT8 a requantizing QLinearMul /
  QLinearAdd each.
- **x · clip(x + 3, 0, 6) / 6** (hard-swish spelled out by exporters that predate the op) into one
  HardSwish (opset ≥ 14) or x · HardSigmoid(x) (older opsets): four elementwise passes become one or
  two, and an INT8 graph loses three requantizations per activation.

Why by hand: onnxslim folds constants and fuses GELU/LayerNorm-style patterns but neither of these;
ONNX Runtime's Conv+Mul/Add fusions run only inside its own session (not for TFLite, Core ML or TVM,
and not before quantization, where the extra ops cost the most). Canonicalize runs these after
onnxslim and keeps the result only when outputs match the unrewritten graph on a probe input.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper


class _Graph:
    """Lookups over a graph: constant values, producers and consumers of each tensor."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.consts = {n.output[0]: n for n in self.graph.node if n.op_type == "Constant" and n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.outputs = {o.name for o in self.graph.output}
        self.names: set[str] = {*self.inits, *(o for n in self.graph.node for o in n.output),
                                *(i.name for i in self.graph.input)}

    def value(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.consts.get(name)
        if node is not None:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name == "value_float":
                    return np.array(a.f, np.float32)
        return None

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def add_init(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name


def _other_input(node: onnx.NodeProto, name: str) -> str | None:
    if len(node.input) != 2 or list(node.input).count(name) != 1:
        return None
    return node.input[1] if node.input[0] == name else node.input[0]


def _per_channel(value: np.ndarray | None, channels: int, rank: int) -> np.ndarray | None:
    """``value`` as a [C] vector when it broadcasts over a conv output [N, C, *spatial] per channel only."""
    if value is None or value.dtype != np.float32 or value.ndim > rank:
        return None
    if value.size == 1:
        return np.full(channels, value.reshape(()), np.float32)
    shape = (1,) * (rank - value.ndim) + value.shape
    if shape[0] != 1 or shape[1] != channels or any(d != 1 for d in shape[2:]):
        return None
    return value.reshape(channels)


def fold_conv_affine(model: onnx.ModelProto) -> int:
    """Fold Mul/Add by per-channel constants that directly follow a Conv into it; returns how many
    Mul/Add nodes were removed. Mutates ``model``."""
    g = _Graph(model)
    removed: set[int] = set()
    rename: dict[str, str] = {}
    for conv in g.graph.node:
        if conv.op_type != "Conv" or len(conv.input) < 2 or id(conv) in removed:
            continue
        weight = g.value(conv.input[1])
        if weight is None or weight.dtype != np.float32 or conv.input[1] not in g.inits:
            continue
        bias = g.value(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(weight.shape[0], np.float32)
        if bias is None:
            continue
        channels, rank = weight.shape[0], weight.ndim
        out, folded = conv.output[0], 0
        while (nxt := g.only_consumer(out)) is not None and nxt.op_type in ("Mul", "Add"):
            other = _other_input(nxt, out)
            vec = _per_channel(g.value(other), channels, rank) if other else None
            if vec is None:
                break
            if nxt.op_type == "Mul":
                weight = weight * vec.reshape((channels,) + (1,) * (rank - 1))
                bias = bias * vec
            else:
                bias = bias + vec
            removed.add(id(nxt))
            out, folded = nxt.output[0], folded + 1
        if not folded:
            continue
        base = conv.name or conv.output[0]
        conv.input[1] = g.add_init(f"{base}_folded_W", weight.astype(np.float32))
        b = g.add_init(f"{base}_folded_B", bias.astype(np.float32))
        if len(conv.input) > 2:
            conv.input[2] = b
        else:
            conv.input.append(b)
        rename[out] = conv.output[0]
    if not removed:
        return 0
    _drop_and_rewire(model, removed, rename)
    return len(removed)


def fold_affine_into_conv(model: onnx.ModelProto) -> int:
    """Fold x·s + b (per-channel constants) into the Convs that consume it, when every consumer is a
    Conv taking it as its data input; with padding only the scale folds (a padded border of b would
    not be zero). Returns how many Mul/Add nodes were removed. Mutates ``model``."""
    g = _Graph(model)
    producer = g.producer
    removed: set[int] = set()
    for last in list(g.graph.node):
        if last.op_type not in ("Mul", "Add") or id(last) in removed or last.output[0] in g.outputs:
            continue
        chain = [last]
        src = _variable_input(g, last)
        if src is None:
            continue
        if last.op_type == "Add" and (mul := producer.get(src)) is not None and mul.op_type == "Mul" \
                and g.only_consumer(src) is last and (mul_src := _variable_input(g, mul)) is not None:
            chain, src = [mul, last], mul_src
        convs = g.consumers.get(last.output[0], [])
        if not convs or not all(_plain_conv(g, c, last.output[0]) for c in convs):
            continue
        if any(n.op_type == "Add" for n in chain) and not all(_unpadded(c) for c in convs):
            continue
        folded = []
        for conv in convs:
            weight = g.value(conv.input[1])
            groups = next((a.i for a in conv.attribute if a.name == "group"), 1)
            cin = weight.shape[1] * groups
            scale, shift = np.ones(cin, np.float32), np.zeros(cin, np.float32)
            ok = True
            for node in chain:
                vec = _per_channel(g.value(_const_input(g, node)), cin, weight.ndim)
                if vec is None:
                    ok = False
                    break
                if node.op_type == "Mul":
                    scale, shift = scale * vec, shift * vec
                else:
                    shift = shift + vec
            if not ok:
                break
            folded.append((conv, weight, groups, scale, shift))
        if len(folded) != len(convs):
            continue
        for conv, weight, groups, scale, shift in folded:
            cout, cin_g = weight.shape[0], weight.shape[1]
            # input channel of W[o, j]: (o // (cout / groups)) * cin_g + j
            chan = (np.arange(cout)[:, None] // (cout // groups)) * cin_g + np.arange(cin_g)[None, :]
            spatial = (1,) * (weight.ndim - 2)
            new_w = weight * scale[chan].reshape(cout, cin_g, *spatial)
            bias = g.value(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(cout, np.float32)
            new_b = bias + (weight * shift[chan].reshape(cout, cin_g, *spatial)).reshape(cout, -1).sum(axis=1)
            base = conv.name or conv.output[0]
            conv.input[0] = src
            conv.input[1] = g.add_init(f"{base}_folded_W", new_w.astype(np.float32))
            b = g.add_init(f"{base}_folded_B", new_b.astype(np.float32))
            if len(conv.input) > 2:
                conv.input[2] = b
            else:
                conv.input.append(b)
        removed.update(id(n) for n in chain)
        for n in chain:  # later candidates see the rewired graph
            for i in n.input:
                if n in g.consumers.get(i, []):
                    g.consumers[i].remove(n)
        g.consumers[src].extend(c for c, *_ in folded)
    if not removed:
        return 0
    _drop_and_rewire(model, removed, {})
    return len(removed)


def _const_input(g: _Graph, node: onnx.NodeProto) -> str:
    return next((i for i in node.input if g.value(i) is not None), "")


def _variable_input(g: _Graph, node: onnx.NodeProto) -> str | None:
    """The one non-constant input of a binary node whose other input is a constant."""
    if len(node.input) != 2:
        return None
    consts = [g.value(i) is not None for i in node.input]
    if consts.count(True) != 1:
        return None
    return node.input[consts.index(False)]


def _plain_conv(g: _Graph, conv: onnx.NodeProto, name: str) -> bool:
    if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[0] != name or name in conv.input[1:]:
        return False
    w = g.value(conv.input[1])
    return w is not None and w.dtype == np.float32 and conv.input[1] in g.inits and (
        len(conv.input) < 3 or not conv.input[2] or g.value(conv.input[2]) is not None)


def _unpadded(conv: onnx.NodeProto) -> bool:
    attrs = {a.name: a for a in conv.attribute}
    auto = attrs["auto_pad"].s.decode() if "auto_pad" in attrs else "NOTSET"
    if auto not in ("NOTSET", "VALID"):
        return False
    return all(p == 0 for p in attrs["pads"].ints) if "pads" in attrs else True


def _drop_and_rewire(model: onnx.ModelProto, removed: set[int], rename: dict[str, str]) -> None:
    """Remove nodes by id; the tensor names in ``rename`` (a removed chain's last output) are given to
    the node that now produces them, so consumers and graph outputs keep their names."""
    keep = [n for n in model.graph.node if id(n) not in removed]
    producer_of = {o: n for n in keep for o in n.output}
    for final, current in rename.items():
        node = producer_of[current]
        node.output[list(node.output).index(current)] = final
    del model.graph.node[:]
    model.graph.node.extend(keep)
    _drop_unused_initializers(model)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _scalar(g: _Graph, name: str) -> float | None:
    v = g.value(name) if name else None
    return float(v.reshape(())) if v is not None and v.size == 1 else None


def _clip_bounds(g: _Graph, clip: onnx.NodeProto) -> tuple[float | None, float | None]:
    attrs = {a.name: a.f for a in clip.attribute}
    if "min" in attrs or "max" in attrs:  # opset < 11
        return attrs.get("min"), attrs.get("max")
    lo = _scalar(g, clip.input[1]) if len(clip.input) > 1 else None
    hi = _scalar(g, clip.input[2]) if len(clip.input) > 2 else None
    return lo, hi


def _close(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


def _hardswish_of(g: _Graph, mul: onnx.NodeProto) -> tuple[str, list[onnx.NodeProto], str] | None:
    """If ``mul`` starts x·clip(x+3,0,6)/6 (either ·1/6 or /6, before or after the product), the input
    x, the nodes of the pattern and the final output."""
    if mul.op_type != "Mul" or len(mul.input) != 2:
        return None
    for x, other in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
        chain = _relu6_scaled(g, other, x)
        if chain is None:
            continue
        nodes, scaled = chain
        if scaled:  # x · (clip(x+3,0,6)/6)
            return x, [*nodes, mul], mul.output[0]
        post = g.only_consumer(mul.output[0])
        if post is not None and _is_sixth(g, post, mul.output[0]):
            return x, [*nodes, mul, post], post.output[0]
    return None


def _sixth_of(g: _Graph, node: onnx.NodeProto) -> str | None:
    """The tensor ``node`` divides by 6 (x/6 or x·(1/6)), else None."""
    if len(node.input) != 2:
        return None
    if node.op_type == "Div":
        return node.input[0] if _close(_scalar(g, node.input[1]), 6.0) else None
    if node.op_type == "Mul":
        for src, c in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            if _close(_scalar(g, c), 1 / 6) and g.value(src) is None:
                return src
    return None


def _is_sixth(g: _Graph, node: onnx.NodeProto, src: str) -> bool:
    return _sixth_of(g, node) == src


def _relu6_scaled(g: _Graph, name: str, x: str) -> tuple[list[onnx.NodeProto], bool] | None:
    """``name`` = clip(x+3, 0, 6) [optionally then /6]: (its nodes, whether the /6 is included)."""
    nodes: list[onnx.NodeProto] = []
    scaled = False
    producer = g.producer
    node = producer.get(name)
    if node is not None and (src := _sixth_of(g, node)) is not None:
        if g.only_consumer(src) is not node:
            return None
        nodes.append(node)
        scaled = True
        node = producer.get(src)
    if node is None or node.op_type != "Clip" or g.only_consumer(node.output[0]) is None:
        return None
    lo, hi = _clip_bounds(g, node)
    if not (_close(lo, 0.0) and _close(hi, 6.0)):
        return None
    nodes.append(node)
    add = producer.get(node.input[0])
    if add is None or add.op_type != "Add" or g.only_consumer(add.output[0]) is not node:
        return None
    if _other_input(add, x) is None or not _close(_scalar(g, _other_input(add, x)), 3.0):
        return None
    nodes.append(add)
    return nodes, scaled


def fuse_hardswish(model: onnx.ModelProto) -> int:
    """Replace each x·clip(x+3,0,6)/6 by HardSwish (opset ≥ 14) or x·HardSigmoid(x, 1/6, 1/2);
    returns how many. Mutates ``model``."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    g = _Graph(model)
    found: list[tuple[str, list[onnx.NodeProto], str]] = []
    taken: set[int] = set()
    for node in g.graph.node:
        m = _hardswish_of(g, node) if node.op_type == "Mul" and id(node) not in taken else None
        if m is not None and not any(id(n) in taken for n in m[1]):
            found.append(m)
            taken.update(id(n) for n in m[1])
    if not found:
        return 0
    nodes = list(model.graph.node)
    position = {id(n): i for i, n in enumerate(nodes)}
    insert: dict[int, list[onnx.NodeProto]] = {}
    for x, pattern, out in found:
        last = max(position[id(n)] for n in pattern)
        name = g.fresh(f"{pattern[0].name or out}_hardswish")
        if opset >= 14:
            new = [helper.make_node("HardSwish", [x], [out], name=name)]
        else:
            hs = g.fresh(f"{name}_hardsigmoid")
            new = [helper.make_node("HardSigmoid", [x], [hs], name=hs, alpha=1 / 6, beta=0.5),
                   helper.make_node("Mul", [x, hs], [out], name=name)]
        insert[last] = new
    out_nodes: list[onnx.NodeProto] = []
    for i, n in enumerate(nodes):
        if id(n) not in taken:
            out_nodes.append(n)
        out_nodes.extend(insert.get(i, []))
    del model.graph.node[:]
    model.graph.node.extend(out_nodes)
    _drop_unused_initializers(model)
    return len(found)
