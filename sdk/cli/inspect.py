"""``edgeopt inspect``."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect_cmd(model: Path, as_json: bool) -> None:
    """Ops, parameters, size, inputs/outputs of MODEL (ONNX), and which targets support every op."""
    from edgeopt.cli.render import print_inspect
    from edgeopt.converters.inspect import inspect_model

    info = inspect_model(model)
    click.echo(json.dumps(info, indent=2)) if as_json else print_inspect(info)
