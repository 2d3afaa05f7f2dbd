"""Front-end canonicalisation every target needs.

1. freeze inputs given ``input_values`` into constants (so ``If`` on, say, a sample rate folds away);
2. fix dynamic input dims from ``input_shapes``; a dynamic batch dim (the leading one unless
   ``batch_axes`` says otherwise) may stay dynamic, any other dynamic dim left is an error naming the input;
3. drop training-only behaviour (Dropout, BatchNormalization in training mode);
4. upgrade to the opset the later passes and the target need (onnx.version_converter);
5. constant folding, dead-code elimination and simplification with onnxslim -- checked: the
   unsimplified and the simplified graph are both run on one generated sample with ONNX Runtime,
   and a simplification that changes any output's shape or values is dropped (the report says so).
   Output shapes the model declares wrongly (a real export bug: a CRNN declaring [1, seqlen] for a
   [T, 1, C] output) are corrected from that run first, as onnxslim would otherwise trust them;
6. ONNX shape inference, so every later step sees concrete shapes.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeopt.converters.passes import ConversionError, Pass, PassContext
from edgeopt.converters.passes.fusions import fold_affine_into_conv, fold_conv_affine, fuse_hardswish
from edgeopt.errors import UserInputError, closest
from edgeopt.onnx_io import input_specs, opset_version, save_model, weightless
from edgeopt.params import Param
from edgeopt.runtime.onnxruntime import quiet_onnxruntime


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """'image:1,1,8,8' → ('image', (1, 1, 8, 8))."""
    name, sep, dims = text.rpartition(":")
    try:
        if not sep or not name:
            raise ValueError
        shape = tuple(int(d) for d in dims.split(","))
        if any(d <= 0 for d in shape):
            raise ValueError
    except ValueError:
        raise UserInputError(f"--input-shape {text!r}: expected NAME:d0,d1,... with positive integers") from None
    return name, shape


def split_assignment(text: str, option: str, form: str) -> tuple[str, str]:
    """'a=b' → ('a', 'b'), both non-empty, else a one-line error: "OPTION 'TEXT': expected FORM"."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise UserInputError(f"{option} {text!r}: expected {form}")
    return name, value


def parse_input_value(text: str) -> tuple[str, str]:
    """'sample_rate=16000' → ('sample_rate', '16000')."""
    return split_assignment(text, "--input-value", "NAME=VALUE")


def _mapping(v: Any) -> dict:
    if not isinstance(v, dict):
        raise TypeError(v)
    return dict(v)


