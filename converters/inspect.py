"""Facts about an ONNX model, or an artifact, for ``edgeopt inspect``.

A model is inspected as ``edgeopt convert`` will see it: canonicalised first, with the same
``--input-shape``, ``--input-value`` and ``--batch-axis`` (inputs frozen, dims fixed, control flow on
a frozen input folded, the opset and declared shapes as convert leaves them), so the per-target
support it reports is the check convert makes. Where canonicalisation stops (a dynamic dim left, an
op no schema knows), it says why — as convert would — and reports on the model as it is.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeopt import registry
from edgeopt.artifact import open_artifact
from edgeopt.batching import with_axes
from edgeopt.converters.passes import PassContext, get_pass
from edgeopt.converters.streaming import check_batch_axis_names, input_axes, output_axes, state_pairs
from edgeopt.errors import EdgeoptError, UserInputError
from edgeopt.fsutil import tree_size
from edgeopt.onnx_io import (
    count_macs,
    count_params,
    input_specs,
    iter_nodes,
    load_model,
    node_macs,
    nodes_without_schema,
    op_histogram,
    opset_version,
    output_specs,
)
from edgeopt.profiles import Profile


def inspect_path(path: Path, input_shapes: dict[str, tuple[int, ...]] | None = None,
                 input_values: dict[str, str] | None = None, batch_axes: dict[str, int | None] | None = None,
                 profile: Profile | None = None) -> dict[str, Any]:
    """``inspect_model`` for an ONNX file, ``inspect_artifact`` for an artifact directory."""
    path = Path(path)
    if path.is_dir() and (path / "manifest.json").is_file():
        if input_shapes or input_values or batch_axes:
            raise UserInputError(f"{path} is an artifact: its shapes are fixed; --input-shape, --input-value and "
                                 f"--batch-axis apply to an ONNX model")
        return inspect_artifact(path, profile)
    return inspect_model(path, input_shapes, input_values, batch_axes, profile)


def inspect_model(path: Path, input_shapes: dict[str, tuple[int, ...]] | None = None,
                  input_values: dict[str, str] | None = None, batch_axes: dict[str, int | None] | None = None,
                  profile: Profile | None = None) -> dict[str, Any]:
    source = load_model(path)
    source_inputs = input_specs(source)
    check_batch_axis_names(batch_axes or {}, source_inputs, output_specs(source))
    notes: list[str] = []
    axes = input_axes(source_inputs, {k: v for k, v in (batch_axes or {}).items()
                                       if k in {s.name for s in source_inputs}})
    model, canonical = source, False
    if not nodes_without_schema(source):
        with tempfile.TemporaryDirectory(prefix="edgeopt-inspect-") as tmp:
            ctx = PassContext(workdir=Path(tmp))
            moved = {k: v for k, v in axes.items() if v != 0}
            try:
                model = get_pass("canonicalize")(input_shapes=input_shapes or None, input_values=input_values or None,
                                                 batch_axes=moved or None).apply(source, ctx)
                canonical = True
                notes += ctx.notes
            except EdgeoptError as exc:
                notes.append(f"convert would stop here: {exc}")
    else:
        notes.append("ops no ONNX schema knows (see the targets below): not canonicalised")
    inputs = with_axes(input_specs(model), axes)
    outputs = output_specs(model)
    pairs: list[tuple[str, str]] = []
    try:
        pairs = state_pairs(inputs, outputs, {})
        outputs = with_axes(outputs, output_axes(outputs, output_specs(source), inputs,
                                                 {k: v for k, v in (batch_axes or {}).items()
                                                  if k in {o.name for o in outputs}}, pairs))
    except UserInputError as exc:
        notes.append(str(exc))
    ops = op_histogram(model)
    return {
        "path": str(path),
        "size_bytes": tree_size(path),
        "params": count_params(model),
        "macs": count_macs(model),
        "nodes": sum(ops.values()),
        "opset": opset_version(model),
        "source_opset": opset_version(source),
        "canonicalized": canonical,
        "producer": f"{source.producer_name} {source.producer_version}".strip(),
        "inputs": [s.to_json() for s in inputs],
        "outputs": [s.to_json() for s in outputs],
        "state": [{"input": i, "output": o} for i, o in pairs],
        "ops": ops,
        "layers": layers(model),
        "targets": _targets(model, profile),
        "profile": profile.name if profile else None,
        "notes": notes,
    }


def inspect_artifact(path: Path, profile: Profile | None = None) -> dict[str, Any]:
    """The artifact's manifest facts and its report's verdict; its ONNX model's ops and layers when the
    format is ONNX."""
    artifact = open_artifact(path)
    manifest = artifact.manifest
    report_path = path / "report.json"
    report: dict[str, Any] = {}
    if report_path.is_file():
        import json

        try:
            report = json.loads(report_path.read_text())
        except ValueError:
            report = {}
    info: dict[str, Any] = {
        "path": str(path),
        "artifact": {"name": manifest.get("name"), "version": manifest.get("version"),
                     "format": artifact.format, "quantize": (manifest.get("model") or {}).get("quantize"),
                     "status": report.get("status"), "target_profile": manifest.get("target_profile")},
        "size_bytes": tree_size(artifact.model_file),
        "inputs": manifest.get("inputs") or [],
        "outputs": manifest.get("outputs") or [],
        "state": manifest.get("state") or [],
        "profile": profile.name if profile else None,
        "notes": [],
    }
    if artifact.format == "onnx":
        model = load_model(artifact.model_file)
        ops = op_histogram(model)
        info.update(params=count_params(model), macs=count_macs(model), nodes=sum(ops.values()),
                    opset=opset_version(model), ops=ops, layers=layers(model))
    else:
        artifact_report = report.get("artifact") or {}
        info.update(params=artifact_report.get("params"), macs=artifact_report.get("macs"), nodes=None,
                    opset=None, ops={}, layers=[])
        info["notes"].append(f"a {artifact.format} model: ops and layers are listed for ONNX models (inspect the "
                             f"ONNX model it came from, {manifest.get('source', {}).get('file') or 'its source'})")
    return info


def layers(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """Every layer, in graph order: a node with a weight (a constant input of two or more dims) or with
    MACs counted (Conv, ConvTranspose, Gemm, MatMul). Name (what --prune-layer takes), op, elements of
    its constant inputs (weights and biases), MACs at batch 1 (None: not counted for this op, e.g. LSTM)."""
    inits = {i.name: i.dims for i in model.graph.initializer}
    macs = node_macs(model) or {}
    rows = []
    for i, node in enumerate(iter_nodes(model.graph)):
        name = node.name or f"#{i}"
        params = sum(int(np.prod(inits[x])) for x in node.input if x in inits)
        if name in macs or any(len(inits[x]) >= 2 for x in node.input if x in inits):
            rows.append({"name": name, "op": node.op_type, "params": params, "macs": macs.get(name)})
    return rows


def _targets(model: onnx.ModelProto, profile: Profile | None) -> dict[str, dict[str, Any]]:
    targets: dict[str, dict[str, Any]] = {}
    for name in registry.names(registry.TARGETS):
        try:
            target = registry.load(registry.TARGETS, name)()
            unsupported = target.unsupported_nodes(model)
        except EdgeoptError as exc:  # a plugin target that cannot even be imported here
            targets[name] = {"supported": False, "unsupported": {}, "error": str(exc)}
            continue
        targets[name] = {"supported": not unsupported, "unsupported": unsupported}
        if profile is not None and target.format not in profile.formats:
            targets[name]["board"] = f"{profile.name} does not run {target.format} models"
    return targets
