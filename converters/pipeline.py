"""``edgeopt convert``: load → canonicalise → check ops → compress (prune → distill) → compile (with
quantization) → validate → golden vectors → latency → fit → artifact directory, written atomically.

Everything that can be rejected (files, flags, data, unsupported ops, the output location) is
checked before the output directory is created; the directory appears complete or not at all.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeopt import __version__, bench
from edgeopt.artifact import (
    GOLDEN,
    MANIFEST,
    MANIFEST_SCHEMA,
    REPORT,
    REPORT_SCHEMA,
    file_hashes,
    save_golden,
    tool_versions,
)
from edgeopt.batching import with_axes
from edgeopt.converters.analyze import gate_analysis
from edgeopt.converters.compare import (
    LATENCY_KEYS,
    Layout,
    SourceRunner,
    compare_models,
    golden_tolerance,
    measure_latency,
    one_call,
    pair_outputs,
    unmeasured,
    validation_batch,
)
from edgeopt.converters.fit import fit_check, peak_activation_elements
from edgeopt.converters.gates import Thresholds, evaluate, hint
from edgeopt.converters.output import check_output_location, replace_problem, space_needed
from edgeopt.converters.passes import Pass, PassContext, ProgressFactory, get_pass, no_progress
from edgeopt.converters.passes.mixed_precision import Budget, report_summary
from edgeopt.converters.preprocessing import resolve_preprocessing
from edgeopt.converters.recipe import settings_of
from edgeopt.converters.settings import (
    check_mixed_precision_flags,
    check_settings,
    check_target_params,
    unread_calibration_note,
)
from edgeopt.converters.streaming import (
    check_batch_axis_names,
    input_axes,
    output_axes,
    state_pairs,
)
from edgeopt.converters.targets import CompiledModel, QuantizeMode, Target, get_target
from edgeopt.converters.validate import accuracy, classifier_shaped, parity
from edgeopt.data import Dataset, generate_inputs, load_dataset
from edgeopt.errors import CheckFailed, EdgeoptError, UserInputError
from edgeopt.fsutil import atomic_write_json, sha256_file, staged_directory, tree_size
from edgeopt.memory import release_free_memory
from edgeopt.onnx_io import (
    count_macs,
    count_params,
    input_specs,
    load_model,
    model_bytes_on_disk,
    nodes_without_schema,
    output_specs,
    save_model,
)
from edgeopt.profiles import Profile, load_profile
from edgeopt.runtime import Runtime, run_batched, runtime_for_format
from edgeopt.runtime.onnxruntime import OnnxRuntime
from edgeopt.specs import TensorSpec

# Generated validation inputs (no data given) stop at this many input elements, at least
# GENERATED_MIN_SAMPLES samples: random images say little about a model beyond its numerics, and 64 of
# a 416x416 detector's held 133 MB for the whole conversion (8 do: 16 MB). --validation-samples N sets N.
GENERATED_ELEMENTS = 2**22
GENERATED_MIN_SAMPLES = 8


@dataclass
class ConvertOptions:
    model: Path
    output: Path
    target: str | None = None
    profile: str | None = None
    quantize: str | None = None
    calibration: Path | None = None
    validation: Path | None = None
    max_accuracy_drop: float | None = None
    min_cosine: float | None = None           # parity gates that fail the conversion (exit 1) when missed
    min_top1_agreement: float | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    input_values: dict[str, str] = field(default_factory=dict)
    batch_axes: dict[str, int | None] = field(default_factory=dict)  # --batch-axis, by input or output name
    state: dict[str, str] = field(default_factory=dict)  # --state: state input → the output of its next value
    name: str | None = None
    version: str = "1"
    force: bool = False
    pass_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # by pass name
    target_params: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)  # window/hop/layout/... (see preprocessing.py)
    threads: int = 1
    golden_count: int = 8
    generated_samples: int = 64  # at most; fewer for big inputs (GENERATED_ELEMENTS)
    mixed_precision: bool = True  # --no-mixed-precision: --min-cosine only checks, never keeps nodes float
    validation_samples: int | None = None  # --validation-samples: validate on at most this many samples
    seed: int = 0  # random validation inputs, and the distillation split / shuffling
    # compression, run in this order between canonicalisation and the target
    prune_sparsity: float | None = None   # unstructured magnitude pruning (prune-unstructured)
    prune_channels: float | None = None   # structured channel pruning (prune-structured)
    prune_layers: dict[str, float] = field(default_factory=dict)  # per-layer ratio / sparsity by node name
    distill: Path | None = None           # distillation data (distill)
    epochs: int | None = None
    student: Path | None = None
    other_inputs: tuple[Path, ...] = ()  # files the caller read for this conversion (a preprocessing JSON)


@dataclass
class ConvertResult:
    output: Path
    report: dict[str, Any]
    manifest: dict[str, Any]


class ConvertCheckFailed(CheckFailed):
    """A check failed after the artifact was written; carries the result so the CLI can show it."""

    def __init__(self, result: ConvertResult):
        self.result = result
        super().__init__(f"{result.output}: {'; '.join(result.report['failures'])} "
                         f"(artifact kept, report marked failed)")


def resolve_recipe(opts: ConvertOptions) -> tuple[Profile | None, str, str]:
    """(profile, target name, quantize mode) from the flags, with the profile's defaults filling gaps."""
    profile = load_profile(opts.profile) if opts.profile else None
    target = opts.target or (profile.default_target if profile else None)
    if target is None:
        raise UserInputError("no --target given and no --profile to take a default from")
    quantize = opts.quantize or (profile.default_quantize_for(target) if profile else "none")
    if profile is not None:
        fmt = get_target(target).format
        if fmt not in profile.formats:
            raise UserInputError(f"profile '{profile.name}' runs {', '.join(profile.formats)}; "
                                 f"--target {target} produces {fmt}")
    return profile, target, quantize


