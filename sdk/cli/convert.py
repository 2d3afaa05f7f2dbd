"""``edgeopt convert``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
from click.core import ParameterSource

from edgeopt import logs, registry
from edgeopt.cli import debug_requested
from edgeopt.cli.render import print_convert_report
from edgeopt.converters.passes.canonicalize import parse_input_shape, parse_input_value
from edgeopt.converters.passes.quantize import QuantizeFp16, QuantizeInt4, QuantizeInt8Static
from edgeopt.converters.pipeline import ConvertCheckFailed, ConvertOptions, convert
from edgeopt.converters.preprocessing import load_preprocessing_file, parse_normalize
from edgeopt.converters.recipe import apply_recipe, load_recipe, recipe_key, set_value
from edgeopt.converters.streaming import parse_batch_axis, parse_state
from edgeopt.errors import UserInputError
from edgeopt.params import Param
from edgeopt.progress import make_progress

_CAL = QuantizeInt8Static.param("calibration_method")
_KEPT = QuantizeInt8Static.param("kept_precision")
_BLOCK = QuantizeInt4.param("block_size")
_KEEP_IO = QuantizeFp16.param("keep_io_types")


def _key(name: str, dest: str | None = None, **overrides):
    """The option of a top-level recipe key, generated from its declaration (``RECIPE_KEYS``): one
    help text, type, default and check for the flag, the recipe file and docs/converter.md."""
    p = recipe_key(name)
    return p.click_option(p.flag, *([dest] if dest else []), **overrides)


def parse_layer_ratio(text: str) -> tuple[str, float]:
    """'/3/Conv=0.25' → ('/3/Conv', 0.25)."""
    name, sep, value = text.rpartition("=")
    try:
        ratio = float(value)
        if not sep or not name or not 0.0 <= ratio < 1.0:
            raise ValueError
    except ValueError:
        raise UserInputError(f"--prune-layer {text!r}: expected NODE_NAME=RATIO with 0 <= RATIO < 1") from None
    return name, ratio


def _target_params() -> dict[str, list[tuple[str, object]]]:
    """Every registered target's declared parameters: param name → [(target name, Param)]."""
    found: dict[str, list[tuple[str, object]]] = {}
    for name in registry.names(registry.TARGETS):
        for param in registry.load(registry.TARGETS, name).params:
            found.setdefault(param.name, []).append((name, param))
    return found


def _default(param: Param) -> str:
    """" (default: X)" for the help, unless the parameter's help already says what its default is
    (one that depends on the profile)."""
    return "" if param.default is None or "(default:" in param.help else f" (default: {param.default})"


def target_options(func):
    """One ``--flag`` per target parameter, generated from the targets' own declarations, so a new
    target (or a plugin's) gets its options and their help without editing this command."""
    for pname, owners in sorted(_target_params().items(), reverse=True):
        param = owners[0][1]
        which = ", ".join(t for t, _ in owners)
        flag = "--" + pname.replace("_", "-")
        # targets sharing a parameter name may mean it differently: then each says its own piece
        alike = all((p.help, p.default) == (param.help, param.default) for _, p in owners)
        if param.type is bool:
            text = f"[{which}] {param.help}" if alike else " ".join(f"[{t}] {p.help}." for t, p in owners)
            opt = click.option(flag, pname, is_flag=True, default=None, help=text)
        else:
            choices = click.Choice([str(c) for c in param.choices]) if param.choices else param.type
            text = (f"[{which}] {param.help}{_default(param)}" if alike else
                    " ".join(f"[{t}] {p.help}{_default(p)}." for t, p in owners))
            opt = click.option(flag, pname, type=choices, default=None, help=text,
                               callback=_checked_by([p for _, p in owners]))
        func = opt(func)
    return func


