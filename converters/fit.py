"""Does a model fit a board? Storage for the model file, RAM for weights plus activations.

The memory figure is an estimate, computed the way static arena planners (TFLite's, TVM's) size
their buffers: walk the graph in execution order at batch 1, keep each intermediate tensor alive
from the node that produces it to its last consumer, and take the largest total; add the weights
(the model file, as the runtime holds it in memory). The runtime library itself is not counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from edgeopt.onnx_io import weightless
from edgeopt.profiles import Profile


def _tensor_elems(model: onnx.ModelProto) -> dict[str, int]:
    sizes = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if not vi.type.tensor_type.HasField("shape"):
            continue
        n = 1
        for i, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                n *= d.dim_value
            elif i == 0:
                n *= 1  # dynamic batch: estimate at batch 1
            else:
                n = -1
                break
        if n >= 0:
            sizes[vi.name] = n
    return sizes


def peak_activation_elements(model: onnx.ModelProto) -> int:
    """Largest number of activation elements alive at once, at batch 1 (weights excluded)."""
    model = onnx.shape_inference.infer_shapes(weightless(model), strict_mode=False)
    sizes = _tensor_elems(model)
    weights = {i.name for i in model.graph.initializer}
    last_use: dict[str, int] = {}
    for idx, node in enumerate(model.graph.node):
        for name in node.input:
            last_use[name] = idx
    outputs = {o.name for o in model.graph.output}
    live = {vi.name for vi in model.graph.input if vi.name not in weights}
    peak = sum(sizes.get(n, 0) for n in live)
    for idx, node in enumerate(model.graph.node):
        if node.op_type == "Constant":
            continue
        live.update(o for o in node.output if o)
        peak = max(peak, sum(sizes.get(n, 0) for n in live))
        live = {n for n in live if last_use.get(n, -1) > idx or n in outputs}
    return int(peak)


def fit_check(model_bytes: int, peak_memory_bytes: int, profile: Profile | None, arena_bytes: int | None = None,
              code_bytes: int | None = None) -> dict[str, Any]:
    """The fit on ``profile``. With ``arena_bytes`` (a microcontroller: the arena measured in TFLite
    Micro) RAM is the arena and storage is flash — the model plus the runtime's code (``code_bytes``)."""
    if profile is None:
        return {"profile": None, "model_bytes": model_bytes, "peak_memory_bytes": peak_memory_bytes,
                "ram_budget_bytes": None, "storage_budget_bytes": None, "ok": None, "problems": []}
    if arena_bytes is not None:
        return _micro_fit(model_bytes, arena_bytes, code_bytes or 0, profile)
    problems = []
    if model_bytes > profile.model_storage_budget_bytes:
        problems.append(f"model file {model_bytes} B exceeds the storage budget "
                        f"{profile.model_storage_budget_bytes} B of {profile.name}")
    if peak_memory_bytes > profile.model_ram_budget_bytes:
        problems.append(f"estimated peak memory {peak_memory_bytes} B exceeds the RAM budget "
                        f"{profile.model_ram_budget_bytes} B of {profile.name}")
    return _verdict(profile, model_bytes, peak_memory_bytes, problems)


def _verdict(profile: Profile, model_bytes: int, peak_memory_bytes: int, problems: list[str],
             **more: Any) -> dict[str, Any]:
    return {"profile": profile.name, "model_bytes": model_bytes, "peak_memory_bytes": peak_memory_bytes,
            "ram_budget_bytes": profile.model_ram_budget_bytes,
            "storage_budget_bytes": profile.model_storage_budget_bytes, "ok": not problems, "problems": problems,
            **more}


def _micro_fit(model_bytes: int, arena_bytes: int, code_bytes: int, profile: Profile) -> dict[str, Any]:
    flash = model_bytes + code_bytes
    problems = []
    if flash > profile.model_storage_budget_bytes:
        problems.append(f"flash {flash} B (model {model_bytes} B + TFLite Micro's code, estimated {code_bytes} B) "
                        f"exceeds the flash budget {profile.model_storage_budget_bytes} B of {profile.name}")
    if arena_bytes > profile.model_ram_budget_bytes:
        problems.append(f"tensor arena {arena_bytes} B (measured in TFLite Micro, with its margin) exceeds the RAM "
                        f"budget {profile.model_ram_budget_bytes} B of {profile.name}")
    return _verdict(profile, model_bytes, arena_bytes, problems, arena_bytes=arena_bytes, flash_bytes=flash,
                    code_bytes_estimate=code_bytes)


def weight_bytes(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(i.dims) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(i.data_type)).itemsize
                   for i in model.graph.initializer))