def compression_passes(opts: ConvertOptions) -> list[Pass]:
    """The compression recipe the options ask for, in pipeline order: prune, then distill."""
    if opts.prune_sparsity is not None and opts.prune_channels is not None:
        raise UserInputError("--prune-sparsity (unstructured) and --prune-channels (structured) exclude each "
                             "other; give one")
    if opts.distill is None and (opts.epochs is not None or opts.student is not None):
        flag = "--epochs" if opts.epochs is not None else "--student"
        raise UserInputError(f"{flag} applies to distillation: add --distill DATA")
    if opts.student is not None and (opts.prune_sparsity is not None or opts.prune_channels is not None):
        raise UserInputError("--student replaces the pruned model as the student: give --student or a "
                             "pruning option, not both")
    if (opts.distill is not None and opts.student is None and opts.prune_sparsity is None
            and opts.prune_channels is None):
        raise UserInputError("--distill trains a smaller student: add --prune-channels R, --prune-sparsity S "
                             "or --student MODEL.onnx")
    if opts.prune_layers and opts.prune_sparsity is None and opts.prune_channels is None:
        raise UserInputError("per-layer pruning ratios need --prune-sparsity or --prune-channels")
    recipe: list[tuple[str, dict[str, Any]]] = []
    if opts.prune_sparsity is not None:
        recipe.append(("prune-unstructured", {"sparsity": opts.prune_sparsity,
                                              "layer_sparsity": opts.prune_layers or None}))
    if opts.prune_channels is not None:
        recipe.append(("prune-structured", {"ratio": opts.prune_channels, "layer_ratios": opts.prune_layers or None}))
    if opts.distill is not None:
        recipe.append(("distill", {"data": str(opts.distill), "seed": opts.seed, "epochs": opts.epochs,
                                   "student": None if opts.student is None else str(opts.student)}))
    passes = []
    for name, params in recipe:
        given = {k: v for k, v in params.items() if v is not None}
        passes.append(get_pass(name)(**{**opts.pass_params.get(name, {}), **given}))
    return passes