def _checked_by(params: list[Param]):
    """A click callback running the declarations' own checks, so ``--batch 0`` is a usage error that
    names the option (every target declaring it must accept the value; they agree in practice)."""
    def callback(ctx: click.Context, option: click.Parameter, value):
        for param in params:
            if value is not None and param.check is not None and (problem := param.check(value)):
                raise click.BadParameter(f"{problem}, got {value!r}", ctx=ctx, param=option)
        return value

    return callback


def _chosen_target_params(target: str | None, given: dict[str, object]) -> dict[str, object]:
    """The target options the user set; an option of another target is an error naming both."""
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return {}
    owners = _target_params()
    if target is None:
        return given  # resolved from the profile later; the target itself rejects unknown params
    mine = {k: v for k, v in given.items() if any(t == target for t, _ in owners[k])}
    for k in given.keys() - mine.keys():
        flag = "--" + k.replace("_", "-")
        raise UserInputError(f"{flag} applies to target {', '.join(t for t, _ in owners[k])}, not {target}")
    return mine


@click.command("convert", context_settings={"max_content_width": 100})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Artifact directory to write (must not exist unless --force).")
@_key("target")
@_key("profile")
@_key("quantize")
@click.option("--calibration", type=click.Path(path_type=Path),
              help="Calibration data: .npz (an array per input name), .npy or sensor .csv.")
@_CAL.click_option("--calibration-method", default=None, show_default=False,
                   help=f"{_CAL.help}, with --quantize int8 (default: {_CAL.default}; tflite: minmax only).")
@click.option("--keep-float", metavar="NODE[,NODE]", multiple=True,
              help="With --quantize int8 (targets onnx, tvm, tflite; coreml: their weights uncompressed): leave "
                   "these nodes in float (repeatable; `edgeopt analyze` ranks the nodes by how much their "
                   "quantization costs).")
@_KEPT.click_option("--kept-precision", default=None, show_default=False,
                    help=f"With --keep-float or a budget (targets onnx, tflite): {_KEPT.help} (default: "
                         f"{_KEPT.default}).")
@click.option("--no-mixed-precision", is_flag=True,
              help="With --min-cosine or --max-accuracy-drop and --quantize int8 (targets onnx, tvm, tflite): only "
                   "check; by default the fewest most sensitive nodes are kept float to meet the budget.")
@_BLOCK.click_option("--int4-block-size", type=int, default=None, show_default=False,
                     help=f"{_BLOCK.help}, with --quantize int4 (default: {_BLOCK.default}; tflite: 32 and up).")
@click.option("--fp16-io", is_flag=True, help="With --quantize fp16 (target onnx): make inputs/outputs float16 too "
              "(default: " + _KEEP_IO.help + ").")
@click.option("--validation", type=click.Path(path_type=Path),
              help="Validation data (with optional 'labels'); default: the calibration data, else random inputs.")
@_key("validation_samples", metavar="N")
@_key("max_accuracy_drop")
@_key("min_cosine", metavar="C")
@_key("min_top1_agreement", metavar="A")
@_key("prune_sparsity")
@_key("prune_channels")
@click.option("--prune-layer", "prune_layers", multiple=True, metavar="NODE=RATIO",
              help="Per-layer ratio (or sparsity) for the pruning above, by ONNX node name (repeatable).")
@click.option("--distill", type=click.Path(path_type=Path), metavar="DATA",
              help="Distil the original model into the compressed one on DATA (.npz, labels optional; "
                   "needs the 'train' extra).")
@_key("epochs")
@click.option("--student", type=click.Path(path_type=Path), metavar="MODEL.onnx",
              help="With --distill: train this student architecture instead of the pruned model.")
@_key("seed")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:d0,d1,..",
              help="Fix an input's dynamic dims (repeatable).")
@click.option("--input-value", "input_values", multiple=True, metavar="NAME=VALUE",
              help="Freeze an input to a constant so control flow on it folds away (repeatable).")