class Canonicalize(Pass):
    name: ClassVar[str] = "canonicalize"
    summary: ClassVar[str] = ("fix shapes, freeze inputs, drop training-only nodes, fold constants, fuse conv affines and "
                                "hard-swish, infer shapes")
    params: ClassVar[tuple[Param, ...]] = (
        Param("input_shapes", _mapping, None, "fixed shapes per input name, e.g. {'image': (1, 1, 8, 8)}"),
        Param("input_values", _mapping, None, "inputs to freeze into constants, e.g. {'sample_rate': '16000'}"),
        Param("batch_size", int, None, "fix a dynamic batch dim of every input to this size",
              check=lambda v: None if v >= 1 else "must be >= 1"),
        Param("keep_dynamic_batch", bool, True,
              "leave a dynamic batch dim dynamic instead of requiring --input-shape for it"),
        Param("batch_axes", _mapping, None, "the batch axis per input name (None: no batch axis); "
              "default: the leading dim"),
        Param("simplify", bool, True, "run onnxslim (constant folding, dead code, fusions), then fold "
              "per-channel Mul/Add into Convs and spelled-out hard-swish into one op; each kept only when "
              "every output's shape and values on a sample are unchanged"),
        Param("min_opset", int, None, "upgrade the model to at least this ONNX opset (set from what the later "
              "passes and the target need)", check=lambda v: None if v >= 7 else "must be >= 7"),
    )

    def _apply(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        model = onnx.ModelProto.FromString(model.SerializeToString())  # never mutate the caller's model
        details: dict[str, Any] = {"nodes_before": len(model.graph.node)}
        frozen = self._freeze_inputs(model, self.config["input_values"] or {})
        fixed = self._fix_shapes(model, self._with_batch(model, self.config["input_shapes"] or {}))
        removed = self._drop_training_nodes(model)
        self._check_dynamic(model)
        model, upgraded = upgrade_opset(model, self.config["min_opset"])
        if upgraded:
            details["opset"] = upgraded
        model, details["simplified"], details["fusions"] = self._simplify(model, ctx, self.config["simplify"])
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        details.update(nodes_after=len(model.graph.node), frozen_inputs=frozen, fixed_shapes=fixed,
                       training_nodes_removed=removed)
        ctx.details[self.name] = details
        return model

    # -- 1. freeze ---------------------------------------------------------------------------
    @staticmethod
    def _freeze_inputs(model: onnx.ModelProto, values: dict[str, Any]) -> dict[str, Any]:
        specs = {s.name: s for s in input_specs(model)}
        frozen = {}
        for name, raw in values.items():
            if name not in specs:
                raise UserInputError(f"--input-value: model has no input '{name}'{closest(name, list(specs))}; "
                                     f"inputs: {', '.join(specs)}")
            spec = specs[name]
            if spec.is_dynamic:
                raise UserInputError(f"--input-value: input '{name}' has dynamic shape {spec.describe_shape()}; "
                                     f"only inputs with a fixed shape (e.g. scalars) can be frozen")
            dtype = np.dtype(spec.dtype)
            try:
                scalar = {"f": float, "i": int, "u": int, "b": lambda s: str(s).lower() in ("1", "true")}[dtype.kind](raw)
            except (KeyError, ValueError):
                raise UserInputError(f"--input-value: {raw!r} is not a valid {dtype.name} for input '{name}'") from None
            array = np.full(tuple(int(d) for d in spec.shape), scalar, dtype=dtype)
            for i, vi in enumerate(model.graph.input):
                if vi.name == name:
                    del model.graph.input[i]
                    break
            model.graph.initializer.append(numpy_helper.from_array(array, name))
            frozen[name] = scalar
        return frozen

    # -- 2. shapes ---------------------------------------------------------------------------
    def _batch_axis(self, name: str) -> int | None:
        axes = self.config["batch_axes"] or {}
        return axes.get(name, 0)

    def _with_batch(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Explicit shapes, plus ``batch_size`` for every other input whose only dynamic dim is its batch axis."""
        batch = self.config["batch_size"]
        if batch is None:
            return shapes
        shapes = dict(shapes)
        for spec in input_specs(model):
            axis = self._batch_axis(spec.name)
            if spec.name not in shapes and axis is not None and spec.dynamic_dims() == [axis]:
                shapes[spec.name] = tuple(batch if i == axis else int(d)  # type: ignore[arg-type]
                                          for i, d in enumerate(spec.shape))
        return shapes

    @staticmethod
    def _fix_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict[str, list[int]]:
        by_name = {vi.name: vi for vi in model.graph.input}
        specs = {s.name: s for s in input_specs(model)}
        fixed = {}
        for name, shape in shapes.items():
            if name not in specs:
                raise UserInputError(f"--input-shape: model has no input '{name}'{closest(name, list(specs))}; "
                                     f"inputs: {', '.join(specs)}")
            spec = specs[name]
            if len(spec.shape) != len(shape):
                raise UserInputError(f"--input-shape: input '{name}' has rank {len(spec.shape)} "
                                     f"{spec.describe_shape()}, got {len(shape)} dims {list(shape)}")
            for i, (have, want) in enumerate(zip(spec.shape, shape, strict=True)):
                if isinstance(have, int) and have != want:
                    raise UserInputError(f"--input-shape: input '{name}' dim {i} is fixed at {have} in the "
                                         f"model, got {want}")
            dims = by_name[name].type.tensor_type.shape.dim
            for d, want in zip(dims, shape, strict=True):
                d.ClearField("dim_param")
                d.dim_value = want
            fixed[name] = list(shape)
        if fixed:
            # Stale intermediate shapes would contradict the new input shapes; inference redoes them.
            del model.graph.value_info[:]
        return fixed

    def _check_dynamic(self, model: onnx.ModelProto) -> None:
        for spec in input_specs(model):
            dyn = spec.dynamic_dims()
            axis = self._batch_axis(spec.name)
            if self.config["keep_dynamic_batch"] and axis in dyn:
                dyn.remove(axis)
            if dyn:
                example = ",".join(str(d) if isinstance(d, int) else "N" for d in spec.shape)
                raise UserInputError(
                    f"input '{spec.name}' has dynamic dim(s) {dyn} in shape {spec.describe_shape()}; "
                    f"fix them with --input-shape {spec.name}:{example}")

    # -- 5. output shapes and simplification, checked ----------------------------------------------------------------
    def _simplify(self, model: onnx.ModelProto, ctx: PassContext,
                  simplify: bool) -> tuple[onnx.ModelProto, bool, dict[str, int]]:
        """Declared output shapes checked against one run, then onnxslim's graph when it computes what
        the unsimplified graph computes (else the latter), then the fusions of fusions.py on it when
        they too compute the same. Returns (model, simplified, fusions made by kind)."""
        import onnxslim

        feeds = _probe_feeds(model, self._probe_batch(model))
        try:
            reference = _run(model, feeds, ctx.workdir / "canonical-unsimplified.onnx")
        except Exception as exc:  # noqa: BLE001 -- any ORT failure: the check cannot be made
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            ctx.notes.append(f"canonicalize: output shapes{' and simplification' if simplify else ''} not checked "
                             f"(ONNX Runtime cannot run the model: {first[:200]})")
            return (onnxslim.slim(model), True, {}) if simplify else (model, False, {})
        if corrected := _correct_declared_outputs(model, reference):
            ctx.notes.append(f"canonicalize: {corrected}")
        if not simplify:
            return model, False, {}
        simplified = onnxslim.slim(model)
        if problem := _check(simplified, reference, feeds, ctx.workdir / "canonical-simplified.onnx"):
            ctx.notes.append(f"canonicalize: simplification (onnxslim) gave {problem}; the unsimplified graph is "
                             f"kept (--no-simplify skips the attempt)")
            return model, False, {}
        fused = onnx.ModelProto.FromString(simplified.SerializeToString())
        counts = {"conv_affine": fold_conv_affine(fused), "hardswish": fuse_hardswish(fused),
                  "affine_into_conv": fold_affine_into_conv(fused)}
        counts = {k: v for k, v in counts.items() if v}
        if not counts:
            return simplified, True, {}
        if problem := _check(fused, reference, feeds, ctx.workdir / "canonical-fused.onnx"):
            ctx.notes.append(f"canonicalize: fusing {counts} gave {problem}; the graph is kept unfused")
            return simplified, True, {}
        return fused, True, counts

    def _probe_batch(self, model: onnx.ModelProto) -> int:
        """The batch size of the probe run: an input's fixed batch dim when one has it (the others'
        dynamic batch must match it: a fixed [1, 512] input with an RNN state [2, N, 128]), else 2."""
        for spec in input_specs(model):
            axis = self._batch_axis(spec.name)
            if axis is not None and axis < len(spec.shape) and isinstance(spec.shape[axis], int) and spec.shape[axis] > 0:
                return spec.shape[axis]
        return 2

    # -- 3. training-only nodes ----------------------------------------------------------------
    @staticmethod
    def _drop_training_nodes(model: onnx.ModelProto) -> int:
        graph = model.graph
        rename: dict[str, str] = {}
        keep = []
        removed = 0
        graph_outputs = {o.name for o in graph.output}
        read = graph_outputs | {name for node in graph.node for name in node.input}
        static_shapes: dict[str, list[int]] = {}
        if any(n.op_type == "Dropout" and len(n.output) > 1 and n.output[1] in read for n in graph.node):
            static_shapes = _static_shapes(model)
        for node in graph.node:
            if node.op_type == "Dropout" and node.domain in ("", "ai.onnx"):
                src = rename.get(node.input[0], node.input[0])
                if node.output[0] in graph_outputs:
                    keep.append(helper.make_node("Identity", [src], [node.output[0]], name=node.name))
                else:
                    rename[node.output[0]] = src
                if len(node.output) > 1 and node.output[1] in read:
                    keep.extend(_all_true_mask(node, src, static_shapes.get(node.input[0])))
                removed += 1
                continue
            if node.op_type == "BatchNormalization":
                for attr in node.attribute:
                    if attr.name == "training_mode" and attr.i:
                        attr.i = 0
                        del node.output[1:]
                        removed += 1
            keep.append(node)
        for node in keep:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
        del graph.node[:]
        graph.node.extend(keep)
        return removed


def _probe_feeds(model: onnx.ModelProto, batch: int = 2) -> dict[str, np.ndarray]:
    """One generated input per model input; a dynamic (batch) dim is ``batch``: 2 where the model
    allows, so that a batch dim baked into the graph by a rewrite shows up as a different output shape."""
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in input_specs(model):
        shape = tuple(d if isinstance(d, int) and d > 0 else batch for d in spec.shape)
        dt = np.dtype(spec.dtype)
        if dt.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dt)
        elif dt.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, shape).astype(dt)
        else:
            feeds[spec.name] = rng.integers(0, 8, shape).astype(dt)
    return feeds


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], path) -> dict[str, np.ndarray]:
    """The model's outputs on ``feeds`` with ONNX Runtime, no graph optimisation (so ORT's own
    rewrites cannot hide a difference)."""
    import onnxruntime as ort

    quiet_onnxruntime()
    save_model(model, path)
    so = ort.SessionOptions()
    so.log_severity_level = 4  # a failure is reported (as a note) from the exception, not ORT's log
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _check(model: onnx.ModelProto, reference: dict[str, np.ndarray], feeds: dict[str, np.ndarray], path) -> str | None:
    """What differs between ``model``'s outputs on ``feeds`` and ``reference``, or None."""
    try:
        return _difference(reference, _run(model, feeds, path))
    except Exception as exc:  # noqa: BLE001 -- the rewritten graph does not even run
        return f"a graph ONNX Runtime cannot run ({(str(exc).strip().splitlines() or ['?'])[0][:200]})"


