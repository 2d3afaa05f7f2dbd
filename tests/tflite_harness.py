"""Convert ONNX graphs with the tflite target and compare LiteRT with ONNX Runtime (test helper)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgeopt.converters.passes import PassContext, get_pass
from edgeopt.converters.targets.tflite import TFLiteTarget
from edgeopt.runtime.litert import LiteRtRuntime


@dataclass
class Converted:
    path: Path
    io_transposes: dict[str, list[int]]
    canonical: onnx.ModelProto


def convert(model: onnx.ModelProto, workdir: Path, quantize: str = "none", calibration=None,
            **target_settings) -> Converted:
    """Canonicalise (as ``edgeopt convert`` does) and compile with the tflite target."""
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = PassContext(workdir=workdir, calibration=calibration)
    canonical = get_pass("canonicalize")().apply(model, ctx)
    target = TFLiteTarget(**target_settings)
    target.check_supported(canonical)
    compiled = target.compile(canonical, quantize, ctx, workdir)
    return Converted(compiled.path, dict(compiled.io_transposes), canonical)


def ort_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def litert_outputs(conv: Converted, feeds: dict[str, np.ndarray], xnnpack: bool = True) -> dict[str, np.ndarray]:
    """Run the .tflite on ONNX-layout feeds and return ONNX-layout float outputs."""
    rt = LiteRtRuntime(conv.path, threads=1, xnnpack=xnnpack)
    perms = conv.io_transposes
    model_feeds = {k: np.transpose(v, perms[k]) if k in perms else v for k, v in feeds.items()}
    outs = rt.run_float(model_feeds)
    return {k: np.transpose(v, np.argsort(perms[k])) if k in perms else v for k, v in outs.items()}


def max_rel_error(model: onnx.ModelProto, conv: Converted, feeds: dict[str, np.ndarray],
                  xnnpack: bool = True) -> float:
    """max |ORT - LiteRT| / max(1, max |ORT|) over all outputs."""
    ref = ort_outputs(model, feeds)
    got = litert_outputs(conv, feeds, xnnpack)
    worst = 0.0
    for name, r in ref.items():
        g = got[name]
        assert g.shape == r.shape, (name, g.shape, r.shape)
        scale = max(1.0, float(np.abs(r).max()) if r.size else 1.0)
        worst = max(worst, float(np.abs(g.astype(np.float64) - r).max()) / scale if r.size else 0.0)
    return worst


# -- the ONNX operator test cases shipped with the onnx package ---------------------------------------------
@dataclass
class NodeCaseResult:
    name: str
    ops: str  # the op under test, or "A+B+..." for a function's expansion
    outcome: str  # "passed" | "rejected" (refused with a clear error) | "mismatch" | "crashed"
    detail: str = ""
    within_1e4: bool = False  # passed with max abs error <= 1e-4 x output scale (stricter than the case's own)


def claimed_node_cases() -> list:
    """Every case of ``onnx.backend.test.case.node`` whose ops are all ops the tflite target claims."""
    import warnings

    from onnx.backend.test.case.node import collect_testcases

    from edgeopt.converters.targets.tflite.lowering import RULES

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    return [c for c in cases if c.model is not None and not _training_mode(c.model) and all(
        n.op_type in RULES and n.domain in ("", "ai.onnx") for n in c.model.graph.node)]


def _training_mode(model: onnx.ModelProto) -> bool:
    """Cases of training behaviour (random dropout masks, batch statistics): a deployed model runs in
    inference mode, so the front end converts these nodes to their inference form on purpose."""
    for node in model.graph.node:
        if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            return True
        if node.op_type == "BatchNormalization" and any(a.name == "training_mode" and a.i for a in node.attribute):
            return True
    return False


def freeze_constant_inputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]):
    """Graph inputs that the target needs as constants (weights, axes, shapes, pads — constants in any
    exported model) become initializers with the case's values; the rest stay runtime inputs."""
    from onnx import numpy_helper

    from edgeopt.converters.targets.tflite.lowering import RULES

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph_inputs = {vi.name for vi in model.graph.input}
    frozen = set()
    for node in model.graph.node:
        for i in RULES[node.op_type].constant_inputs:
            if i < len(node.input) and node.input[i] in graph_inputs and node.input[i] in feeds:
                frozen.add(node.input[i])
    for name in frozen:
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(feeds[name]), name))
    kept = [vi for vi in model.graph.input if vi.name not in frozen]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return model, {k: v for k, v in feeds.items() if k not in frozen}


def run_node_case(case, workdir: Path) -> NodeCaseResult:
    from edgeopt.errors import UserInputError

    ops = sorted({n.op_type for n in case.model.graph.node} - {"Constant"}) or ["Constant"]
    label = ops[0] if len(ops) == 1 else "+".join(ops)
    inputs, expected = case.data_sets[0]
    names = [vi.name for vi in case.model.graph.input]
    feeds = dict(zip(names, inputs, strict=False))
    try:
        model, feeds = freeze_constant_inputs(case.model, feeds)
        conv = convert(model, workdir)
        got = litert_outputs(conv, feeds)
    except UserInputError as exc:
        return NodeCaseResult(case.name, label, "rejected", str(exc))
    except Exception as exc:  # a bug: the converter should have refused or succeeded
        return NodeCaseResult(case.name, label, "crashed", f"{type(exc).__name__}: {exc}".splitlines()[0])
    strict = True
    for vi, want in zip(case.model.graph.output, expected, strict=True):
        have = got.get(vi.name)
        want = np.asarray(want)
        if have is None or have.shape != want.shape:
            return NodeCaseResult(case.name, label, "mismatch",
                                  f"{vi.name}: shape {None if have is None else have.shape} != {want.shape}")
        # the case's own tolerance (what ONNX backends are held to; some expected values are given to
        # only 4 decimals), and separately this project's 1e-4 x output scale
        if not np.allclose(have, want, rtol=case.rtol, atol=case.atol):
            err = float(np.abs(have.astype(np.float64) - want).max())
            return NodeCaseResult(case.name, label, "mismatch", f"{vi.name}: max abs err {err:.3g}")
        scale = float(np.abs(want).max()) if want.size else 0.0
        strict &= bool(not want.size or np.abs(have.astype(np.float64) - want).max() <= 1e-4 * max(scale, 1e-6))
    return NodeCaseResult(case.name, label, "passed", within_1e4=strict)
