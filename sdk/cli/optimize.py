"""``edgeopt optimize``: every recipe the board takes, measured, and the Pareto front."""

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
from edgeopt.errors import CheckFailed, UserInputError
from edgeopt.profiles import format_size
from edgeopt.progress import make_progress


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: comma-separated ratios, e.g. 0,0.25,0.5") from None
    if not values or any(not 0.0 <= v < 1.0 for v in values):
        raise click.BadParameter(f"{text!r}: ratios in [0, 1), e.g. 0,0.25,0.5")
    return values


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(v.strip() for v in text.split(",") if v.strip())


@click.command("optimize")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Directory for pareto.json, pareto.png, candidates/ and best/ (rerun: finished candidates "
                   "are reused).")
@click.option("--profile", required=True, help="Hardware profile: its formats are the targets tried, its budgets "
              "the fit.")
@click.option("--calibration", type=click.Path(path_type=Path), help="Calibration data for int8 / int16x8 candidates.")
@click.option("--validation", type=click.Path(path_type=Path), required=True,
              help="Validation data (with labels, the loss is the accuracy drop; without, 1 - cosine).")
@click.option("--max-accuracy-drop", type=click.FloatRange(min=0), metavar="X",
              help="Feasible: loses at most X points of accuracy (INT8 candidates keep layers float to meet it).")
@click.option("--min-cosine", type=click.FloatRange(-1, 1), metavar="C",
              help="Feasible: cosine to the original at least C (INT8 candidates keep layers float to meet it).")
@click.option("--objective", type=click.Choice(["latency", "size"]), default="latency", show_default=True,
              help="What `best` minimises: p50 latency on this host (1 thread, batch 1) or artifact size.")
@click.option("--targets", metavar="T[,T]", help="Only these of the profile's formats.")
@click.option("--quantize", metavar="Q[,Q]", help="Only these quantize modes (default: every mode of each target; "
              "int8/int16x8 only with --calibration).")
@click.option("--prune", default="0,0.5", show_default=True, metavar="R[,R]",
              help="Structured channel-pruning ratios tried for each target and mode.")
@click.option("--distill", type=click.Path(path_type=Path), metavar="DATA",
              help="Fine-tune the pruned candidates by distillation on this data.")
@click.option("--epochs", type=click.IntRange(min=1), help="Distillation epochs (with --distill).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:d0,d1,..",
              help="Fix an input's dynamic dims, as for convert (repeatable).")
@click.option("--input-value", "input_values", multiple=True, metavar="NAME=VALUE",
              help="Freeze an input to a constant, as for convert (repeatable).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Candidates converted at once, each in its own process (latency is then measured side by side "
                   "in one process, after them all).")
@click.option("--json", "as_json", is_flag=True, help="Print pareto.json.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, and no log lines from the toolchains.")
def optimize_cmd(model: Path, output: Path, profile: str, calibration: Path | None, validation: Path,
                 max_accuracy_drop: float | None, min_cosine: float | None, objective: str, targets: str | None,
                 quantize: str | None, prune: str, distill: Path | None, epochs: int | None,
                 input_shapes: tuple[str, ...], input_values: tuple[str, ...], jobs: int, as_json: bool,
                 quiet: bool) -> None:
    """Convert MODEL (ONNX) with every recipe PROFILE's board takes and keep the best.

    Candidates: the profile's formats x quantize modes x pruning ratios, each an `edgeopt convert` with
    the accuracy budget (INT8 keeps the fewest layers float that meet it). Prints the Pareto front of
    the objective against the loss, writes DIR/pareto.json, DIR/pareto.png, every candidate under
    DIR/candidates/ and the best feasible one as DIR/best/. Exit 1 when no candidate is feasible.

    \b
    Example:
      edgeopt optimize digits_cnn.onnx --profile raspberry-pi-4 --calibration cal.npz \\
          --validation val.npz --max-accuracy-drop 1.0 --objective size -o opt
    """
    # lazy: onnx, onnxruntime and the targets (the `convert` extra), so that `--help` works without them
    from edgeopt.converters.optimize import OptimizeOptions, optimize
    from edgeopt.converters.passes.canonicalize import parse_input_shape, parse_input_value

    for path in (model, calibration, validation, distill):
        if path is not None and not path.exists():
            raise UserInputError(f"not found: {path}")
    if epochs is not None and distill is None:
        raise UserInputError("--epochs applies with --distill")
    opts = OptimizeOptions(model=model, output=output, profile=profile, calibration=calibration,
                           validation=validation, max_accuracy_drop=max_accuracy_drop, min_cosine=min_cosine,
                           objective=objective, targets=_names(targets), quantize=_names(quantize),
                           prune=_floats(prune), distill=distill, epochs=epochs,
                           input_shapes=dict(parse_input_shape(s) for s in input_shapes),
                           input_values=dict(parse_input_value(v) for v in input_values), jobs=jobs)
    with logs.session(quiet or as_json, None, capture_native=not debug_requested()):
        result = optimize(opts, progress=make_progress(not quiet and not as_json))
    chart = write_chart(result, output / "pareto.png")
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        print_front(result, output, chart)
    if result["best"] is None:
        raise CheckFailed("no candidate is feasible (budget met and fits the board): see pareto.json")