@click.option("--batch-axis", "batch_axes", multiple=True, metavar="NAME:AXIS|NAME:none",
              help="The axis samples stack along in input or output NAME (default: where the model's dynamic batch "
                   "dim is; none: one whole tensor per sample, one sample per call) (repeatable).")
@click.option("--state", "state", multiple=True, metavar="INPUT=OUTPUT",
              help="A recurrent state: INPUT is fed OUTPUT's value from the previous step, zeros first "
                   "(default: pairs found by name and shape, e.g. h/hn, state/stateN) (repeatable).")
@click.option("--no-simplify", is_flag=True,
              help="Skip graph simplification (onnxslim) and fusions (conv affines, hard-swish). Without it, a "
                   "rewrite that changes any output's shape or values on a sample is dropped by itself, and the "
                   "report says so.")
@click.option("--preprocessing", "preprocessing_file", type=click.Path(path_type=Path),
              help="JSON file with the manifest's preprocessing for a sensor model (window, hop, layout, "
                   "channels, sample_rate_hz, normalization); the flags below override its keys.")
@click.option("--hop", type=int, help="Sensor model: samples between window starts (default: the window, "
              "which is the model input's time dim).")
@click.option("--layout", type=click.Choice(["channels_first", "channels_last"]),
              help="Sensor model: input laid out [N, C, T] or [N, T, C] (default: the smaller dim is C).")
@click.option("--channels", metavar="NAME,NAME,..", help="Sensor model: channel names in the model's order.")
@click.option("--sample-rate", type=float, metavar="HZ", help="Sensor model: sample rate of the stream.")
@click.option("--normalize", metavar="MEAN:STD[,MEAN:STD..]",
              help="Sensor model: per-channel (x - mean) / std, one pair for all channels or one per channel.")
@_key("name")
@_key("version", dest="model_version")
@_key("threads")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--recipe", type=click.Path(path_type=Path), metavar="FILE",
              help="Settings from a recipe: a TOML file (docs/converter.md, \"Recipes\"), or an artifact's "
                   "directory or manifest.json, which reproduces it. Flags given here win over it.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Change one setting of the recipe: quantize=int8, passes.quantize-int8.per_channel=false, "
                   "targets.tflite.float_io=true, input_shapes.x=[1,64] (repeatable; works without --recipe).")
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of the table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, and no log lines from the toolchains "
              "(ONNX Runtime, TVM, LLVM, coremltools, absl) on the terminal.")
@click.option("--log-file", type=click.Path(path_type=Path, dir_okay=False),
              help="Append the toolchains' log lines (INFO and up, their native output included) to this file.")
