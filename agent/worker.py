"""The model's calls in a worker process forked from the agent once the model is loaded (issue 18).

On a thread of the agent, the model's calls wait for the GIL after each one while the source and
writer threads run Python: measured on 2-vCPU machines the LiteRT agent tops out at ~0.75x a bare
loop calling the interpreter, while the same pipeline with the calls in a forked worker reaches
0.92x, its calls at the bare loop's CPU speed (docs/benchmarks.md, "Issue 18";
benchmarks/agent_processes.py). So, where the model allows it, the pipeline hands each take of
windows to a worker: the windows are copied into a slot of a shared-memory ring made before the
fork (``mmap`` MAP_SHARED, no pickling), a few bytes through a pipe say which slot and how many rows;
the worker runs the calls and writes the outputs and each call's seconds into the slot, and answers
through a second pipe. The pipeline keeps up to ``SLOTS`` takes in flight, so the worker always has
the next one while the agent's threads deal with the last.

multiprocessing does not fit: its pools pickle every batch and spawn or fork-server processes that
load the model again (tens of MiB); a plain ``os.fork`` shares the loaded model's pages with the
agent, and the worker's own memory is what the agent writes over afterwards (~6-8 MiB measured).

The worker is forked from the agent's main thread while other threads may run (the MQTT client's,
the result writer's), so it touches nothing another thread might have held at the fork: no logging,
no imports, no locks, no garbage collection (``gc.disable``: a collection would also write to every
object's page and copy it), only the model's runtime (which only the forking thread ever calls),
numpy, and ``os.read``/``os.write``. The runtimes that may run there say so (``Runtime.fork_safe``:
no threads of their own at 1 thread). Signals the agent handles are ignored in the worker (SIGTERM
to the service's process group stops the agent, which then closes the pipe); it exits when the pipe
closes, so it never outlives the agent. A worker that dies or fails a call hands its takes back to
the agent's thread (``Pipeline``), which runs them as it would without a worker.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import signal
import struct
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from edgeopt.agent.model import LoadedModel
from edgeopt.agent.windowing import WindowBatch

SLOTS = 2  # takes in flight: the one the worker runs and the next one, ready for it
_ASK = struct.Struct("<III")  # slot, rows (padded to whole calls for a fixed-batch model), rows per call
_ANSWER = struct.Struct("<III")  # slot, status, calls made
_OK, _FAILED = 0, 1


class WorkerGone(Exception):
    """The worker process exited (killed, crashed); the message says how."""


def unsuitable(model: LoadedModel) -> str | None:
    """Why ``model`` cannot run in a worker (the pipeline runs it on its own thread then), or None."""
    runtime = model.runtime
    if sys.platform != "linux":  # macOS: forking a process whose other threads run is not safe there
        return f"the inference worker runs on Linux only, not {sys.platform}"
    if len(os.sched_getaffinity(0)) < 2:
        return "one CPU: a second process would only take turns with the agent"
    if not type(runtime).fork_safe:
        return f"runtime {runtime.name} keeps threads of its own"
    if runtime.config.get("threads") != 1:
        return f"{runtime.config.get('threads') or 'the backend default'} inference threads (a worker runs 1)"
    if model.state_pairs:
        return "a stateful model (its state is carried on the agent's thread)"
    if not model.float_io:
        return "the model's input or outputs are not float32"
    if any(not isinstance(d, int) for spec in runtime.outputs for d in spec.sample_shape()):
        return "an output with dynamic dims"
    return None


class InferenceWorker:
    """One forked worker running ``model``'s calls on takes of up to ``take`` windows in calls of
    ``step``; ``send`` a take, ``receive`` its outputs (in the order sent)."""

    def __init__(self, model: LoadedModel, take: int, step: int):
        self.model = model
        self.step = step
        self.rows = -(-take // step) * step  # a slot holds a whole number of calls
        sample = model.sample_shape
        outputs = list(model.runtime.outputs)
        self.output_names = [spec.name for spec in outputs]
        self.kept = [spec.name in model.output_names for spec in outputs]
        # the ring, mapped before the fork so that both processes see the same pages
        self._maps = [mmap.mmap(-1, max(1, SLOTS * self.rows * 4 * int(np.prod(shape, dtype=np.int64))))
                      for shape in (sample, *(tuple(s.sample_shape()) for s in outputs))]
        self._maps.append(mmap.mmap(-1, SLOTS * (self.rows // step) * 8))
        views = [np.frombuffer(m, np.float32 if i < len(self._maps) - 1 else np.float64)
                 for i, m in enumerate(self._maps)]
        self.ins = views[0].reshape(SLOTS, self.rows, *sample)
        self.outs = [v.reshape(SLOTS, self.rows, *s.sample_shape()) for v, s in zip(views[1:-1], outputs, strict=True)]
        self.seconds = views[-1].reshape(SLOTS, self.rows // step)
        self._free = list(range(SLOTS - 1, -1, -1))
        self.pid = 0
        self._running = False  # forked and not yet waited for
        self._fork()

    # -- the agent's side ------------------------------------------------------------------------------
    def _fork(self) -> None:
        down_r, self._down = os.pipe()
        self._up, up_w = os.pipe()
        handled = [s for s in signal.valid_signals() if callable(signal.getsignal(s))]
        # blocked across the fork: the worker must never run the agent's Python signal handlers
        old = signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        try:
            with warnings.catch_warnings():
                # Python >= 3.12 warns on forking a process with threads; see the module docstring
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:
                try:
                    for s in handled:
                        signal.signal(s, signal.SIG_IGN)
                    signal.pthread_sigmask(signal.SIG_SETMASK, old)
                    os.close(self._down)
                    os.close(self._up)
                    self._serve(down_r, up_w)
                finally:
                    os._exit(0)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self.pid, self._running = pid, True
        os.close(down_r)
        os.close(up_w)

    def send(self, batch: WindowBatch) -> None:
        """Copy the windows of ``batch`` into a free slot and hand it to the worker. A fixed-batch model's last call is padded with the last window (its outputs are dropped)."""
        slot = self._free.pop()
        dst, n = self.ins[slot], len(batch)
        at = 0
        for block in batch.blocks:
            dst[at:at + len(block)] = block.data.reshape(len(block), *dst.shape[1:])
            at += len(block)
        rows = n
        if self.model.fixed_batch and n % self.step:
            rows = n + self.step - n % self.step
            dst[n:rows] = dst[n - 1]
        try:
            self.model.check_call_sizes(dst[:rows], self.step)
            os.write(self._down, _ASK.pack(slot, rows, self.step))
        except OSError:
            self._free.append(slot)
            raise WorkerGone(self._exit_status()) from None
        except BaseException:
            self._free.append(slot)
            raise

    def receive(self, n: int) -> tuple[dict[str, np.ndarray], list[tuple[int, float]]] | None:
        """The outputs of the oldest take sent (``n`` windows) with (windows, seconds) per call, or None
        when a call failed (the caller runs the take itself, to say why)."""
        answer = os.read(self._up, _ANSWER.size)  # the GIL is released while it waits
        if len(answer) < _ANSWER.size:
            raise WorkerGone(self._exit_status())
        slot, status, calls = _ANSWER.unpack(answer)
        self._free.append(slot)
        if status != _OK:
            return None
        outputs = {name: out[slot, :n].copy()
                   for name, out, kept in zip(self.output_names, self.outs, self.kept, strict=True) if kept}
        seconds = self.seconds[slot]
        return outputs, [(min(self.step, n - k * self.step), float(seconds[k])) for k in range(calls)]

    def private_bytes(self) -> int:
        """The worker's own memory (pages it shares with the agent are the agent's): its USS, read from
        /proc (0 once it is gone)."""
        try:
            lines = Path(f"/proc/{self.pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            return 0
        return sum(int(line.split()[1]) for line in lines if line.startswith("Private_")) * 1024

    def _exit_status(self) -> str:
        try:
            pid, status = os.waitpid(self.pid, 0) if self._running else (0, 0)
        except ChildProcessError:
            pid = 0
        if pid == 0:
            return "it is gone"
        self._running = False
        if os.WIFSIGNALED(status):
            return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        return f"exit status {os.WEXITSTATUS(status)}"

    def close(self, timeout: float = 2.0) -> None:
        """Stop the worker (it exits when its pipe closes; killed if it has not after ``timeout``)."""
        with contextlib.suppress(OSError):
            os.close(self._down)
        deadline = time.monotonic() + timeout
        while self._running:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                break
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                break
            time.sleep(0.005)
        self._running = False
        with contextlib.suppress(OSError):
            os.close(self._up)

    # -- the worker's side ------------------------------------------------------------------------------
    def _serve(self, down: int, up: int) -> None:
        """The worker's loop: run the calls of each take it is told of, until the pipe closes."""
        gc.disable()
        read, write, clock = os.read, os.write, time.perf_counter
        run, name, ins, outs, seconds = self.model.runtime._run, self.model.input_name, self.ins, self.outs, self.seconds
        pairs = list(enumerate(outs))
        while len(ask := read(down, _ASK.size)) == _ASK.size:
            slot, rows, step = _ASK.unpack(ask)
            x, times, calls, status = ins[slot], seconds[slot], 0, _OK
            try:
                for start in range(0, rows, step):
                    t0 = clock()
                    results = run({name: x[start:start + step]})
                    times[calls] = clock() - t0
                    calls += 1
                    for i, out in pairs:
                        out[slot, start:start + len(results[i])] = results[i]
            except Exception:  # the agent's thread runs the take again and reports the failure
                status = _FAILED
            write(up, _ANSWER.pack(slot, status, calls))
