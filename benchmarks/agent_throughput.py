"""The device agent on a small 1-D CNN sensor model (examples/imu.py: 3 channels x 64 samples, 4
activities): end-to-end windows/s of the real `edgeopt-agent` process against a bare loop calling the
runtime with the same batches, batch 32 against batch 1, the agent's peak RSS on a 10 MB and a
288 MB replay, the time from start to READY=1 (sd_notify), and whether the agent's per-stage
profile accounts for its wall time.

    python benchmarks/agent_throughput.py [--format tflite|onnx] [--samples N] [--rounds R] [--out DIR]

The agent replays a .npy stream as fast as it can (overflow "block": nothing dropped) into a JSON
Lines sink; its rate is windows_out / (last - first inference) from its status file, each round at
least 2 s of agent time (24M samples: 750k windows); every measure is given as the median of the
rounds with their range. The bare loop
cuts the same windows with numpy beforehand and times only the backend calls (``Runtime._run``,
the interpreter / session call without edgeopt's checks), 1 thread, like the agent. On a shared
machine the rates follow the load; the CPU time per window (the agent's threads together, after
READY=1 and less what a 200-sample run costs after READY, against the bare loop's) does much less,
so the table gives both.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, add_out_option, print_table, write_json

sys.path.insert(0, str(ROOT / "tests"))
AGENT = str(Path(sys.executable).parent / "edgeopt-agent")


def default_format() -> str:
    from edgeopt import registry

    if "tflite" in registry.names(registry.TARGETS):
        return "tflite"
    print("note: the tflite target is not installed here; measuring the ONNX artifact with ONNX Runtime "
          "(pass --format tflite once it is)")
    return "onnx"


def build(work: Path, fmt: str) -> dict[int, Path]:
    """The artifact per batch size: one ONNX artifact with a dynamic batch serves both; a .tflite has
    static shapes, so LiteRT gets one artifact per batch size (``--input-shape imu:B,3,64``), as
    TFLite deployments do."""
    from edgeopt.cli import main as cli_main

    import imu

    made = imu.make(work / "model")
    arts = {}
    for batch in (32, 1):
        art = work / f"artifact-{fmt}-b{batch}"
        shape = ["--input-shape", f"imu:{batch},3,64"] if fmt == "tflite" else []
        if fmt != "tflite" and arts:
            arts[batch] = next(iter(arts.values()))
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                cli_main(["convert", str(made["model"]), "-o", str(art), "--target", fmt, "-q", "--force", "--json",
                          "--preprocessing", str(made["preprocessing"]), "--validation", str(made["validation"]),
                          *shape])
        except SystemExit as exc:
            if exc.code:
                raise SystemExit(f"convert to {fmt} failed") from None
        arts[batch] = art
    return arts


def agent_config(work: Path, name: str, npy: Path, max_batch: int, process: str = "auto") -> Path:
    from agent_harness import to_toml

    cfg = {"agent": {"device_id": "bench", "state_dir": str(work / f"state-{name}"), "exit_when_sources_end": True},
           "telemetry": {"interval_s": 60.0, "status_file": str(work / f"{name}.status.json")},
           "batching": {"max_batch": max_batch, "max_wait_ms": 20.0, "overflow": "block"},
           "model": {"process": process},
           "source": [{"type": "npy", "name": "imu", "path": str(npy), "replay": "fast",
                       "channels": ["ax", "ay", "az"]}],
           "sink": [{"type": "jsonl", "path": str(work / f"{name}.jsonl"), "max_bytes": 64 << 20, "keep": 1}]}
    path = work / f"{name}.toml"
    path.write_text(to_toml(cfg))
    return path


def run_agent(config: Path, status_file: Path, ready_socket: Path) -> dict:
    """Start the agent, time READY=1, let it replay the stream, and read its final status."""
    if ready_socket.exists():
        ready_socket.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(ready_socket))
    sock.settimeout(30)
    t0 = time.perf_counter()
    proc = subprocess.Popen([AGENT, "--config", str(config)], env={**os.environ, "NOTIFY_SOCKET": str(ready_socket)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ready_s = None
    while ready_s is None:
        if b"READY=1" in sock.recv(4096):
            ready_s = time.perf_counter() - t0
    cpu_at_ready = process_cpu_s(proc.pid)
    sock.close()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    _, err = proc.communicate(timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"agent failed: {err.decode()[-2000:]}")
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime) - cpu_at_ready
    t = json.loads(status_file.read_text())["telemetry"]
    span = t["last_inference"] - t["first_inference"]
    return {"ready_s": ready_s, "windows": t["windows_out"], "windows_per_s": t["windows_out"] / span if span else 0.0,
            "span_s": span, "profile": t["profile"],
            "cpu_after_ready_s": cpu_s,
            "peak_rss_bytes": t["peak_rss_bytes"], "dropped": sum(t["dropped"].values()),
            "latency_ms": t["latency_ms"], "histogram": t["batch_size_histogram"], "inference": t["inference"]}


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a running process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bare_loop(artifact: Path, windows: np.ndarray, batch: int) -> tuple[float, float]:
    """Windows/s of the backend call alone over the same windows, in batches of ``batch``, and its
    CPU µs per window."""
    from edgeopt.agent.model import load_model

    model = load_model(artifact, None, threads=1)
    rt, name = model.runtime, model.input_name
    batches = [{name: windows[i:i + batch]} for i in range(0, len(windows) - batch + 1, batch)]
    for b in batches[:20]:
        rt._run(b)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for b in batches:
        rt._run(b)
    n = len(batches) * batch
    return n / (time.perf_counter() - t0), (time.process_time() - cpu0) / n * 1e6


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """'median (min-max)' of a measure over the rounds."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def profile_check(run: dict) -> dict:
    """The inference thread's stages per window against the wall time per window (first to last
    inference): the profile accounts for the time when the two agree (within 10 %)."""
    inf = run["profile"]["inference"]
    wall_us = run["span_s"] / run["windows"] * 1e6
    total_us = sum(inf["us_per_window"].values())
    return {"wall_us_per_window": wall_us, "profile_us_per_window": total_us, "ratio": total_us / wall_us}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", choices=["tflite", "onnx"], default=None)
    ap.add_argument("--samples", type=int, default=24_000_000,
                    help="stream length in 50 Hz samples (default: 24M, a 288 MB .npy: >= 2 s of agent time a round)")
    ap.add_argument("--small-samples", type=int, default=830_000,
                    help="a second, 10 MB stream: peak RSS must not depend on the file's length")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--process", choices=["auto", "thread"], default="auto",
                    help="the agent's [model] process: 'auto' runs the model in its inference worker (the default), "
                         "'thread' on the agent's thread (the design before it)")
    add_out_option(ap)
    args = ap.parse_args()
    fmt = args.format or default_format()

    from edgeopt.agent.sources.synthetic import imu_stream
    from edgeopt.agent.statedir import StateDir
    from edgeopt.agent.windowing import Windower

    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp:
        work = Path(tmp)
        artifacts = build(work, fmt)
        for b, art in artifacts.items():
            StateDir(work / f"state-b{b}").install(art)
        artifact = artifacts[32]
        samples, _ = imu_stream(args.samples, 50.0, 3, seed=7)
        npy = work / "stream.npy"
        np.save(npy, samples)
        small = work / "small.npy"
        np.save(small, samples[:args.small_samples])
        manifest = json.loads((artifact / "manifest.json").read_text())
        from edgeopt.agent.model import load_model

        pre = load_model(artifact, None).pre  # the converted model's own window layout ([C, T] or [T, C])
        windows = Windower("b", pre).push(samples, np.arange(len(samples)) / 50.0).data  # [n, *window shape]
        del samples

        configs = {b: agent_config(work, f"b{b}", npy, b, args.process) for b in (32, 1)}
        # what a run costs after READY=1 whatever its length (first inference, shutdown): measured on a
        # 200-sample stream and taken off, so the CPU per window is the steady state's
        np.save(work / "short.npy", np.zeros((200, 3), np.float32))
        StateDir(work / "state-short").install(artifact)
        short = agent_config(work, "short", work / "short.npy", 32, args.process)
        fixed_cpu_s = statistics.median(run_agent(short, work / "short.status.json", work / "notify.sock")
                                        ["cpu_after_ready_s"] for _ in range(3))
        StateDir(work / "state-small").install(artifact)
        small_run = run_agent(agent_config(work, "small", small, 32, args.process), work / "small.status.json",
                              work / "notify.sock")
        agent_runs: dict[int, list[dict]] = {32: [], 1: []}
        bare: dict[int, list[float]] = {32: [], 1: []}
        bare_cpu: dict[int, list[float]] = {32: [], 1: []}
        for _ in range(args.rounds):  # interleaved rounds: machine noise hits every variant alike
            for b in (32, 1):
                agent_runs[b].append(run_agent(configs[b], work / f"b{b}.status.json", work / "notify.sock"))
                rate_b, cpu_b = bare_loop(artifacts[b], windows, b)
                bare[b].append(rate_b)
                bare_cpu[b].append(cpu_b)

    rate = {b: [r["windows_per_s"] for r in agent_runs[b]] for b in (32, 1)}
    # ratios per round (its variants ran back to back), then the median: robust to load that changes
    # between rounds on a shared machine
    vs_bare = {b: [a / x for a, x in zip(rate[b], bare[b], strict=True)] for b in (32, 1)}
    agent_gain = [a / x for a, x in zip(rate[32], rate[1], strict=True)]
    bare_gain = [a / x for a, x in zip(bare[32], bare[1], strict=True)]
    # CPU per window: what the agent's threads together spend beside the runtime, whatever the load
    cpu = {b: [(r["cpu_after_ready_s"] - fixed_cpu_s) / r["windows"] * 1e6 for r in agent_runs[b]] for b in (32, 1)}
    checks = {b: [profile_check(r) for r in agent_runs[b]] for b in (32, 1)}
    ready = statistics.median(r["ready_s"] for b in (32, 1) for r in agent_runs[b])
    rss_big = max(r["peak_rss_bytes"] for b in (32, 1) for r in agent_runs[b])
    rss_small = small_run["peak_rss_bytes"]
    rss_goal = 60 if fmt == "tflite" else 80
    seconds = {b: [r["span_s"] for r in agent_runs[b]] for b in (32, 1)}
    med = {b: statistics.median(rate[b]) for b in (32, 1)}
    med_vs = {b: statistics.median(vs_bare[b]) for b in (32, 1)}
    runtime = manifest["model"]["runtime"]
    mib = 2 ** 20
    rows = [
        ["(a) agent end-to-end, batch 32", f"{med[32]:,.0f} windows/s", spread(vs_bare[32]) + "x of bare",
         ">= 0.9x", "yes" if med_vs[32] >= 0.9 else "no"],
        ["    bare loop, batch 32", f"{statistics.median(bare[32]):,.0f} windows/s", "", "", ""],
        ["    CPU per window, batch 32: agent (all threads) / bare loop",
         f"{statistics.median(cpu[32]):.1f} / {statistics.median(bare_cpu[32]):.1f} µs", "", "", ""],
        ["    agent end-to-end, batch 1", f"{med[1]:,.0f} windows/s", spread(vs_bare[1]) + "x of bare",
         ">= 0.5x", "yes" if med_vs[1] >= 0.5 else "no"],
        ["    bare loop, batch 1", f"{statistics.median(bare[1]):,.0f} windows/s", "", "", ""],
        ["    CPU per window, batch 1: agent (all threads) / bare loop",
         f"{statistics.median(cpu[1]):.1f} / {statistics.median(bare_cpu[1]):.1f} µs", "", "", ""],
        ["(b) agent batch 32 vs batch 1", "", spread(agent_gain) + "x", "", ""],
        ["    bare loop batch 32 vs batch 1", "", spread(bare_gain) + "x", "", ""],
        [f"(c) agent peak RSS (with its worker's own), {args.small_samples * 12 / 1e6:.0f} MB replay", f"{rss_small / mib:.1f} MiB", "",
         f"<= {rss_goal} MiB", "yes" if rss_small <= rss_goal * mib else "no"],
        [f"    agent peak RSS, {args.samples * 12 / 1e6:.0f} MB replay", f"{rss_big / mib:.1f} MiB", "",
         f"<= {rss_goal} MiB", "yes" if rss_big <= rss_goal * mib else "no"],
        ["(d) start to READY=1 (median)", f"{ready:.2f} s", "", "<= 1.5 s", "yes" if ready <= 1.5 else "no"],
        ["(e) profile: inference thread's stages / wall per window, batch 32",
         spread([c["ratio"] for c in checks[32]]), "", "within 10 %",
         "yes" if all(abs(c["ratio"] - 1) <= 0.1 for c in checks[32]) else "no"],
        ["    the same, batch 1", spread([c["ratio"] for c in checks[1]]), "", "within 10 %",
         "yes" if all(abs(c["ratio"] - 1) <= 0.1 for c in checks[1]) else "no"],
        ["agent seconds per round (first to last inference), batch 32 / 1",
         f"{spread(seconds[32], '{:.1f}')} / {spread(seconds[1], '{:.1f}')}", "", ">= 2 s",
         "yes" if min(seconds[32] + seconds[1]) >= 2 else "no"],
    ]
    n_windows = agent_runs[32][0]["windows"]
    print(f"load average during the run: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    where = {"worker": "in the agent's inference worker", "thread": "on the agent's thread"}[
        agent_runs[32][0]["inference"]["process"]]
    print_table(f"edgeopt-agent, {fmt} artifact on {runtime} {where}, 1 thread, {n_windows:,} windows per run, "
                f"{args.rounds} interleaved rounds: median (min-max); ratios per round", ["measure", "value", "ratio",
                                                                                           "goal", "met"], rows)
    for b in (32, 1):
        prof = agent_runs[b][-1]["profile"]
        print_table(f"where the time goes, batch {b} (last round; µs per window, waits included)",
                    ["thread", "stage", "µs/window"],
                    [[thread if i == 0 else "", stage, us] for thread, p in prof.items()
                     for i, (stage, us) in enumerate(p["us_per_window"].items())])
    write_json("agent_throughput", {
        "load_average": os.getloadavg(),
        "format": fmt, "runtime": runtime, "windows_per_run": n_windows, "rounds": args.rounds,
        "process": args.process, "inference": {str(b): [r["inference"] for r in agent_runs[b]] for b in (32, 1)},
        "replay_bytes": {"small": args.small_samples * 12, "big": args.samples * 12},
        "agent_windows_per_s": {str(b): rate[b] for b in (32, 1)},
        "bare_windows_per_s": {str(b): bare[b] for b in (32, 1)},
        "agent_vs_bare": {str(b): vs_bare[b] for b in (32, 1)},
        "agent_seconds": {str(b): seconds[b] for b in (32, 1)},
        "agent_cpu_after_ready_s": {str(b): [r["cpu_after_ready_s"] for r in agent_runs[b]] for b in (32, 1)},
        "agent_fixed_cpu_after_ready_s": fixed_cpu_s,
        "agent_cpu_us_per_window": {str(b): cpu[b] for b in (32, 1)},
        "bare_cpu_us_per_window": {str(b): bare_cpu[b] for b in (32, 1)},
        "agent_b32_vs_b1": agent_gain, "bare_b32_vs_b1": bare_gain,
        "peak_rss_bytes": {"small": rss_small, "big": rss_big}, "ready_s_median": ready,
        "ready_s": [r["ready_s"] for b in (32, 1) for r in agent_runs[b]],
        "dropped": sum(r["dropped"] for b in (32, 1) for r in agent_runs[b]),
        "profile_check": {str(b): checks[b] for b in (32, 1)},
        "profile": {str(b): [r["profile"] for r in agent_runs[b]] for b in (32, 1)},
        "agent_latency_ms_b32": agent_runs[32][-1]["latency_ms"],
    })


if __name__ == "__main__":
    main()