def _loss_text(row: dict[str, Any], labelled: bool) -> str:
    if labelled:
        return "-" if row["accuracy_drop"] is None else f"{row['accuracy_drop']:.2f}"
    return "-" if row["cosine"] is None else f"{1 - row['cosine']:.2e}"


def print_front(result: dict[str, Any], output: Path, chart: str | None) -> None:
    con = Console()
    labelled = result["loss"] == "accuracy_drop"
    key = "latency_ms" if result["objective"] == "latency" else "size_bytes"
    rows = sorted(result["candidates"], key=lambda r: (not r["pareto"], r[key] is None, r[key] or 0))
    table = Table(title=f"{len(rows)} candidates for {result['profile']}, Pareto front first "
                        f"(objective: {result['objective']})", title_justify="left")
    for col, just in (("candidate", "left"), ("front", "left"), ("size", "right"), ("p50 ms", "right"),
                      ("acc. drop" if labelled else "1 - cos", "right"), ("fits", "left"), ("status", "left")):
        table.add_column(col, justify=just)
    for r in rows:
        status = r.get("error") or r.get("status", "")
        name = r["name"] + (" (best)" if r["name"] == result["best"] else "")
        table.add_row(escape(name), "*" if r["pareto"] else "",
                      "-" if r["size_bytes"] is None else format_size(r["size_bytes"]),
                      "-" if r["latency_ms"] is None else f"{r['latency_ms']:.3f}", _loss_text(r, labelled),
                      {True: "yes", False: "NO", None: "-"}[r["fits"]], escape(status[:60]))
    con.print(table)
    cached = sum(1 for r in rows if r["cached"])
    if cached:
        con.print(f"{cached} candidate(s) reused from an earlier run (unchanged inputs)")
    if not result["complete"]:
        con.print("interrupted: pareto.json lists the candidates that finished")
    con.print(escape(f"wrote {output / 'pareto.json'}" + (f", {chart}" if chart else "")))
    if result["best"]:
        con.print(escape(f"best: {result['best']} -> {output / 'best'}"))


def write_chart(result: dict[str, Any], path: Path) -> str | None:
    """Objective against loss, the front joined, best starred; None (and nothing written) without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labelled = result["loss"] == "accuracy_drop"
    key = "latency_ms" if result["objective"] == "latency" else "size_bytes"

    def xy(r):
        loss = r["accuracy_drop"] if labelled else (None if r["cosine"] is None else 1 - r["cosine"])
        x = r[key] / (1e6 if key == "size_bytes" else 1)
        return x, loss

    points = [r for r in result["candidates"] if r[key] is not None and xy(r)[1] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in points:
        x, y = xy(r)
        ax.scatter(x, y, color="#4f81bd" if r["pareto"] else "#bbbbbb", zorder=3)
        if r["pareto"]:  # the others stay unlabelled grey: pareto.json names them
            ax.annotate(r["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    budget = result["budget"]["max_accuracy_drop"] if labelled else (
        None if result["budget"]["min_cosine"] is None else 1 - result["budget"]["min_cosine"])
    if budget is not None:
        ax.axhline(budget, color="#c0504d", linestyle="--", linewidth=1, label="budget")
    front = sorted(xy(r) for r in points if r["pareto"])
    if front:
        ax.plot(*zip(*front, strict=True), color="#4f81bd", zorder=2)
    best = next((r for r in points if r["name"] == result["best"]), None)
    if best is not None:
        ax.scatter(*xy(best), marker="*", s=250, color="#c0504d", zorder=4, label=f"best: {best['name']}")
    if best is not None or budget is not None:
        ax.legend(fontsize=8)
    ax.set_xlabel("p50 latency, ms (this host, 1 thread)" if key == "latency_ms" else "artifact size, MB")
    ax.set_ylabel("accuracy drop, points" if labelled else "1 - cosine to the original")
    ax.set_title(f"{Path(result['model']).name} on {result['profile']}: Pareto front", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
