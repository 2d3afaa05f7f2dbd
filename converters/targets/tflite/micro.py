"""TFLite Micro: the tflite target's checks and C++ files for a microcontroller profile
(``runtime = "tflite-micro"``).

After the full-integer .tflite is written, ``build``:

1. checks every operator against TFLite Micro's kernels — ``RESOLVER_METHODS``, the ``Add…`` methods of
   its ``MicroMutableOpResolver`` (tensorflow/lite/micro/micro_mutable_op_resolver.h at 90b983c,
   2026-08-20; the pinned ``tflite-micro`` wheel is a build of 8f6596d, 2026-10-23, and step 2 runs that),
   less ``FLOAT_ONLY``, the kernels with no int8 path — and that no operator computes in float: what fails
   is refused naming its ONNX node;
2. runs the model in TFLite Micro's own interpreter (the ``tflite-micro`` wheel, in a child process:
   ``micro_probe.py``) on the validation samples, for the arena it allocates (its RecordingMicroAllocator's
   total) and its outputs; a model the interpreter refuses is refused naming the operator it names;
3. compares those outputs with LiteRT's on the same int8 inputs: TFLite Micro's reference kernels round
   some requantizations (per-channel FULLY_CONNECTED) a quantum apart from LiteRT's, so "within one
   quantum" is the bar, and the report says whether they were identical;
4. writes ``micro/``: ``model_data.h`` / ``model_data.cc`` (the model as an aligned const array, its
   length and the arena size), ``op_resolver.h`` (a ``MicroMutableOpResolver<N>`` registering exactly
   the model's operators) and ``model_selftest.h`` / ``model_selftest.cc`` (golden int8 inputs and
   TFLite Micro's outputs for them, checked within one quantum on the board).

The arena figure is measured on this host (64-bit pointers); a board's build differs a little, and
kernels optimised for it (CMSIS-NN, ESP-NN) ask for scratch buffers the reference kernels do not, so
the declared arena is the measurement plus ``ARENA_MARGIN``. Flash is the model's bytes plus the
profile's ``tflite_micro.code_bytes`` — an estimate of TFLite Micro's own code, stated as one.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.converters.passes import ConversionError
from edgeopt.errors import MissingDependency, UnsupportedOpsError

from .flatbuffer import builtin_op_names, schema
from .micro_cc import write_sources

TFLM_COMMIT = "90b983c"
# MicroMutableOpResolver's methods at TFLM_COMMIT (AddCustom, the signal-library ops and AddBuiltin left out)
RESOLVER_METHODS = (
    "AddAbs", "AddAdd", "AddAddN", "AddArgMax", "AddArgMin", "AddAssignVariable", "AddAveragePool2D",
    "AddBatchMatMul", "AddBatchToSpaceNd", "AddBroadcastArgs", "AddBroadcastTo", "AddCallOnce", "AddCast",
    "AddCeil", "AddConcatenation", "AddConv2D", "AddCos", "AddCumSum", "AddDepthToSpace", "AddDepthwiseConv2D",
    "AddDequantize", "AddDiv", "AddDynamicUpdateSlice", "AddEmbeddingLookup", "AddElu", "AddEqual", "AddExp",
    "AddExpandDims", "AddFill", "AddFloor", "AddFloorDiv", "AddFloorMod", "AddFullyConnected", "AddGather",
    "AddGatherNd", "AddGreater", "AddGreaterEqual", "AddHardSwish", "AddIf", "AddL2Normalization", "AddL2Pool2D",
    "AddLeakyRelu", "AddLess", "AddLessEqual", "AddLog", "AddLogicalAnd", "AddLogicalNot", "AddLogicalOr",
    "AddLogistic", "AddLogSoftmax", "AddMaximum", "AddMaxPool2D", "AddMirrorPad", "AddMean", "AddMinimum",
    "AddMul", "AddNeg", "AddNotEqual", "AddPack", "AddPad", "AddPadV2", "AddPrelu", "AddQuantize",
    "AddReadVariable", "AddReduceAll", "AddReduceMax", "AddReduceMin", "AddRelu", "AddRelu6", "AddReshape",
    "AddResizeBilinear", "AddResizeNearestNeighbor", "AddReverseV2", "AddRound", "AddRsqrt", "AddSelectV2",
    "AddShape", "AddSin", "AddSlice", "AddSoftmax", "AddSpaceToBatchNd", "AddSpaceToDepth", "AddSplit",
    "AddSplitV", "AddSqueeze", "AddSqrt", "AddSquare", "AddSquaredDifference", "AddStridedSlice", "AddSub",
    "AddSum", "AddSvdf", "AddTanh", "AddTransposeConv", "AddTranspose", "AddUnpack",
    "AddUnidirectionalSequenceLSTM", "AddVarHandle", "AddWhile", "AddZerosLike",
)
# builtins whose TFLite Micro kernel computes float32 only (exp.cc; elementwise.cc's EvalNumeric)
FLOAT_ONLY = frozenset({"EXP", "LOG", "SQRT", "SIN", "COS", "SQUARE"})
ARENA_MARGIN = (0.10, 1024)  # declared arena = measured × 1.10 + 1 KiB, rounded up to 16 bytes
PARITY_SAMPLES = 256         # validation samples run in both interpreters
SELFTEST_SAMPLES = 3         # golden vectors in model_selftest.cc
PROBE_ARENA = 64 * 2**20     # the arena the probe offers; it reports what it used
FILES = ("micro/model_data.h", "micro/model_data.cc", "micro/op_resolver.h", "micro/model_selftest.h",
         "micro/model_selftest.cc")


def _key(name: str) -> str:
    return name.replace("_", "").lower()


METHOD_OF = {_key(m[3:]): m for m in RESOLVER_METHODS}


def method_for(builtin: str) -> str | None:
    """The resolver method registering ``builtin`` (CONV_2D → AddConv2D), or None: no such kernel."""
    return METHOD_OF.get(_key(builtin))


def require_tflite_micro() -> None:
    try:
        import tflite_micro  # noqa: F401
    except ImportError as exc:
        raise MissingDependency("tflite_micro", "micro", "a TFLite Micro profile") from exc


@dataclass(frozen=True)
class MicroBuild:
    arena_bytes: int            # declared: measured + margin
    arena_measured_bytes: int   # what TFLite Micro allocated on this host
    details: dict[str, Any]     # for the report's pass_details["tflite-micro"]
    problems: tuple[str, ...]   # failed checks (the artifact is kept, the report marked failed)


def check_kernels(path: Path, origins: dict[str, list[tuple[str, str]]]) -> list[str]:
    """The model's distinct builtins; raises naming each operator TFLite Micro cannot run, with its
    ONNX node (``origins``: builtin → (ONNX op, node) it was lowered from)."""
    s = schema()
    model = s.Model.GetRootAs(path.read_bytes(), 0)
    float_types = {s.TensorType.FLOAT32, s.TensorType.FLOAT16, s.TensorType.FLOAT64}
    ops = builtin_op_names(path)  # every subgraph's operators, in order
    where = [(g, i) for g in range(model.SubgraphsLength()) for i in range(model.Subgraphs(g).OperatorsLength())]
    bad: dict[str, list[str]] = {}
    for op, (g, i) in zip(ops, where, strict=True):
        sub = model.Subgraphs(g)
        why = None
        if method_for(op) is None:
            why = "no TFLite Micro kernel"
        else:
            operator = sub.Operators(i)
            tensors = [operator.Inputs(k) for k in range(operator.InputsLength())]
            tensors += [operator.Outputs(k) for k in range(operator.OutputsLength())]
            floats = [t for t in tensors if t >= 0 and sub.Tensors(t).Type() in float_types]
            if op in FLOAT_ONLY:
                why = "float32-only kernel in TFLite Micro"
            elif floats and op not in ("QUANTIZE", "DEQUANTIZE"):
                why = "computes in float: the board needs full-integer int8"
        if why is not None:
            nodes = [node for _, node in origins.get(op, [])] or [f"operator #{i} of subgraph {g}"]
            bad.setdefault(f"{op}[{why}]", [])
            bad[f"{op}[{why}]"] += [n for n in nodes if n not in bad[f"{op}[{why}]"]]
    if bad:
        raise UnsupportedOpsError("tflite-micro", bad)
    return sorted(set(ops))


def _litert(path: Path):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    return interpreter


def _int8_samples(interpreter, validation, io_transposes: dict[str, list[int]], count: int) -> list[np.ndarray]:
    """The first ``count`` validation samples as the model's int8 inputs: laid out as the model takes
    them (``io_transposes``), one batch-1 tensor each, quantized with the input's scale and zero point."""
    details = interpreter.get_input_details()
    names = list(validation.inputs)
    out = []
    for i, d in enumerate(details):
        name = d["name"] if d["name"] in validation.inputs else names[i]
        data = validation.inputs[name][:count].astype(np.float32)
        if name in io_transposes:
            data = np.transpose(data, io_transposes[name])
        scale, zero = d["quantization"]
        q = np.clip(np.round(data / scale + zero), -128, 127).astype(d["dtype"]) if scale else data.astype(d["dtype"])
        out.append(q.reshape((len(q), *d["shape"])))
    return out


