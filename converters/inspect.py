"""Facts about an ONNX model for ``edgeopt inspect``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeopt import registry
from edgeopt.errors import EdgeoptError
from edgeopt.fsutil import tree_size
from edgeopt.onnx_io import count_params, input_specs, load_model, op_histogram, opset_version, output_specs


def inspect_model(path: Path) -> dict[str, Any]:
    model = load_model(path)
    targets = {}
    for name in registry.names(registry.TARGETS):
        try:
            unsupported = registry.load(registry.TARGETS, name)().unsupported_nodes(model)
        except EdgeoptError as exc:  # a plugin target that cannot even be imported here
            targets[name] = {"supported": False, "unsupported": {}, "error": str(exc)}
            continue
        targets[name] = {"supported": not unsupported, "unsupported": unsupported}
    return {
        "path": str(path),
        "size_bytes": tree_size(path),
        "params": count_params(model),
        "nodes": sum(op_histogram(model).values()),
        "opset": opset_version(model),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [s.to_json() for s in input_specs(model)],
        "outputs": [s.to_json() for s in output_specs(model)],
        "ops": op_histogram(model),
        "targets": targets,
    }