class _Steps:
    """Wall time and facts per pipeline step, for the report."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[dict[str, Any]]:
        row: dict[str, Any] = {"step": name}
        t0 = time.perf_counter()
        yield row
        row["seconds"] = round(time.perf_counter() - t0, 3)
        self.rows.append(row)
        release_free_memory()  # what the step freed, before the next one allocates (edgeopt.memory)


def convert(opts: ConvertOptions, progress: ProgressFactory = no_progress) -> ConvertResult:
    """Run the whole conversion; raises ``ConvertCheckFailed`` (artifact written) when a check fails."""
    started = time.perf_counter()
    steps = _Steps()
    profile, target_name, quantize = resolve_recipe(opts)
    check_target_params(target_name, opts.target_params)
    target: Target = get_target(target_name)(pass_params=_with_budget(opts, quantize), profile=profile,
                                             **opts.target_params)
    target.check_quantize(quantize)
    mode = target.mode_for(quantize)
    compression = compression_passes(opts)
    check_settings(target, quantize, opts.target_params, opts.pass_params,
                   pipeline_passes={"canonicalize", *(p.name for p in compression)})
    check_mixed_precision_flags(target, quantize, bool(Budget(opts.min_cosine, opts.max_accuracy_drop)),
                                opts.mixed_precision, opts.pass_params.get("quantize-int8") or {})
    for p in compression:
        p.preflight()
    runtime_cls = runtime_for_format(target.format)
    unavailable = runtime_cls.unavailable_reason()  # e.g. Core ML prediction off macOS
    if unavailable is not None and (flag := _explicit_gate(opts)) is not None:
        raise UserInputError(f"{flag} needs the converted model to run on this machine: {unavailable}")
    inputs = _input_files(opts)
    source_bytes = model_bytes_on_disk(opts.model)
    check_output_location(opts.output, opts.force, inputs,
                          None if source_bytes is None else space_needed(source_bytes, quantize, len(compression)))

    _check_size_limit(target, opts.model)
    with steps("load"):
        source = load_model(opts.model)
    source_specs = input_specs(source)
    check_batch_axis_names(opts.batch_axes, source_specs, output_specs(source))
    axes = dict(opts.batch_axes)
    axes.update(input_axes(source_specs, {k: v for k, v in axes.items() if k in {s.name for s in source_specs}}))
    # Ops no schema knows (custom domains, typos) are reported before canonicalisation touches the graph.
    target.check_supported(_nodes_without_schema(source))

    with tempfile.TemporaryDirectory(prefix="edgeopt-") as work:
        ctx = PassContext(workdir=Path(work), progress=progress)
        if note := unread_calibration_note(target, quantize, opts.calibration is not None, opts.validation is not None):
            ctx.notes.append(note)
        canon_params = {"batch_size": profile.default_batch if profile else None,
                        "min_opset": _min_opset(target, quantize, compression, source),
                        **target.canonicalize_settings(), **opts.pass_params.get("canonicalize", {})}
        moved = {k: v for k, v in axes.items() if v != 0 and k in {s.name for s in source_specs}}
        canon_pass = get_pass("canonicalize")(input_shapes=opts.input_shapes or None,
                                              input_values=opts.input_values or None,
                                              batch_axes=moved or None, **canon_params)
        with steps("canonicalize") as row:
            canonical = canon_pass.apply(source, ctx)
            row.update(ctx.details["canonicalize"])
        target.check_supported(canonical)
        specs = with_axes(input_specs(canonical), axes)
        outputs = output_specs(canonical)
        pairs = state_pairs(specs, outputs, opts.state)
        axes.update(output_axes(outputs, output_specs(source), specs, {k: v for k, v in axes.items()
                                                                       if k in {o.name for o in outputs}}, pairs))
        outputs = with_axes(outputs, axes)
        data_specs = [s for s in specs if s.name not in dict(pairs)]  # a state is carried, never read from data
        preprocessing = resolve_preprocessing(data_specs, opts.preprocessing)
        # Every data file is loaded and checked (values, shapes, labels against the outputs) before any work.
        state_names = [i for i, _ in pairs]
        ctx.calibration = (load_dataset(opts.calibration, data_specs, outputs=outputs, state=state_names)
                           if opts.calibration else None)
        validation, validation_source = _validation_set(opts, data_specs, outputs, ctx.calibration, state_names)
        ctx.distillation = (load_dataset(opts.distill, data_specs, outputs=outputs, state=state_names)
                            if opts.distill else None)
        ctx.validation = validation
        _check_gate_flags(opts, validation, validation_source, outputs)
        frozen = ctx.details["canonicalize"]["frozen_inputs"]
        # no arena kept between runs: 48 MB less at the peak on a 320x320 detector, the same latency
        source_runner = SourceRunner(OnnxRuntime(opts.model, threads=opts.threads, memory_arena=False), frozen,
                                      source_specs, axes)
        if pairs:  # every sample gets the state the original model carries to it (see streaming.py)
            validation = source_runner.with_state(validation, pairs)
            ctx.calibration = ctx.calibration and source_runner.with_state(ctx.calibration, pairs)
        for data in (validation, ctx.calibration, ctx.distillation):
            if data is not None:
                data.axes = {k: v for k, v in axes.items() if k in data.inputs and v != 0}

        model, measured = canonical, [(row, canonical)]
        ctx.reference = canonical
        for compress_pass in compression:
            with steps(compress_pass.name) as row:
                model = compress_pass.apply(model, ctx)
            measured.append((row, model))
        if compression:
            target.check_supported(model)
            _measure_steps(measured, validation, ctx.workdir, opts.threads, axes)
        else:
            _describe_model(row, canonical)

        with staged_directory(opts.output, opts.force, lambda dest: replace_problem(dest, inputs)) as stage:
            with steps("compile") as compile_row:
                compiled = target.compile(model, mode, ctx, stage)
                model_path = compiled.path
                compile_row["size_bytes"] = tree_size(model_path)
            layout = Layout(compiled.io_transposes, axes)
            if unavailable is None:
                converted_rt = runtime_cls(compiled.runnable, threads=opts.threads)
                model_axes = layout.model_axes(source_runner.outputs, converted_rt.outputs)
                converted_rt.set_batch_axes(model_axes)
                io_specs = (converted_rt.inputs, converted_rt.outputs)
                with steps("validate"):
                    par, acc, golden = compare_models(source_runner, converted_rt, validation, opts.golden_count,
                                                 layout, pairs)
                with steps("latency"):
                    latency, mixed_latency = measure_latency(
                        source_runner, converted_rt, validation, layout,
                        _all_int8_runtime(ctx, target, runtime_cls, model_axes, opts.threads))
                if slower := _slower_note(quantize, latency):
                    ctx.notes.append(slower)
            else:
                io_specs = target.io_specs(model_path)
                model_axes = layout.model_axes(source_runner.outputs, io_specs[1])
                io_specs = (with_axes(io_specs[0], model_axes), with_axes(io_specs[1], model_axes))
                par, acc, golden = unmeasured(source_runner, io_specs[1], validation, opts.golden_count, layout)
                latency, mixed_latency = {**dict.fromkeys(LATENCY_KEYS), "runtime": runtime_cls.name}, None
                ctx.notes.append(f"{unavailable}: the converted model was not run, so parity, accuracy and latency "
                                 f"are not measured and the golden vectors carry no tolerance")
            shape_problems = _output_shape_problems(golden[1], io_specs[1])
            save_golden(stage / GOLDEN, *golden)
            compile_row.update(params=count_params(model), macs=count_macs(model), accuracy=acc["converted"],
                               top1_agreement=par["top1_agreement"], latency_p50_ms=latency["p50_ms"])
            model_bytes = tree_size(model_path)
            peak = (model_bytes + compiled.expanded_weight_bytes
                    + peak_activation_elements(model) * compiled.activation_bytes)
            fit = fit_check(model_bytes, peak, profile, compiled.arena_bytes, compiled.code_bytes)

            recipe = [canon_pass.describe()] + [p.describe() for p in compression]
            recipe += compiled.recipe
            recipe.append({"pass": f"compile:{target.name}", "params": {"quantize": quantize, **target.config}})
            generated = validation.source == "generated"
            gates = evaluate(par, acc, Thresholds(opts.max_accuracy_drop, opts.min_cosine, opts.min_top1_agreement),
                             validation.task, generated_inputs=generated)
            failures = shape_problems + list(compiled.problems) + _failures(fit, par) + gates.failures
            missed = gates.failures or gates.warnings
            analysis = None
            if missed and quantize == "int8" and opts.calibration is not None:
                with steps("analyze"):
                    analysis = _analysis(ctx, opts, profile, target.name, len(source.graph.node), progress)
            versions = tool_versions(*target.toolchain)
            report = {
                "schema": REPORT_SCHEMA,
                "status": "failed" if failures else "warning" if gates.warnings else "ok",
                "failures": failures,
                "warnings": gates.warnings,
                "gates": gates.checks,
                "hint": hint(quantize, target.quantize_modes, bool(compression), generated) if missed else None,
                "source": {"path": str(opts.model), "sha256": sha256_file(opts.model),
                           "size_bytes": tree_size(opts.model), "params": count_params(source),
                           "macs": count_macs(canonical)},
                "artifact": {"path": str(opts.output), "format": target.format,
                             "sha256": sha256_file(model_path) if model_path.is_file() else None,
                             "size_bytes": model_bytes, "params": count_params(model), "macs": count_macs(model)},
                "recipe": recipe,
                "parity": par,
                "accuracy": acc,
                "latency": latency,
                "fit": fit,
                "validation": {"source": validation_source, "samples": len(validation), "labels": validation.task},
                "steps": steps.rows,
                "pass_details": {k: v for k, v in ctx.details.items() if k != "canonicalize"},
                "mixed_precision": report_summary(ctx.details, model_bytes, target.format, mixed_latency),
                "analysis": analysis,
                "notes": ctx.notes,
                "tool_versions": versions,
                "duration_s": round(time.perf_counter() - started, 3),
            }
            atomic_write_json(stage / REPORT, report)
            converted_pairs = dict(pair_outputs(source_runner.outputs, io_specs[1]))
            manifest = _manifest(opts, target, compiled, io_specs, profile, mode, par, recipe, versions,
                                 _preprocessing_for_model(preprocessing, data_specs, compiled.io_transposes),
                                 [(i, converted_pairs[o]) for i, o in pairs],
                                 source_sha=report["source"]["sha256"], stage=stage,
                                 golden_count=len(next(iter(golden[0].values()))))
            atomic_write_json(stage / MANIFEST, manifest)

    result = ConvertResult(Path(opts.output), report, manifest)
    if failures:
        raise ConvertCheckFailed(result)
    return result


def _all_int8_runtime(ctx: PassContext, target: Target, runtime_cls: type[Runtime], axes: dict[str, int | None],
                      threads: int) -> Runtime | None:
    """The all-INT8 model when mixed precision kept nodes float and it is in the artifact's format (its
    latency is measured beside the artifact's: what the float nodes cost); None otherwise."""
    if ctx.all_int8 is None or ctx.all_int8.suffix != Path(target.model_file).suffix:
        return None
    other = runtime_cls(ctx.all_int8, threads=threads)
    other.set_batch_axes(axes)
    return other


