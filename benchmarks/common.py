"""Helpers shared by the benchmark scripts: machine facts, a results table, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RECORDED = ROOT / "benchmarks" / "results"   # the results docs/benchmarks.md quotes: copied here by hand
DEFAULT_OUT = ROOT / "build" / "benchmarks"
sys.path.insert(0, str(ROOT / "examples"))


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*[_fmt(v) for v in row])
    Console(width=200).print(table)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def add_out_option(parser: argparse.ArgumentParser) -> None:
    """--out DIR, which every benchmark script takes (its own parser must know it)."""
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"directory for the JSON results (default: {DEFAULT_OUT.relative_to(ROOT)}/; a run never "
                             f"writes the recorded {RECORDED.relative_to(ROOT)}/)")


def cli(doc: str | None) -> argparse.Namespace:
    """The command line of a script with no options of its own: ``--help`` and ``--out``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_option(parser)
    return parser.parse_args()


def results_dir() -> Path:
    """The --out directory of this run: a run never overwrites the tracked, recorded results."""
    parser = argparse.ArgumentParser(add_help=False)
    add_out_option(parser)
    out = parser.parse_known_args()[0].out
    if out.resolve() == RECORDED.resolve():
        raise SystemExit(f"--out {out}: that is the recorded results directory; write elsewhere and copy on purpose")
    return out


def write_json(name: str, payload: dict[str, Any]) -> Path:
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    print(f"wrote {path}")
    return path