def _correct_declared_outputs(model: onnx.ModelProto, actual: dict[str, np.ndarray]) -> str | None:
    """Replace, in place, each declared output shape that contradicts what the model computes (rank or a
    fixed dim): exactly when every input is static, else by rank with unknown dims."""
    static = all(isinstance(d, int) and d > 0 for s in input_specs(model) for d in s.shape)
    corrected = []
    for out in model.graph.output:
        tt = out.type.tensor_type
        if not tt.HasField("shape") or out.name not in actual:
            continue
        got = actual[out.name].shape
        dims = list(tt.shape.dim)
        # dim_value <= 0 is how some exporters write a dynamic dim (-1): not a claim to check
        if len(dims) == len(got) and all(d.dim_value <= 0 or d.dim_value == g for d, g in zip(dims, got, strict=True)):
            continue
        declared = [d.dim_value if d.dim_value > 0 else (d.dim_param or "?") for d in dims]
        tt.ClearField("shape")
        for i, g in enumerate(got):
            dim = tt.shape.dim.add()
            if static:
                dim.dim_value = int(g)
            else:
                dim.dim_param = f"{out.name}_dim{i}"
        corrected.append(f"output '{out.name}' is declared {declared} but the model computes {list(got)}")
    if not corrected:
        return None
    del model.graph.value_info[:]  # intermediate shapes inferred from the wrong declaration go too
    return "; ".join(corrected) + " (the declaration is corrected)"


