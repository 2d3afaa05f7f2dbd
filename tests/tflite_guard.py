"""A session-wide check: every .tflite file a test wrote holds builtin operators only — a custom op
would not run on stock LiteRT or TFLite Micro. The conftest imports the fixture so the whole suite
is checked; tests/test_tflite_no_custom_ops.py proves the check fails a run that writes one."""

from __future__ import annotations

from pathlib import Path

import pytest


def custom_ops_in(root: Path) -> dict[str, list[str]]:
    """.tflite file → its custom operators, for every file under ``root`` that has any."""
    files = sorted(Path(root).rglob("*.tflite"))
    if not files:
        return {}
    from edgeopt.converters.targets.tflite.flatbuffer import builtin_op_names

    found = {}
    for path in files:
        try:
            ops = builtin_op_names(path)
        except Exception:  # not a FlatBuffer at all (a test's deliberately corrupt file): no operators
            continue
        custom = sorted({op for op in ops if op.startswith("CUSTOM")})
        if custom:
            found[str(path)] = custom
    return found


@pytest.fixture(scope="session", autouse=True)
def only_builtin_tflite_ops(tmp_path_factory):
    yield
    found = custom_ops_in(tmp_path_factory.getbasetemp())
    if found:
        listing = "; ".join(f"{path}: {', '.join(ops)}" for path, ops in found.items())
        pytest.fail(f"{len(found)} .tflite file(s) written by the tests contain custom operators: {listing}")


def write_tflite_with_custom_op(path: Path) -> Path:
    """A loadable-looking .tflite whose only operator is the custom op 'FancyOp' (for testing the check)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    model = s.ModelT()
    model.version = 3
    model.buffers = [s.BufferT()]
    tensors = []
    for name in ("x", "y"):
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name, [1, 4], s.TensorType.FLOAT32, 0
        tensors.append(t)
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.CUSTOM
    code.customCode = "FancyOp"
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0], [1]
    sub = s.SubGraphT()
    sub.tensors, sub.operators, sub.inputs, sub.outputs = tensors, [op], [0], [1]
    model.operatorCodes, model.subgraphs = [code], [sub]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    Path(path).write_bytes(bytes(builder.Output()))
    return Path(path)