def _run_litert(interpreter, inputs: list[np.ndarray]) -> list[np.ndarray]:
    outs: list[list[np.ndarray]] = [[] for _ in interpreter.get_output_details()]
    for s in range(len(inputs[0])):
        for d, x in zip(interpreter.get_input_details(), inputs, strict=True):
            interpreter.set_tensor(d["index"], x[s])
        interpreter.invoke()
        for j, d in enumerate(interpreter.get_output_details()):
            outs[j].append(interpreter.get_tensor(d["index"]).copy())
    return [np.stack(o) for o in outs]


def _probe(path: Path, inputs: list[np.ndarray], outputs: int, origins) -> tuple[list[np.ndarray], int]:
    """TFLite Micro's outputs and the arena bytes it allocated (micro_probe.py, in a child process)."""
    with tempfile.TemporaryDirectory(prefix="edgeopt-tflm-") as tmp:
        np.savez(Path(tmp) / "in.npz", **{str(i): x for i, x in enumerate(inputs)})
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("micro_probe.py")), str(path),
                               str(Path(tmp) / "in.npz"), str(Path(tmp) / "out.npz"), str(PROBE_ARENA), str(outputs)],
                              capture_output=True, text=True, timeout=600)
        log = proc.stderr
        if proc.returncode != 0:
            missing = re.findall(r"Didn't find op for builtin opcode '(\w+)'", log)
            failed = re.findall(r"Node (\w+) \(number (\d+)\) failed", log)
            if missing or failed:
                bad = {f"{op}[TFLite Micro: {'no kernel' if op in missing else 'its kernel refused the model'}]":
                       [n for _, n in origins.get(op, [])] or ["?"] for op in [*missing, *(f[0] for f in failed)]}
                raise UnsupportedOpsError("tflite-micro", bad)
            last = [line for line in log.strip().splitlines() if line.strip()][-3:]
            raise ConversionError(f"TFLite Micro could not run the converted model: {' / '.join(last) or proc.returncode}")
        used = re.findall(r"Arena allocation total (\d+) bytes", log)
        if not used:
            raise ConversionError("TFLite Micro ran the model but reported no arena size")
        data = np.load(Path(tmp) / "out.npz")
        return [data[str(j)] for j in range(outputs)], int(used[-1])