def _with_budget(opts: ConvertOptions, quantize: str) -> dict[str, dict[str, Any]]:
    """The pass settings the target runs with: the user's, plus ``--min-cosine`` and
    ``--max-accuracy-drop`` for the INT8 quantizer, which keeps the fewest most sensitive nodes float
    when the all-INT8 model misses them (``settings.searches``: the targets that can)."""
    budget = Budget(opts.min_cosine, opts.max_accuracy_drop)
    if quantize != "int8" or not budget or not opts.mixed_precision:
        return opts.pass_params
    return {**opts.pass_params, "quantize-int8": {**opts.pass_params.get("quantize-int8", {}), **budget.to_json()}}


def _analysis(ctx: PassContext, opts: ConvertOptions, profile: Profile | None, target: str, source_nodes: int,
              progress: ProgressFactory) -> dict[str, Any] | None:
    """The most sensitive nodes, for a report whose INT8 model missed a quality gate; a note instead
    when they cannot be ranked (the report is still written)."""
    try:
        return gate_analysis(ctx.details, model=opts.model, calibration=opts.calibration, validation=opts.validation,
                             input_shapes=opts.input_shapes, input_values=opts.input_values, profile=profile,
                             target=target, source_nodes=source_nodes, progress=progress)
    except EdgeoptError as exc:
        ctx.notes.append(f"the INT8 layers could not be ranked for this report: {str(exc).splitlines()[0]}")
        return None


