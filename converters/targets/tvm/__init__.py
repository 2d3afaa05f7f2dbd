"""The TVM target: ONNX → TVM Relax → a compiled shared library (``model.so``) for the host or, with a
board profile, for the board's CPU (cross-linked, e.g. aarch64 for Raspberry Pi / Jetson / i.MX 8M).

Ops are checked against the converter table of TVM's own Relax ONNX front end; LSTM and GRU, which
that front end lacks, are unrolled into elementary ops first (the ``unroll-rnn`` pass).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import ClassVar

import onnx

from edgeopt.converters.passes import ConversionError, PassContext, get_pass
from edgeopt.converters.passes.unroll_rnn import DEFAULT_ACTIVATIONS, UnrollRnn, rnn_node_supported
from edgeopt.converters.targets import CompiledModel, QuantizeMode, Target
from edgeopt.converters.targets.tvm import build
from edgeopt.converters.targets.tvm.machine import build_machine, find_cross_compiler
from edgeopt.converters.targets.tvm.tuning import cost_model, tune
from edgeopt.errors import EnvironmentFault, MissingDependency, UserInputError
from edgeopt.fsutil import atomic_write_json, cache_dir
from edgeopt.params import Param

QUANTIZE_PASSES = {"int8": "quantize-int8"}
_HANDLED_BY_IMPORTER = {"If", "Constant"}  # handled inside TVM's importer, not through its converter table


@functools.cache
def relax_onnx_ops() -> frozenset[str]:
    """The ONNX op types TVM's Relax front end converts (its own converter table).

    Importing the front end takes seconds (TVM pulls in torch when it is installed), so the table is
    kept per TVM version in the user's cache directory: ``edgeopt inspect`` and the op check before
    a conversion then cost a file read."""
    import json
    from importlib import metadata

    try:
        version = metadata.version("apache-tvm")
    except metadata.PackageNotFoundError as exc:
        raise MissingDependency("apache-tvm", "tvm", "the TVM target") from exc
    cached = cache_dir() / f"tvm-{version}-relax-onnx-ops.json"
    try:
        return frozenset(json.loads(cached.read_text())) | _HANDLED_BY_IMPORTER
    except (OSError, ValueError, TypeError):
        pass
    try:
        from tvm.relax.frontend.onnx import onnx_frontend
    except ImportError as exc:
        raise MissingDependency("apache-tvm", "tvm", "the TVM target") from exc
    ops = sorted(onnx_frontend._get_convert_map())
    with contextlib.suppress(OSError, EnvironmentFault):  # unwritable: the next run imports TVM again
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cached, ops)
    return frozenset(ops) | _HANDLED_BY_IMPORTER


class TVMTarget(Target):
    name: ClassVar[str] = "tvm"
    format: ClassVar[str] = "tvm"
    runtime: ClassVar[str] = "tvm"
    model_file: ClassVar[str] = "model.so"
    quantize_modes: ClassVar[tuple[str, ...]] = ("none", *QUANTIZE_PASSES)
    toolchain: ClassVar[tuple[str, ...]] = ("apache-tvm", "apache-tvm-ffi")
    params: ClassVar[tuple[Param, ...]] = (
        Param("batch", int, 1, "batch size the TVM library is compiled for (TVM needs static shapes)",
              check=lambda v: None if v >= 1 else "must be >= 1"),
        Param("tune", int, 0, "MetaSchedule tuning trials, measured on this host (0: TVM's default schedules)",
              check=lambda v: None if v >= 0 else "must be >= 0"),
        Param("tune_cores", int, None, "threads the tuned kernels are planned and measured for (default: the "
              "profile's cores, else this host's); 1 for a single-threaded deployment",
              check=lambda v: None if v >= 1 else "must be >= 1"),
        Param("cross_compiler", str, None,
              "C compiler that links a TVM library for another CPU (default: <mtriple>-gcc from the profile)"),
    )

    def is_supported(self, node: onnx.NodeProto) -> bool:
        if node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type in DEFAULT_ACTIVATIONS:
            return rnn_node_supported(node)
        return node.op_type in relax_onnx_ops()

    def passes_for(self, quantize: str) -> list[str]:
        return [QUANTIZE_PASSES[quantize]] if quantize in QUANTIZE_PASSES else []

    def min_opset(self, quantize: str, model: onnx.ModelProto) -> int | None:
        needed = super().min_opset(quantize, model)
        if any(n.op_type in DEFAULT_ACTIVATIONS for n in model.graph.node):  # unrolled first (``_compile``)
            needed = max(needed or 0, UnrollRnn.min_opset or 0)
        return needed

    def honoured_pass_params(self, quantize: str) -> dict[str, frozenset[str]]:
        return {**super().honoured_pass_params(quantize), UnrollRnn.name: frozenset(p.name for p in UnrollRnn.params)}

    def check_quantize(self, quantize: str) -> None:
        super().check_quantize(quantize)
        if quantize == "int8" and (self.pass_params.get("quantize-int8") or {}).get("kept_precision") == "int16":
            raise UserInputError("--kept-precision int16: target 'tvm' imports the QDQ model, and TVM's ONNX "
                                 "importer takes no 16-bit QuantizeLinear; keep the nodes float, or use --target onnx")
        machine = build_machine(self.profile)
        if self.config["tune"] and not machine.is_host:
            raise UserInputError(f"--tune measures candidate kernels on this machine ({build_machine(None).arch}); "
                                 f"it cannot tune for {machine.describe()}: drop --tune for this profile")

    def unused_params(self, quantize: str) -> dict[str, str]:
        unused = {}
        if not self.config["tune"]:
            unused["tune_cores"] = "without --tune: it needs --tune N (it sets the threads tuned kernels are planned for)"
        machine = build_machine(self.profile)
        if machine.is_host:
            unused["cross_compiler"] = (f"for this machine ({machine.describe()}): it links libraries for another "
                                        f"CPU, with a --profile for that board")
        return unused

    def _compile(self, model: onnx.ModelProto, mode: QuantizeMode, ctx: PassContext, out: Path) -> CompiledModel:
        quantize = mode.name
        machine = build_machine(self.profile)
        cross = None if machine.is_host else find_cross_compiler(machine, self.config["cross_compiler"])
        float_model = model
        if any(n.op_type in DEFAULT_ACTIVATIONS for n in model.graph.node):
            float_model = get_pass("unroll-rnn")(**self.pass_params.get("unroll-rnn", {})).apply(model, ctx)
        model, recipe = self._run_passes(float_model, quantize, ctx)

        def relax_module(onnx_model: onnx.ModelProto):
            static = build.fix_batch(onnx_model, self.config["batch"])
            return build.import_relax(static, build.signature(static))

        try:
            mod = relax_module(model)
        except ConversionError as exc:
            if quantize == "none":
                raise
            ctx.notes.append(f"TVM could not import the {quantize} (QDQ) model ({exc}); the library was built "
                             f"from the FP32 model instead: it is not quantized")
            ctx.details["compile:tvm"] = {"quantized": False}
            mod = relax_module(float_model)
        else:
            if quantize != "none":
                ctx.notes.append(f"TVM imported the {quantize} (QDQ) model: the library reproduces its rounding "
                                 f"(Quantize/DequantizeLinear kernels) but computes in float32; expect int8 "
                                 f"accuracy, not int8 speed")
        ctx.details.setdefault("compile:tvm", {}).update(target=dict(machine.spec), arch=machine.arch,
                                                         cross_compiler=cross)
        database = None
        if self.config["tune"]:
            database, kernels = tune(mod, machine.tvm_target(num_cores=self._cores()), self.config["tune"],
                                     ctx.workdir / "tuning", ctx.progress)
            ctx.details["compile:tvm"].update(tuning_trials=self.config["tune"], tuning_cost_model=cost_model(),
                                              tuned_kernels=kernels["tuned"],
                                              default_schedule_kernels=kernels["default_schedule"])
        target = machine.tvm_target(num_cores=self._cores() if database is not None else None)
        build.compile_library(mod, target, out, cross_compiler=cross, database=database)
        stand_in = None
        if not machine.is_host:
            # The library is for another CPU: validation, golden vectors and latency use a build of the
            # same Relax module for this host; the report says so.
            stand_in = ctx.workdir / "host-stand-in.so"
            host = build_machine(None)
            build.compile_library(mod, host.tvm_target(), stand_in, cross_compiler=None)
            ctx.notes.append(f"the library is built for {machine.describe()} and cannot run here: parity, golden "
                             f"outputs and latency were measured on a {host.arch} build of the same TVM module")
        return CompiledModel(out, activation_bytes=self.activation_bytes(mode), host_model=stand_in, recipe=recipe)

    def _cores(self) -> int:
        import os

        if self.config["tune_cores"]:
            return self.config["tune_cores"]
        return self.profile.cores if self.profile is not None else (os.cpu_count() or 1)