def _difference(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> str | None:
    """What differs between two runs' outputs, or None: names, shapes, then values (floats within
    1e-3 of the output's scale, where summation order and folded constants differ; others exact)."""
    if list(reference) != list(got):
        return f"outputs {list(got)} instead of {list(reference)}"
    for name, ref in reference.items():
        out = got[name]
        if ref.shape != out.shape:
            return f"output '{name}' shaped {list(out.shape)} instead of {list(ref.shape)}"
        if ref.dtype != out.dtype:
            return f"output '{name}' of type {out.dtype} instead of {ref.dtype}"
        if ref.dtype.kind in "fc":
            finite = np.isfinite(ref)
            scale = float(np.max(np.abs(ref[finite]), initial=1.0))
            if not (np.array_equal(finite, np.isfinite(out))
                    and np.allclose(out[finite], ref[finite], rtol=0.0, atol=1e-3 * scale)):
                return f"different values for output '{name}'"
        elif not np.array_equal(ref, out):
            return f"different values for output '{name}'"
    return None


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Value name → shape, for the values whose shape inference finds fully static."""
    inferred = onnx.shape_inference.infer_shapes(weightless(model), strict_mode=False)
    shapes = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    return shapes


def _all_true_mask(dropout: onnx.NodeProto, src: str, shape: list[int] | None) -> list[onnx.NodeProto]:
    """The mask of an inference-mode Dropout, which keeps everything: all true, shaped like its input
    — a constant when that shape is static, else computed from the input's shape."""
    mask = dropout.output[1]
    if shape is not None:
        value = numpy_helper.from_array(np.ones(shape, dtype=bool), name=mask)
        return [helper.make_node("Constant", [], [mask], name=f"{dropout.name}/mask", value=value)]
    return [helper.make_node("Shape", [src], [f"{mask}__shape"], name=f"{dropout.name}/mask_shape"),
            helper.make_node("ConstantOfShape", [f"{mask}__shape"], [mask], name=f"{dropout.name}/mask",
                             value=helper.make_tensor("value", onnx.TensorProto.BOOL, [1], [True]))]


def upgrade_opset(model: onnx.ModelProto, wanted: int | None) -> tuple[onnx.ModelProto, dict[str, int] | None]:
    """``model`` at ONNX opset ``wanted`` or later (onnx.version_converter), and {"from", "to"} when it
    was upgraded; one error naming both opsets when it cannot be."""
    have = opset_version(model)
    if wanted is None or have is None or have >= wanted:
        return model, None
    from onnx import version_converter

    try:
        upgraded = version_converter.convert_version(model, wanted)
        onnx.checker.check_model(upgraded) if upgraded.ByteSize() < 2**31 else None
    except Exception as exc:  # the converter raises RuntimeError/ValidationError with the adapter's text
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConversionError(f"the model has ONNX opset {have}; this recipe needs opset {wanted}, and "
                              f"onnx.version_converter cannot upgrade it: {first}") from exc
    return upgraded, {"from": have, "to": wanted}