def _min_opset(target: Target, quantize: str, compression: list[Pass], source: onnx.ModelProto) -> int | None:
    """The ONNX opset the whole recipe can work at: canonicalize upgrades an older model to it."""
    needs = [p.min_opset for p in compression] + [target.min_opset(quantize, source)]
    return max((n for n in needs if n), default=None)


def _slower_note(quantize: str, latency: dict[str, Any]) -> str | None:
    """A note when a quantized model runs slower than the float original did (the point of quantizing
    for speed is lost; size may still be worth it)."""
    speedup = latency.get("speedup_vs_source")
    if quantize == "none" or speedup is None or speedup >= 1.0:
        return None
    return (f"--quantize {quantize} runs slower than the float original on this host: p50 {latency['p50_ms']:.3g} ms "
            f"on {latency['runtime']} vs {latency['source_p50_ms']:.3g} ms on onnxruntime ({speedup:.2f}x); the "
            f"model is smaller, not faster — compare `edgeopt bench` on the board")


def _input_files(opts: ConvertOptions) -> list[Path]:
    """Every file this conversion reads: an output location holding one is never replaced."""
    given = [opts.model, opts.calibration, opts.validation, opts.distill, opts.student, *opts.other_inputs]
    return [Path(p) for p in given if p is not None]


