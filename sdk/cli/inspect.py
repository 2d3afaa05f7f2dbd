"""``edgeopt inspect``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgeopt.cli.render import print_inspect
from edgeopt.errors import UserInputError
from edgeopt.profiles import load_profile


@click.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:d0,d1,..",
              help="Fix an input's dynamic dims, as for convert (repeatable).")
@click.option("--input-value", "input_values", multiple=True, metavar="NAME=VALUE",
              help="Freeze an input to a constant, as for convert (repeatable).")
@click.option("--batch-axis", "batch_axes", multiple=True, metavar="NAME:AXIS|NAME:none",
              help="The axis samples stack along in input or output NAME, as for convert (repeatable).")
@click.option("--profile", help="Hardware profile: marks the targets whose format the board does not run.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect_cmd(model: Path, input_shapes: tuple[str, ...], input_values: tuple[str, ...],
                batch_axes: tuple[str, ...], profile: str | None, as_json: bool) -> None:
    """What `edgeopt convert` will see in MODEL (ONNX), or what an artifact directory holds.

    The model is canonicalised first with the same --input-shape / --input-value / --batch-axis as
    convert (or the reason convert would stop is shown), then: inputs and outputs with their batch
    axes, recurrent state pairs, ops, every layer with weights (the names --prune-layer takes) with its
    parameters and MACs, and which targets support every op (with the nodes they do not).
    """
    # lazy: onnx (the `convert` extra), so that `edgeopt inspect --help` works without it
    from edgeopt.converters.inspect import inspect_path
    from edgeopt.converters.passes.canonicalize import parse_input_shape, parse_input_value
    from edgeopt.converters.streaming import parse_batch_axis

    if not model.exists():
        raise UserInputError(f"not found: {model}")
    info = inspect_path(model, dict(parse_input_shape(s) for s in input_shapes),
                        dict(parse_input_value(v) for v in input_values),
                        dict(parse_batch_axis(a) for a in batch_axes),
                        load_profile(profile) if profile else None)
    click.echo(json.dumps(info, indent=2)) if as_json else print_inspect(info)
