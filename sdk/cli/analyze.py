"""``edgeopt analyze``: which layers INT8 quantization hurts, most first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgeopt import logs
from edgeopt.cli import debug_requested
from edgeopt.converters.modes import INT8_QUANTIZERS
from edgeopt.errors import MissingDependency, UserInputError
from edgeopt.profiles import load_profile
from edgeopt.progress import make_progress


@click.command("analyze")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--quantize", type=click.Choice(["int8"]), default="int8", show_default=True,
              help="The quantization to analyse.")
@click.option("--target", type=click.Choice(list(INT8_QUANTIZERS)), default="onnx", show_default=True,
              help="Whose INT8: onnx and tvm ship ONNX Runtime's QDQ, tflite LiteRT's quantizer (LiteRT runs both "
                   "models), coreml compresses weights only (each compressed weight's own error is ranked; "
                   "no data is read).")
@click.option("--calibration", type=click.Path(path_type=Path),
              help="Calibration data, as for convert: .npz (an array per input name), .npy or sensor .csv "
                   "(required but with --target coreml).")
@click.option("--validation", type=click.Path(path_type=Path),
              help="Inputs the outputs are compared on (default: the calibration data).")
@click.option("--validation-samples", type=click.IntRange(min=1), default=64, show_default=True, metavar="N",
              help="Compare on the first N validation samples.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:d0,d1,..",
              help="Fix an input's dynamic dims, as for convert (repeatable).")
@click.option("--input-value", "input_values", multiple=True, metavar="NAME=VALUE",
              help="Freeze an input to a constant, as for convert (repeatable).")
@click.option("--profile", help="Hardware profile: its CPU decides u8 or s8 activations, as for convert.")
@click.option("--weights-only", is_flag=True,
              help="Only the nodes with weights (Conv, ConvTranspose, MatMul, Gemm): fewer runs on a big model.")
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True, metavar="N",
              help="Rows in the table and bars in the chart (--json lists every node).")
@click.option("--plot", type=click.Path(path_type=Path, dir_okay=False), metavar="PNG",
              help="Write a bar chart of the most sensitive nodes (needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: {\"layers\": [{\"node\", \"op\", \"sensitivity\", ...}]}.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, and no log lines from the toolchains.")
def analyze_cmd(model: Path, quantize: str, target: str, calibration: Path | None, validation: Path | None,
                validation_samples: int,
                input_shapes: tuple[str, ...], input_values: tuple[str, ...], profile: str | None, weights_only: bool,
                top: int, plot: Path | None, as_json: bool, quiet: bool) -> None:
    """Rank MODEL's (ONNX) nodes by what quantizing each one alone costs.

    Activation ranges are calibrated once; then the whole model is quantized (the all-INT8 baseline),
    and every node the target's quantizer quantizes is quantized alone and the model run on the
    validation inputs. Sensitivity = 1 - cosine of the outputs against the float model's. The most
    sensitive nodes are the ones to pass to `edgeopt convert --keep-float`. With --target coreml (weights
    only) each compressed weight's own error is ranked instead.

    \b
    Example:
      edgeopt analyze det.onnx --calibration cal.npz --validation val.npz --input-shape x:1,3,320,320 \\
          --plot sensitivity.png
      edgeopt convert det.onnx -o out --target onnx --quantize int8 --calibration cal.npz \\
          --keep-float p2o.Conv.2,p2o.Add.14
    """
    # lazy: onnx and onnxruntime (the `convert` extra), so that `edgeopt analyze --help` works without them
    from edgeopt.converters.analyze import AnalyzeOptions, analyze
    from edgeopt.converters.passes.canonicalize import parse_input_shape, parse_input_value

    for path in (model, calibration, validation):
        if path is not None and not path.exists():
            raise UserInputError(f"not found: {path}")
    if plot is not None:
        _matplotlib()  # before the work, not after it
    opts = AnalyzeOptions(model=model, calibration=calibration, validation=validation,
                          input_shapes=dict(parse_input_shape(s) for s in input_shapes),
                          input_values=dict(parse_input_value(v) for v in input_values),
                          profile=load_profile(profile) if profile else None,
                          validation_samples=validation_samples, weights_only=weights_only, target=target)
    with logs.session(quiet or as_json, None, capture_native=not debug_requested()):
        result = analyze(opts, progress=make_progress(not quiet and not as_json))
    if plot is not None:
        write_chart(result, plot, top)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        print_analysis(result, top, plot)


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependency("matplotlib", "plot", "--plot") from exc
    return plt


def print_analysis(result: dict[str, Any], top: int, plot: Path | None) -> None:
    con = Console()
    base, weights = result["float_vs_int8"], result["target"] == "coreml"
    if weights:
        con.print(escape(f"{result['model']}: Core ML's INT8 compresses weights only (linear symmetric, per output "
                         f"channel); nothing runs Core ML here, so each compressed weight's own error is ranked"))
    else:
        agreement = "" if base["top1_agreement"] is None else f", top-1 agreement {base['top1_agreement']:.2%}"
        con.print(escape(f"{result['model']}: all nodes INT8 for --target {result['target']} "
                         f"({result['activation_type']} activations): cosine {base['cosine']:.6f} vs float{agreement}  "
                         f"({result['validation']['samples']} samples of {result['validation']['source']})"))
    what = "weights, the most damaged first" if weights else "nodes quantized alone, most sensitive first"
    table = Table(title=f"{what} ({min(top, len(result['layers']))} of {len(result['layers'])})", title_justify="left")
    columns = [("#", "right"), ("node", "left"), ("op", "left"), ("sensitivity", "right"), ("cosine", "right")]
    columns += [("weight values", "right")] if weights else [("top-1 agreement", "right"),
                                                             ("layer error", "right")]
    for col, just in columns:
        table.add_column(col, justify=just)
    for i, row in enumerate(result["layers"][:top], 1):
        last = [f"{row['values']:,}"] if weights else [
            "-" if row["top1_agreement"] is None else f"{row['top1_agreement']:.2%}",
            "-" if row.get("layer_error") is None else f"{row['layer_error']:.2e}"]
        table.add_row(str(i), escape(row["node"]), row["op"],
                      "-" if row["sensitivity"] is None else f"{row['sensitivity']:.2e}",
                      "-" if row["cosine"] is None else f"{row['cosine']:.6f}", *last)
    con.print(table)
    if plot is not None:
        con.print(escape(f"chart: {plot}"))
    names = ",".join(r["node"] for r in result["layers"][:3])
    if names:
        con.print(escape(f"to keep the top nodes in float: edgeopt convert ... --target {result['target']} "
                         f"--keep-float {names}"))


def write_chart(result: dict[str, Any], path: Path, top: int) -> None:
    """Horizontal bars, the most sensitive node at the top."""
    plt = _matplotlib()
    rows = [r for r in result["layers"][:top] if r["sensitivity"] is not None][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
    ax.barh([f"{r['node']} ({r['op']})" for r in rows], [r["sensitivity"] for r in rows], color="#c0504d")
    base = result["float_vs_int8"]
    if base is None:  # coreml: weights only
        ax.set_xlabel("1 - cosine of the INT8-compressed weight vs the original")
        ax.set_title(f"{Path(result['model']).name}: Core ML INT8 weight compression", fontsize=10)
    else:
        ax.set_xlabel(f"sensitivity: 1 - cosine vs float, this node alone in INT8 (--target {result['target']})")
        ax.set_title(f"{Path(result['model']).name}: all INT8 cosine {base['cosine']:.4f}", fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