@target_options
def convert_cmd(model: Path, output: Path, target, profile, quantize, calibration, calibration_method, keep_float,
                kept_precision, no_mixed_precision, int4_block_size, fp16_io, validation, validation_samples, max_accuracy_drop, min_cosine, min_top1_agreement,
                prune_sparsity, prune_channels, prune_layers, distill, epochs, student, seed, input_shapes, input_values,
                batch_axes, state, no_simplify, preprocessing_file, hop, layout, channels, sample_rate, normalize, name, model_version,
                threads, force, recipe, assignments, as_json, quiet, log_file, **target_settings) -> None:
    """Convert MODEL (ONNX) into an artifact directory: model, manifest.json, golden.npz, report.json.

    \b
    Examples:
      edgeopt convert model.onnx -o out --profile raspberry-pi-4 --target onnx --quantize int8 \\
          --calibration cal.npz --validation val.npz --max-accuracy-drop 1.0
      edgeopt convert model.onnx -o out --target onnx --quantize int4 --input-shape x:1,64
      edgeopt convert model.onnx -o out --target onnx --prune-channels 0.5 --distill train.npz \\
          --epochs 30 --quantize int8 --calibration cal.npz --validation val.npz
    """
    preprocessing = load_preprocessing_file(preprocessing_file) if preprocessing_file else {}
    preprocessing.update({k: v for k, v in {
        "hop": hop, "layout": layout, "sample_rate_hz": sample_rate,
        "channels": [c.strip() for c in channels.split(",")] if channels else None,
        "normalization": parse_normalize(normalize) if normalize else None}.items() if v is not None})

    opts = ConvertOptions(
        model=model, output=output, target=target, profile=profile, quantize=quantize, calibration=calibration,
        validation=validation, validation_samples=validation_samples, mixed_precision=not no_mixed_precision,
        max_accuracy_drop=max_accuracy_drop, min_cosine=min_cosine,
        min_top1_agreement=min_top1_agreement,
        input_shapes=dict(parse_input_shape(s) for s in input_shapes),
        input_values=dict(parse_input_value(v) for v in input_values),
        batch_axes=dict(parse_batch_axis(a) for a in batch_axes), state=dict(parse_state(p) for p in state),
        name=name, version=model_version, force=force, threads=threads, seed=seed,
        prune_sparsity=prune_sparsity, prune_channels=prune_channels,
        prune_layers=dict(parse_layer_ratio(t) for t in prune_layers), distill=distill, epochs=epochs,
        student=student, preprocessing=preprocessing, other_inputs=(preprocessing_file,) if preprocessing_file else (),
        target_params=_chosen_target_params(target, target_settings),
        pass_params=_given_pass_params({
            "quantize-int8": {"calibration_method": calibration_method, "kept_precision": kept_precision,
                              "keep_float": ",".join(keep_float) if keep_float else None},
            "quantize-int4": {"block_size": int4_block_size},
            "quantize-fp16": {"keep_io_types": False if fp16_io else None},
            "canonicalize": {"simplify": False if no_simplify else None},
        }),
    )
    if recipe is not None or assignments:
        settings, where = load_recipe(recipe) if recipe is not None else ({}, "--set")
        for assignment in assignments:
            set_value(settings, assignment)
        ctx = click.get_current_context()
        given = frozenset(field for option, field in RECIPE_FLAGS.items()
                          if ctx.get_parameter_source(option) is ParameterSource.COMMANDLINE)
        opts = apply_recipe(opts, settings, where, given)
    if log_file is not None and Path(os.path.realpath(output)) in Path(os.path.realpath(log_file)).parents:
        raise UserInputError(f"--log-file {log_file} is inside the output location {output}, which the artifact "
                             f"replaces: write the log elsewhere")
    try:
        with logs.session(quiet, log_file, capture_native=not debug_requested()):
            result = convert(opts, progress=make_progress(not quiet))
    except ConvertCheckFailed as exc:
        _show(exc.result.report, as_json, print_convert_report)
        raise
    _show(result.report, as_json, print_convert_report)


# convert's options that set a recipe's top-level settings: option name → ConvertOptions field (the
# options that set pass and target parameters, and the preprocessing flags, are merged key by key)
RECIPE_FLAGS = {
    "target": "target", "profile": "profile", "quantize": "quantize", "max_accuracy_drop": "max_accuracy_drop",
    "min_cosine": "min_cosine", "min_top1_agreement": "min_top1_agreement", "no_mixed_precision": "mixed_precision",
    "validation_samples": "validation_samples", "seed": "seed", "threads": "threads", "name": "name",
    "model_version": "version", "prune_sparsity": "prune_sparsity", "prune_channels": "prune_channels",
    "prune_layers": "prune_layers", "epochs": "epochs", "input_shapes": "input_shapes",
    "input_values": "input_values", "batch_axes": "batch_axes", "state": "state",
}


def _given_pass_params(params: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
    """Only what the user set: a target refuses a setting it would not use, so defaults are left out."""
    given = {name: {k: v for k, v in values.items() if v is not None} for name, values in params.items()}
    return {name: values for name, values in given.items() if values}


def _show(report: dict, as_json: bool, printer) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        printer(report)
