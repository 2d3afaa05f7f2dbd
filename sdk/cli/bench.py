"""``edgeopt bench``."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _batches(text: str) -> list[int]:
    try:
        values = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated positive integers, got {text!r}",
                                 param_hint="--batch") from None
    if not values or any(b < 1 for b in values):
        raise click.BadParameter(f"expected comma-separated positive integers, got {text!r}", param_hint="--batch")
    return values


@click.command("bench")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--batch", "batch_text", default="1,8,32", show_default=True, help="Batch sizes to sweep.")
@click.option("--threads", type=int, default=1, show_default=True, help="Inference threads (fixed for the sweep).")
@click.option("--warmup", type=int, default=5, show_default=True, help="Warm-up calls per batch size.")
@click.option("--rounds", type=int, default=5, show_default=True, help="Measurement rounds per batch size.")
@click.option("--min-round-time", type=float, default=0.2, show_default=True, help="Seconds per round.")
@click.option("--runtime-param", "runtime_params", multiple=True, metavar="NAME=VALUE",
              help="A parameter of the model's runtime, e.g. xnnpack=false for litert (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def bench_cmd(path: Path, batch_text: str, threads: int, warmup: int, rounds: int, min_round_time: float,
              runtime_params: tuple[str, ...], as_json: bool) -> None:
    """p50/p95/p99 latency and throughput of PATH (an artifact directory or a model file).

    Inputs are random with the model's shapes and dtypes; a model compiled for a fixed batch size
    is measured only at that size.
    """
    from edgeopt.bench import batch_feeds, measure
    from edgeopt.cli.render import print_bench
    from edgeopt.runtime import open_runtime

    batches = _batches(batch_text)
    settings = {}
    for item in runtime_params:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint="--runtime-param")
        settings[name] = value
    runtime = open_runtime(path, threads=threads, **settings)
    rows = []
    for batch in batches:
        if runtime.fixed_batch is not None and batch != runtime.fixed_batch:
            rows.append({"batch": batch, "skipped": f"model has a fixed batch of {runtime.fixed_batch}"})
            continue
        (stats,) = measure([runtime], [batch_feeds(runtime, batch)], warmup=warmup, rounds=rounds,
                           min_round_s=min_round_time)
        rows.append(stats.to_json())
    result = {"model": str(path), "runtime": runtime.name, "threads": threads, "runtime_params": runtime.config,
              "results": rows}
    click.echo(json.dumps(result, indent=2)) if as_json else print_bench(result)
