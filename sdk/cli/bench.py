"""``edgeopt bench``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgeopt.bench import MIN_ROUND_TIME, ROUNDS, WARMUP, BenchSettings, batch_feeds, measure
from edgeopt.cli.render import print_bench
from edgeopt.runtime import open_runtime


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
@WARMUP.click_option("--warmup", type=click.IntRange(min=0))
@ROUNDS.click_option("--rounds", type=click.IntRange(min=1))
@MIN_ROUND_TIME.click_option("--min-round-time", type=click.FloatRange(min=0, min_open=True))
@click.option("--runtime-param", "runtime_params", multiple=True, metavar="NAME=VALUE",
              help="A parameter of the model's runtime, e.g. xnnpack=false for litert (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def bench_cmd(path: Path, batch_text: str, threads: int, warmup: int, rounds: int, min_round_time: float,
              runtime_params: tuple[str, ...], as_json: bool) -> None:
    """p50/p95/p99 latency and throughput of PATH (an artifact directory or a model file).

    Inputs are random with the model's shapes and dtypes; a model compiled for a fixed batch size
    is measured only at that size. Each batch size takes --rounds rounds of at least
    --min-round-time seconds (no cap on calls). `edgeopt convert` measures its report's latency
    with the same code and these defaults.
    """
    batches = _batches(batch_text)
    settings = BenchSettings(warmup=warmup, rounds=rounds, min_round_time=min_round_time)
    runtime_settings = {}
    for item in runtime_params:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint="--runtime-param")
        runtime_settings[name] = value
    runtime = open_runtime(path, threads=threads, **runtime_settings)
    rows = []
    for batch in batches:
        if runtime.fixed_batch is not None and batch != runtime.fixed_batch:
            rows.append({"batch": batch, "skipped": f"model has a fixed batch of {runtime.fixed_batch}"})
            continue
        (stats,) = measure([runtime], [batch_feeds(runtime, batch)], settings)
        rows.append(stats.to_json())
    result = {"model": str(path), "runtime": runtime.name, "threads": threads, "runtime_params": runtime.config,
              "settings": {"warmup": warmup, "rounds": rounds, "min_round_time": min_round_time}, "results": rows}
    click.echo(json.dumps(result, indent=2)) if as_json else print_bench(result)