def _describe_model(row: dict[str, Any], model: onnx.ModelProto) -> None:
    row.update(size_bytes=model.ByteSize(), params=count_params(model), macs=count_macs(model))


def _measure_steps(measured: list[tuple[dict[str, Any], onnx.ModelProto]], data: Dataset, workdir: Path,
                   threads: int, axes: dict[str, int | None]) -> None:
    """Size, params, MACs, accuracy, top-1 agreement with the canonical model and ONNX Runtime latency
    (batch 1, all steps measured interleaved) after each compression step, into its report row."""
    runtimes = []
    for i, (row, model) in enumerate(measured):
        _describe_model(row, model)
        path = workdir / f"step-{i}-{row['step']}.onnx"
        save_model(model, path)
        runtimes.append(OnnxRuntime(path, threads=threads, memory_arena=False))
        runtimes[-1].set_batch_axes(axes)
    outputs = [run_batched(rt, data.inputs, validation_batch(data.inputs))[rt.outputs[0].name] for rt in runtimes]
    for (row, _), out in zip(measured, outputs, strict=True):
        row["accuracy"] = accuracy(data.labels, outputs[0], out, data.task)["converted"]
        row["top1_agreement"] = parity([outputs[0]], [out], ["output"])["top1_agreement"]
    feeds = [one_call(rt.inputs, data.inputs, rt.fixed_batch or 1) for rt in runtimes]
    for (row, _), stats in zip(measured, bench.measure(runtimes, feeds, bench.REPORT_SETTINGS), strict=True):
        row["latency_p50_ms"] = round(stats.p50_ms, 4)


