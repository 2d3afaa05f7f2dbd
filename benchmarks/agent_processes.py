"""Where the agent's inference should run: the same pipeline with the model called (a) on a thread of
the agent's process, as edgeopt-agent did before its inference worker (``[model] process = "thread"``
still does), and (b) in a worker process forked after the model is loaded, fed through a
shared-memory ring (the design agent/worker.py took from this measurement), each against the bare loop
(agent_throughput.py's) in the same round, on the IMU 1-D CNN at batch 32.

    python benchmarks/agent_processes.py [--format tflite|onnx] [--samples N] [--rounds R] [--out DIR]

Both variants are the agent's pipeline reduced to its parts: a source thread reads the .npy replay in
4096-sample blocks and cuts windows with the agent's ``Windower``; takes of 256 windows go to
inference in calls of 32 (``Runtime._run``); a writer thread encodes each take with the agent's
``encode_results`` and appends it to a JSON Lines file. No service loop, statistics, observers or
status file: an upper bound for each design, not the agent's rate. The table gives windows/s against
the bare loop, the CPU time the model's calls took per window (thread CPU time: what the other
threads' work costs the calls on a shared machine) and the memory the worker adds (its private
pages at their peak: what it shares with the process it was forked from is not counted twice).
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import queue
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from agent_throughput import bare_loop, build

from common import add_out_option, print_table, write_json

TAKE, CALL, SLOTS = 256, 32, 4
STOP = 255


def private_mib(pid: int) -> float:
    """Pages only this process holds (USS), MiB."""
    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    return sum(int(line.split()[1]) for line in lines if line.startswith("Private_")) / 1024


class Pipeline:
    """The source and writer threads around one inference design (``threaded`` or ``forked``); the
    windows past the last whole take are left out."""

    def __init__(self, model, npy: Path, out: Path):
        self.model, self.npy, self.out = model, npy, out
        shape = model.sample_shape
        self.n_out = int(np.prod(model.runtime.outputs[0].shape[1:]))
        # the take buffers: shared with a forked worker (MAP_SHARED), plain memory for a thread alike
        self._in = mmap.mmap(-1, SLOTS * TAKE * 4 * int(np.prod(shape)))
        self._out = mmap.mmap(-1, SLOTS * TAKE * 4 * self.n_out)
        self.ins = np.frombuffer(self._in, np.float32).reshape(SLOTS, TAKE, *shape)
        self.outs = np.frombuffer(self._out, np.float32).reshape(SLOTS, TAKE, self.n_out)
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for k in range(SLOTS):
            self.free.put(k)
        self.labels: list = [None] * SLOTS
        self.windows = 0
        self.call_cpu_s = 0.0
        self.first = 0.0

    def source(self, send) -> None:
        """Windows of the replay, a take at a time into a free slot; ``send(slot)`` hands it on."""
        from edgeopt.agent.windowing import Windower

        w = Windower("imu", self.model.pre)
        try:
            self._read(w, send)
        finally:
            send(STOP)

    def _read(self, w, send) -> None:
        from edgeopt.agent.windowing import WindowBatch

        blocks: list = []
        have = 0
        with open(self.npy, "rb") as f:
            np.lib.format.read_magic(f)  # np.save writes version 1.0
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            assert dtype == np.float32, dtype
            channels = shape[1]
            buf = np.empty((4096, channels), np.float32)
            done = 0
            while True:
                n = f.readinto(memoryview(buf).cast("B")) // (4 * channels)
                if not n:
                    break
                block = w.push(buf[:n], (done + np.arange(n)) / 50.0)
                done += n
                blocks.append(block)
                have += len(block)
                while have >= TAKE:
                    k = self.free.get()
                    need, parts = TAKE, []
                    while need:
                        b = blocks[0]
                        if len(b) <= need:
                            parts.append(blocks.pop(0))
                            need -= len(b)
                        else:
                            parts.append(b[:need])
                            blocks[0] = b[need:]
                            need = 0
                    have -= TAKE
                    np.concatenate([p.data for p in parts], out=self.ins[k])
                    self.labels[k] = WindowBatch(parts).labels()
                    if not self.first:
                        self.first = time.perf_counter()
                    send(k)

    def write(self, receive) -> None:
        """Encode each inferred take (``receive()`` gives its slot) and append it to the file."""
        from edgeopt.agent.results import encode_results

        meta = {"device": "bench", "model": {"name": "imu", "version": "1"}}
        with open(self.out, "wb") as f:
            while (k := receive()) != STOP:
                outputs = {self.model.output_names[0]: self.outs[k].copy()}
                labels, self.labels[k] = self.labels[k], None
                self.free.put(k)
                f.write(encode_results(meta, labels, outputs).lines().encode())
                self.windows += TAKE

    def infer(self, k: int) -> None:
        run, name, x, y = self.model.runtime._run, self.model.input_name, self.ins[k], self.outs[k]
        for c in range(0, TAKE, CALL):
            y[c:c + CALL] = run({name: x[c:c + CALL]})[0].reshape(CALL, -1)

    def threaded(self) -> dict:
        """Inference on a thread of this process: the agent's design."""
        to_model: queue.SimpleQueue = queue.SimpleQueue()
        to_writer: queue.SimpleQueue = queue.SimpleQueue()

        def inference() -> None:
            cpu = 0.0
            while (k := to_model.get()) != STOP:
                c0 = time.thread_time()
                self.infer(k)
                cpu += time.thread_time() - c0
                to_writer.put(k)
            self.call_cpu_s = cpu
            to_writer.put(STOP)

        return self._run([threading.Thread(target=self.source, args=(to_model.put,)),
                          threading.Thread(target=inference), threading.Thread(target=self.write, args=(to_writer.get,))])

    def forked(self) -> dict:
        """Inference in a worker forked after the model loaded, on the shared buffers; a byte per take
        through a pipe each way (no thread of this process is running when it forks)."""
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        cpu_r, cpu_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: nothing but the model's calls; never back into the parent's code
            try:
                cpu = 0.0
                while (k := os.read(down_r, 1)[0]) != STOP:
                    c0 = time.thread_time()
                    self.infer(k)
                    cpu += time.thread_time() - c0
                    os.write(up_w, bytes([k]))
                os.write(cpu_w, repr(cpu).encode())
                os.write(up_w, bytes([STOP]))
            finally:
                os._exit(0)
        for fd in (down_r, up_w, cpu_w):
            os.close(fd)
        try:
            result = self._run([threading.Thread(target=self.source, args=(lambda k: os.write(down_w, bytes([k])),)),
                                threading.Thread(target=self.write, args=(lambda: os.read(up_r, 1)[0],))], pid)
            result["call_cpu_us_per_window"] = float(os.read(cpu_r, 64)) / self.windows * 1e6
        finally:
            os.waitpid(pid, 0)
            for fd in (down_w, up_r, cpu_r):
                os.close(fd)
        return result

    def _run(self, threads: list[threading.Thread], worker: int | None = None) -> dict:
        for t in threads:
            t.start()
        peak = 0.0
        while threads[0].is_alive():
            time.sleep(0.1)
            if worker:
                with contextlib.suppress(OSError):  # the worker has just exited
                    peak = max(peak, private_mib(worker))
        for t in threads:
            t.join()
        span = time.perf_counter() - self.first
        return {"windows": self.windows, "windows_per_s": self.windows / span,
                "call_cpu_us_per_window": self.call_cpu_s / self.windows * 1e6, "worker_private_mib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", choices=["tflite", "onnx"], default="tflite")
    ap.add_argument("--samples", type=int, default=24_000_000, help="replay length in samples (default 24M: 750k windows)")
    ap.add_argument("--rounds", type=int, default=3)
    add_out_option(ap)
    args = ap.parse_args()

    from edgeopt.agent.model import load_model
    from edgeopt.agent.sources.synthetic import imu_stream
    from edgeopt.agent.windowing import Windower

    with tempfile.TemporaryDirectory(prefix="agent-processes-") as tmp:
        work = Path(tmp)
        artifact = build(work, args.format)[32]
        samples, _ = imu_stream(args.samples, 50.0, 3, seed=7)
        npy = work / "stream.npy"
        np.save(npy, samples)
        model = load_model(artifact, None, threads=1)
        windows = Windower("b", model.pre).push(samples, np.arange(len(samples)) / 50.0).data
        del samples
        runs: dict[str, list[dict]] = {"thread": [], "process": []}
        bare: list[float] = []
        bare_cpu: list[float] = []
        for _ in range(args.rounds):  # interleaved: load on a shared machine hits every variant alike
            rate, cpu = bare_loop(artifact, windows, CALL)
            bare.append(rate)
            bare_cpu.append(cpu)
            for name in runs:
                pipe = Pipeline(model, npy, work / f"{name}.jsonl")
                runs[name].append(pipe.threaded() if name == "thread" else pipe.forked())

    ratios = {n: [r["windows_per_s"] / b for r, b in zip(rs, bare, strict=True)] for n, rs in runs.items()}

    def spread(values: list[float], fmt: str = "{:.2f}") -> str:
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    rows = [["bare loop", f"{statistics.median(bare):,.0f}", "1", spread(bare_cpu), ""]]
    for name, label in (("thread", "inference on a thread (the agent's design)"),
                        ("process", "inference in a forked worker process")):
        rows.append([label, f"{statistics.median(r['windows_per_s'] for r in runs[name]):,.0f}", spread(ratios[name]),
                     spread([r["call_cpu_us_per_window"] for r in runs[name]]),
                     f"{max(r['worker_private_mib'] for r in runs[name]):.1f}" if name == "process" else ""])
    print_table(f"{args.format}, batch {CALL}, takes of {TAKE}, {runs['thread'][0]['windows']:,} windows, "
                f"{args.rounds} interleaved rounds: median (min-max)",
                ["pipeline", "windows/s", "x bare loop", "model calls' CPU µs/window", "worker's own memory, peak MiB"],
                rows)
    write_json("agent_processes", {"format": args.format, "rounds": args.rounds, "bare_windows_per_s": bare,
                                   "bare_cpu_us_per_window": bare_cpu, "runs": runs, "vs_bare": ratios})


if __name__ == "__main__":
    main()
