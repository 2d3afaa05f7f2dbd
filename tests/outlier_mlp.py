"""The model issue 17 names for mixed precision: the digits MLP (examples/digits.py) with one hidden
unit's incoming weights and bias scaled x1000 and its outgoing weights /1000 -- the same float
function (ReLU is positively homogeneous), a ruined activation range for per-tensor INT8. Used by
tests/test_mixed_precision.py and benchmarks/mixed_precision.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

RUINED = ("/1/Gemm", "/3/Gemm")  # the layers either side of the ruined activation


def make_outlier_mlp(mlp: Path, validation: Path, dest: Path, scale: float = 1000.0) -> Path:
    """Write the outlier MLP made from the trained digits MLP ``mlp`` to ``dest``; the unit scaled is
    the one most active on the validation digits."""
    model = onnx.load(str(mlp))
    weights = {i.name: numpy_helper.to_array(i).copy() for i in model.graph.initializer}
    if [n.name for n in model.graph.node if n.op_type == "Gemm"] != ["/1/Gemm", "/3/Gemm", "/5/Gemm"]:
        raise ValueError(f"{mlp}: not the digits MLP of examples/digits.py")
    images = np.load(validation)["image"]
    hidden = np.maximum(images.reshape(len(images), -1) @ weights["1.weight"].T + weights["1.bias"], 0)
    unit = int(np.argmax(hidden.mean(0)))
    weights["1.weight"][unit] *= scale
    weights["1.bias"][unit] *= scale
    weights["3.weight"][:, unit] /= scale
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    onnx.save(model, str(dest))
    return dest
