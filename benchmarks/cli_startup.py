"""How long `edgeopt --help` takes, next to a bare `python -c pass` (same run, interleaved)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import cli, print_table, write_json

RUNS = 15


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    cli(__doc__)
    exe = str(Path(sys.executable).parent / "edgeopt")
    cases = {"python -c pass": [sys.executable, "-c", "pass"], "edgeopt --help": [exe, "--help"],
             "edgeopt profiles list": [exe, "profiles", "list"], "edgeopt convert --help": [exe, "convert", "--help"]}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(RUNS):
        for name, cmd in cases.items():
            times[name].append(timed(cmd))
    base = statistics.median(times["python -c pass"])
    rows, out = [], {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append([name, med * 1000, max(ts) * 1000, med / base])
        out[name] = {"median_s": med, "max_s": max(ts)}
    print_table(f"CLI start-up ({RUNS} runs each, interleaved)", ["command", "median ms", "max ms", "x python"], rows)
    write_json("cli_startup", {"runs": RUNS, "results": out})


if __name__ == "__main__":
    main()
