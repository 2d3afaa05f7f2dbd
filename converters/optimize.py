"""Recipe search for ``edgeopt optimize``: every recipe a board can take, converted and measured, and the
Pareto front of size or latency against accuracy.

Candidates are the profile's formats (targets) × quantize modes × structured pruning ratios (with
``--distill``, pruned candidates are fine-tuned on that data). Each is one ``edgeopt convert`` with the
accuracy budget (so an INT8 candidate keeps the fewest layers float that meet it: mixed precision) in
a worker process (``--jobs``), written to ``DIR/candidates/NAME/`` with its report. Then every
candidate that runs on this host is timed **side by side** in this process (``edgeopt.bench.measure``:
1 thread, batch 1, the runtimes taking turns round by round), so that the latencies compare whatever
the workers were doing. The loss is the accuracy drop with labelled validation data, else
``1 - cosine`` against the original; the front is the candidates no other evaluated candidate beats
on both the objective and the loss; ``best`` is the feasible one (budget met, fits the board) with the
smallest objective, copied to ``DIR/best/``.

A rerun skips every candidate whose inputs (model, data, recipe, budget, edgeopt version) are
unchanged (``DIR/candidates/NAME.json`` keeps the key and the result). Ctrl-C keeps what finished and
writes ``pareto.json`` for it (``"complete": false``).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from edgeopt import bench
from edgeopt.converters.passes import ProgressFactory, no_progress
from edgeopt.converters.pipeline import ConvertCheckFailed, ConvertOptions, convert
from edgeopt.converters.targets import get_target
from edgeopt.errors import EdgeoptError, UserInputError
from edgeopt.fsutil import atomic_write_json, sha256_file
from edgeopt.profiles import Profile, load_profile
from edgeopt.runtime import open_runtime

OBJECTIVES = ("latency", "size")
DEFAULT_PRUNE = (0.0, 0.5)
PARETO = "pareto.json"
CALIBRATED = ("int8", "int16x8")  # quantize modes that need calibration data


@dataclass(frozen=True)
class Candidate:
    target: str
    quantize: str
    prune: float = 0.0  # structured channel pruning ratio

    @property
    def name(self) -> str:
        return f"{self.target}-{self.quantize}" + (f"-prune{round(self.prune * 100)}" if self.prune else "")


@dataclass
class OptimizeOptions:
    model: Path
    output: Path
    profile: str
    validation: Path
    calibration: Path | None = None
    max_accuracy_drop: float | None = None
    min_cosine: float | None = None
    objective: str = "latency"
    targets: Sequence[str] | None = None  # default: the profile's formats
    quantize: Sequence[str] | None = None  # default: every mode of each target (calibrated ones need --calibration)
    prune: Sequence[float] = DEFAULT_PRUNE
    distill: Path | None = None
    epochs: int | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    input_values: dict[str, str] = field(default_factory=dict)
    jobs: int = 1
    rounds: int = 5  # latency rounds (interleaved)


def candidates(opts: OptimizeOptions, profile: Profile) -> list[Candidate]:
    targets = list(opts.targets or profile.formats)
    if unknown := [t for t in targets if t not in profile.formats]:
        raise UserInputError(f"--targets {','.join(unknown)}: profile '{profile.name}' takes "
                             f"{', '.join(profile.formats)}")
    out = []
    for target in targets:
        modes = get_target(target).quantize_modes
        micro = profile.runtime == "tflite-micro"  # full-integer int8 only (docs/tflite-micro.md)
        modes = ("int8",) if micro else modes
        wanted = [q for q in (opts.quantize or modes) if q in modes]
        if opts.quantize is None and opts.calibration is None and not micro:
            wanted = [q for q in wanted if q not in CALIBRATED]
        out += [Candidate(target, q, p) for q in wanted for p in opts.prune]
    if not out:
        raise UserInputError(f"no candidate: --quantize {','.join(opts.quantize or [])} is not a mode of "
                             f"{', '.join(targets)}")
    if opts.calibration is None and (needs := sorted({c.quantize for c in out if c.quantize in CALIBRATED})):
        raise UserInputError(f"--quantize {','.join(needs)} needs calibration data: pass --calibration DATA")
    return out


def convert_options(opts: OptimizeOptions, c: Candidate, out: Path) -> ConvertOptions:
    return ConvertOptions(
        model=opts.model, output=out, target=c.target, profile=opts.profile, quantize=c.quantize,
        calibration=opts.calibration if c.quantize in CALIBRATED else None, validation=opts.validation,
        max_accuracy_drop=opts.max_accuracy_drop, min_cosine=opts.min_cosine, input_shapes=dict(opts.input_shapes),
        input_values=dict(opts.input_values), force=True, prune_channels=c.prune or None,
        distill=opts.distill if c.prune else None, epochs=opts.epochs if c.prune and opts.distill else None)


def _convert_one(opts: OptimizeOptions, c: Candidate, out: Path) -> dict[str, Any]:
    """One candidate, in a worker process: its report, or the one-line error that stopped it."""
    try:
        return {"report": convert(convert_options(opts, c, out)).report}
    except ConvertCheckFailed as exc:  # written, a check failed: still a point (infeasible)
        return {"report": exc.result.report}
    except EdgeoptError as exc:
        return {"error": str(exc).splitlines()[0]}
    except Exception as exc:  # a bug on one candidate's path must not lose the others' hours of work
        first = (str(exc).splitlines() or [""])[0]
        return {"error": f"internal error (a bug in edgeopt): {type(exc).__name__}: {first}"}


def _key(opts: OptimizeOptions, c: Candidate) -> str:
    try:
        tool = version("edgeopt")
    except PackageNotFoundError:
        tool = "unknown"
    files = {k: sha256_file(p) if p is not None else None
             for k, p in (("model", opts.model), ("calibration", opts.calibration), ("validation", opts.validation),
                          ("distill", opts.distill))}
    facts = {"candidate": asdict(c), "files": files, "edgeopt": tool, "profile": opts.profile,
             "max_accuracy_drop": opts.max_accuracy_drop, "min_cosine": opts.min_cosine, "epochs": opts.epochs,
             "input_shapes": {k: list(v) for k, v in opts.input_shapes.items()}, "input_values": opts.input_values}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def _row(c: Candidate, result: dict[str, Any], cached: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"name": c.name, "recipe": asdict(c), "cached": cached}
    if "error" in result:
        return {**row, "error": result["error"], "size_bytes": None, "latency_ms": None, "accuracy_drop": None,
                "cosine": None, "fits": None, "feasible": False, "pareto": False}
    report = result["report"]
    row.update(status=report["status"], size_bytes=report["artifact"]["size_bytes"], latency_ms=None,
               accuracy_drop=report["accuracy"]["drop"], cosine=report["parity"]["cosine"], fits=report["fit"]["ok"],
               feasible=not report["failures"], failures=report["failures"], pareto=False,
               mixed_precision=[k["node"] for k in (report.get("mixed_precision") or {}).get("kept", [])],
               report_latency_ms=report["latency"]["p50_ms"])
    return row


def loss(row: dict[str, Any], labelled: bool) -> float | None:
    """What the front trades against the objective: accuracy points lost, else 1 - cosine."""
    if labelled:
        return row["accuracy_drop"]
    return None if row["cosine"] is None else 1.0 - row["cosine"]


def pareto_front(rows: list[dict[str, Any]], objective: str, labelled: bool) -> list[dict[str, Any]]:
    """The rows no other row is at least as good as on both the objective and the loss, and better on one."""
    key = "latency_ms" if objective == "latency" else "size_bytes"
    points = [(r, r[key], loss(r, labelled)) for r in rows]
    points = [(r, o, lo) for r, o, lo in points if o is not None and lo is not None]
    front = []
    for r, o, lo in points:
        if not any(o2 <= o and l2 <= lo and (o2 < o or l2 < lo) for _, o2, l2 in points):
            front.append(r)
    return front


def optimize(opts: OptimizeOptions, progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """Convert and measure every candidate; write ``pareto.json``, every candidate's artifact and
    ``best/``. Returns the pareto.json payload."""
    if opts.objective not in OBJECTIVES:
        raise UserInputError(f"--objective {opts.objective}: one of {', '.join(OBJECTIVES)}")
    profile = load_profile(opts.profile)
    todo = candidates(opts, profile)
    out = Path(opts.output)
    _check_output(out)
    work = out / "candidates"
    work.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    pending = []
    for c in todo:
        key, record = _key(opts, c), work / f"{c.name}.json"
        cached = json.loads(record.read_text()) if record.is_file() else None
        if cached and cached.get("key") == key and ("error" in cached["result"] or (work / c.name).is_dir()):
            rows[c.name] = _row(c, cached["result"], cached=True)
        else:
            pending.append((c, key))
    complete = False
    try:
        with progress("converting candidates", len(pending)) as tick:
            for c, key, result in _run(opts, pending, work, max(1, opts.jobs)):
                atomic_write_json(work / f"{c.name}.json", {"key": key, "result": result})
                rows[c.name] = _row(c, result, cached=False)
                tick(1, status=c.name)
        complete = True
    finally:  # Ctrl-C keeps what finished, and says so
        ordered = [rows[c.name] for c in todo if c.name in rows]
        if complete:
            _measure_latency(ordered, work, opts.rounds, progress)
        payload = _summarise(opts, profile, ordered, complete)
        atomic_write_json(out / PARETO, payload)
    if payload["best"] is not None:
        _copy_best(work / payload["best"], out / "best")
    return payload


def _run(opts: OptimizeOptions, pending: list[tuple[Candidate, str]], work: Path, jobs: int):
    if jobs == 1:
        for c, key in pending:
            yield c, key, _convert_one(opts, c, work / c.name)
        return
    # spawn: the parent has ONNX Runtime's and LiteRT's threads; a forked child could inherit a held lock
    pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(_convert_one, opts, c, work / c.name): (c, key) for c, key in pending}
        for fut in concurrent.futures.as_completed(futures):
            c, key = futures[fut]
            yield c, key, fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _measure_latency(rows: list[dict[str, Any]], work: Path, rounds: int, progress: ProgressFactory) -> None:
    """p50 per call of every candidate that runs here, measured side by side in this process."""
    runtimes, measured = [], []
    for row in rows:
        if row.get("error"):
            continue
        try:
            runtimes.append(open_runtime(work / row["name"], threads=1))
            measured.append(row)
        except EdgeoptError as exc:  # a format this host cannot run (Core ML off macOS, a board's TVM build)
            row["latency_note"] = str(exc).splitlines()[0]
            if row.get("report_latency_ms") is not None:
                # A board's TVM library: its conversion timed a build of the same module for this host
                # (1 thread, batch 1, as here), in its own run rather than side by side with these.
                row["latency_ms"] = row["report_latency_ms"]
                row["latency_note"] += "; latency: the conversion's host build of the same model, not side by side"
    if not runtimes:
        return
    with progress("timing candidates side by side", None):
        feeds = [bench.batch_feeds(rt, rt.fixed_batch or 1) for rt in runtimes]
        stats = bench.measure(runtimes, feeds, bench.BenchSettings(rounds=rounds, min_round_time=0.1))
    for row, s in zip(measured, stats, strict=True):
        row["latency_ms"] = s.p50_ms


def _summarise(opts: OptimizeOptions, profile: Profile, rows: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
    labelled = any(r.get("accuracy_drop") is not None for r in rows)
    front = pareto_front(rows, opts.objective, labelled)
    for r in front:
        r["pareto"] = True
    key = "latency_ms" if opts.objective == "latency" else "size_bytes"
    feasible = [r for r in front if r["feasible"] and r["fits"] is not False]
    best = min(feasible, key=lambda r: (r[key], loss(r, labelled)), default=None)
    return {"schema": "edgeopt.pareto/1", "model": str(opts.model), "profile": profile.name,
            "objective": opts.objective, "loss": "accuracy_drop" if labelled else "1 - cosine",
            "budget": {"max_accuracy_drop": opts.max_accuracy_drop, "min_cosine": opts.min_cosine},
            "complete": complete, "candidates": rows, "best": None if best is None else best["name"]}


def _check_output(out: Path) -> None:
    """An optimize directory is reused (its cache); anything else that exists is not ours to write into."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "candidates").is_dir()
                                              and not (out / PARETO).is_file())):
        raise UserInputError(f"{out} exists and is not an `edgeopt optimize` output directory; choose another -o")


def _copy_best(src: Path, dest: Path) -> None:
    """``best/`` replaced as a whole: copied beside it, then swapped in."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