def _validation_set(opts: ConvertOptions, specs: list[TensorSpec], outputs: list[TensorSpec],
                    calibration: Dataset | None, state: list[str]) -> tuple[Dataset, str]:
    """The validation samples and where they come from; ``--validation-samples N`` keeps the first N
    (in order: a stateful model's stream stays one stream), or generates N."""
    n = opts.validation_samples
    if opts.validation is not None:
        data, source = load_dataset(opts.validation, specs, outputs=outputs, state=state), str(opts.validation)
    elif calibration is not None:
        data, source = calibration, f"{opts.calibration} (the calibration data: no --validation given)"
    else:
        per_sample = sum(int(np.prod([int(d) for d in s.sample_shape()])) for s in specs) or 1
        count = n or max(GENERATED_MIN_SAMPLES, min(opts.generated_samples, GENERATED_ELEMENTS // per_sample))
        return (generate_inputs(specs, count, opts.seed),
                f"{count} generated random inputs (no --validation or --calibration given)")
    if n is not None and n < len(data):
        return data.take(n), f"{source}, the first {n} of {len(data)} samples (--validation-samples)"
    return data, source


def _explicit_gate(opts: ConvertOptions) -> str | None:
    """The first quality-gate flag the user set, or None."""
    for flag, value in (("--max-accuracy-drop", opts.max_accuracy_drop), ("--min-cosine", opts.min_cosine),
                        ("--min-top1-agreement", opts.min_top1_agreement)):
        if value is not None:
            return flag
    return None


def _check_gate_flags(opts: ConvertOptions, validation: Dataset, source: str, outputs: list[TensorSpec]) -> None:
    """Refuse, before any work, a gate that could not be measured on this data or model."""
    if opts.max_accuracy_drop is not None and validation.labels is None:
        missing = ("give --validation DATA with a 'labels' array" if validation.source == "generated" else
                   f"{source} has no 'labels' array")
        raise UserInputError(f"--max-accuracy-drop needs labels in the validation data: {missing} (or gate on "
                             f"parity with --min-cosine / --min-top1-agreement)")
    if opts.min_top1_agreement is not None and not any(classifier_shaped(o.shape) for o in outputs):
        shapes = ", ".join(f"'{o.name}' {o.describe_shape()}" for o in outputs)
        raise UserInputError(f"--min-top1-agreement needs a classifier output shaped [N, C]; the model's outputs "
                             f"are {shapes} (use --min-cosine)")


def _failures(fit: dict, par: dict) -> list[str]:
    """Failed checks besides the quality gates: the fit on the board, non-finite outputs."""
    failures = list(fit["problems"])
    if par["finite"] is False:
        failures.append("the converted model produced NaN or Inf outputs")
    return failures


def _output_shape_problems(reference: dict[str, np.ndarray], outputs: list[TensorSpec]) -> list[str]:
    """Outputs whose declared shape (the compiled model's, in the manifest) contradicts what the original
    model computes for the same inputs (samples along axis 0): the rank or a fixed dim of one sample.
    Matters most where the converted model cannot run here (Core ML off macOS)."""
    problems = []
    for spec in outputs:
        got = reference.get(spec.name)
        declared = spec.sample_shape()
        if got is None:
            continue
        if len(declared) != got.ndim - 1 or any(isinstance(d, int) and d > 0 and d != g
                                                for d, g in zip(declared, got.shape[1:], strict=True)):
            per_sample = "[" + ", ".join("?" if not isinstance(d, int) else str(d) for d in declared) + "]"
            problems.append(f"output '{spec.name}': the converted model declares {per_sample} per sample, the "
                            f"original computes {list(got.shape[1:])}")
    return problems


def _nodes_without_schema(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model holding only the nodes whose op has no ONNX schema, for ``Target.check_supported``."""
    return onnx.helper.make_model(onnx.helper.make_graph(nodes_without_schema(model), "unknown_ops", [], []))


def _preprocessing_for_model(preprocessing: dict[str, Any], specs: list[TensorSpec],
                             transposes: dict[str, list[int]]) -> dict[str, Any]:
    """The manifest's preprocessing describes the windows the converted model takes: a target that
    stores a [C, T] input as [T, C] (tflite) turns channels_first into channels_last."""
    if not preprocessing.get("layout") or len(specs) != 1 or list(transposes.get(specs[0].name, [])) != [0, 2, 1]:
        return preprocessing
    flipped = "channels_last" if preprocessing["layout"] == "channels_first" else "channels_first"
    return {**preprocessing, "layout": flipped}


def _check_size_limit(target: Target, model: Path) -> None:
    """Refuse, before loading it, a model bigger than the target's format can hold."""
    limit = target.max_model_bytes
    if limit is None:
        return
    size = model_bytes_on_disk(model)
    if size is not None and size >= limit:
        raise UserInputError(f"{model}: the model and its weights take {size / 2**30:.2f} GiB; target "
                             f"'{target.name}' writes {target.format} files of at most {limit / 2**30:.0f} GiB")


def _manifest(opts: ConvertOptions, target: Target, compiled: CompiledModel,
              io_specs: tuple[list[TensorSpec], list[TensorSpec]], profile: Profile | None, mode: QuantizeMode,
              par: dict[str, Any], recipe: list, versions: dict[str, str],
              preprocessing: dict[str, Any], state: list[tuple[str, str]], *, source_sha: str, stage: Path,
              golden_count: int) -> dict[str, Any]:
    return {
        "schema": MANIFEST_SCHEMA,
        "name": opts.name or Path(opts.model).stem,
        "version": str(opts.version),
        "model": {"file": target.model_file, "format": target.format, "runtime": target.runtime,
                  "quantize": mode.name, "io_transposes": dict(compiled.io_transposes)},
        "inputs": [s.to_json() for s in io_specs[0]],
        "outputs": [s.to_json() for s in io_specs[1]],
        "state": [{"input": i, "output": o} for i, o in state],
        "preprocessing": preprocessing,
        "golden": {"file": GOLDEN, "count": golden_count, **golden_tolerance(par, mode.integer)},
        "target_profile": profile.name if profile else None,
        "latency_budget_ms": profile.latency_budget_ms if profile else None,
        "source": {"file": Path(opts.model).name, "sha256": source_sha},
        "recipe": recipe,
        "settings": settings_of(opts, target.name, mode.name),  # the recipe that reproduces it (--recipe)
        "tool_versions": versions,
        "edgeopt_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": file_hashes(stage, [target.model_file, *compiled.extra_files, GOLDEN, REPORT]),
    }


__all__ = ["ConvertOptions", "ConvertResult", "ConvertCheckFailed", "convert", "resolve_recipe"]
