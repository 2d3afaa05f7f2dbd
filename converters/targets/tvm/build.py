"""ONNX → TVM Relax → compiled shared library.

The model arrives canonicalised (shapes inferred, constants folded). TVM needs static shapes, so a
dynamic batch dim is fixed first and onnxslim runs again to fold what that makes constant (the
``Shape``/``If`` subgraphs of real exports). The I/O signature (names, shapes, dtypes) is compiled
into the library as a Relax function ``edgeopt_signature`` returning JSON, so the runtime needs
nothing beside the ``.so``; the runtime (``edgeopt.runtime.tvm``) owns that contract: the function's
name and how the JSON is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx

from edgeopt.converters.passes import ConversionError
from edgeopt.onnx_io import input_specs, output_specs
from edgeopt.runtime.tvm import SIGNATURE_FUNCTION


def fix_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """Set every dynamic input dim to ``batch`` and re-simplify so shapes become static. The front end
    has already rejected every dynamic dim that is not an input's batch axis (the leading dim, or
    axis 1 of an RNN state [layers, N, hidden])."""
    import onnxslim

    shapes = []
    for spec in input_specs(model):
        dims = [d if isinstance(d, int) and d > 0 else batch for d in spec.shape]
        shapes.append(f"{spec.name}:{','.join(map(str, dims))}")
    model = onnxslim.slim(model, input_shapes=shapes)
    return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)


def signature(model: onnx.ModelProto) -> dict[str, Any]:
    outputs = output_specs(model)
    for spec in outputs:
        if spec.is_dynamic:
            raise ConversionError(f"output '{spec.name}' has shape {spec.describe_shape()} that is not static after "
                                  f"fixing the input shapes; TVM needs static shapes")
    return {"inputs": [s.to_json() for s in input_specs(model)], "outputs": [s.to_json() for s in outputs]}


def import_relax(model: onnx.ModelProto, sig: dict[str, Any]):
    """The Relax module for ``model``, inference-only ops decomposed, with the signature function added."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    try:
        mod = from_onnx(model, shape_dict={s["name"]: s["shape"] for s in sig["inputs"]},
                        dtype_dict={s["name"]: s["dtype"] for s in sig["inputs"]})
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise ConversionError(f"TVM's ONNX importer failed: {first}") from exc
    mod = relax.transform.DecomposeOpsForInference()(mod)
    builder = relax.BlockBuilder(mod)
    with builder.function(SIGNATURE_FUNCTION, []):
        builder.emit_func_output(tvm.ir.StringImm(json.dumps(sig)))
    return builder.get()


def compile_library(mod, target, out: Path, *, cross_compiler: str | None, database=None) -> None:
    """Compile ``mod`` for ``target`` (with tuned schedules from ``database`` if given) into ``out``."""
    import tvm

    if database is not None:
        from tvm.s_tir import meta_schedule as ms

        executable = ms.relax_integration.compile_relax(database, mod, target, None)
    else:
        executable = tvm.compile(mod, target=target)
    if cross_compiler:
        from tvm.support import cc

        executable.export_library(str(out), fcompile=cc.cross_compiler(cross_compiler))
    else:
        executable.export_library(str(out))
