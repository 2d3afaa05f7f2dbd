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
    path = target.compile(canonical, quantize, ctx, workdir)
    return Converted(path, dict(target.io_transposes), canonical)


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