def build(path: Path, stage: Path, origins: dict[str, list[tuple[str, str]]], validation,
          io_transposes: dict[str, list[int]]) -> MicroBuild:
    """Check, measure and compare the .tflite at ``path`` for TFLite Micro; write ``stage/micro/``."""
    require_tflite_micro()
    ops = check_kernels(path, origins)
    litert = _litert(path)
    inputs = _int8_samples(litert, validation, io_transposes, PARITY_SAMPLES)
    expected = _run_litert(litert, inputs)
    got, measured = _probe(path, inputs, len(expected), origins)
    diffs = [np.abs(g.astype(np.int32) - e.astype(np.int32)) for g, e in zip(got, expected, strict=True)]
    max_quanta = int(max(int(d.max()) for d in diffs)) if diffs else 0
    differing = int(sum(int((d > 0).sum()) for d in diffs))
    values = int(sum(d.size for d in diffs))
    problems = []
    if max_quanta > 1:
        problems.append(f"TFLite Micro's outputs are up to {max_quanta} quanta from LiteRT's on "
                        f"{len(inputs[0])} validation samples (at most 1 expected)")
    margin, extra = ARENA_MARGIN
    arena = -(-int(measured * (1 + margin) + extra) // 16) * 16
    kernels = {op: method_for(op) for op in ops}
    write_sources(stage / "micro", path.read_bytes(), kernels, arena, [x[:SELFTEST_SAMPLES] for x in inputs],
                  [y[:SELFTEST_SAMPLES] for y in got])
    details = {"kernels": kernels, "resolver_methods_from": TFLM_COMMIT,
               "tflite_micro": version("tflite-micro"),
               "arena_measured_bytes": measured, "arena_bytes": arena,
               "arena_margin": f"+{margin:.0%} + {extra} B (board kernels' scratch buffers; 32-bit pointers)",
               "parity_vs_litert": {"samples": len(inputs[0]), "values": values, "values_differing": differing,
                                    "max_abs_quanta": max_quanta, "identical": differing == 0},
               "files": list(FILES), "selftest_samples": min(SELFTEST_SAMPLES, len(inputs[0]))}
    return MicroBuild(arena, measured, details, tuple(problems))
