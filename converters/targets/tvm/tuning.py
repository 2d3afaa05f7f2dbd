"""MetaSchedule tuning of a Relax module with a trial budget, on this host.

Three departures from ``tune_relax``'s defaults, all for speed on small machines:

- only kernels with a reduction (conv, matmul, pooling, mean: the ones with an "anchor block") are
  tuned; purely elementwise / data-movement kernels keep TVM's default schedule. This is what TVM's
  own auto-scheduler did (``extract_tasks(include_simple_tasks=False)``); MetaSchedule dropped the
  switch. Here it matters: an unrolled LSTM fuses its 32 gate steps and the concat of their outputs
  into one injective kernel whose initial population alone took over 6 minutes to sample, and a
  64-trial budget spent on reshapes and gathers buys nothing;
- builds run in this process (``InProcessBuilder``): TVM's LocalBuilder starts a fresh worker pool
  for every batch of candidates and each worker re-imports ``tvm.s_tir.tensor_intrin`` (tens of
  seconds of TVMScript parsing), which dominated tuning time here;
- the cost model is XGBoost when it is installed, else random (``xgboost`` is an optional extra of
  TVM's own); the search strategy is the default evolutionary search either way.

The tuning database (JSON) and MetaSchedule's logs are kept in the work directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

from edgeopt.converters.passes import ProgressFactory


def tune(mod, target, trials: int, work_dir: Path, progress: ProgressFactory, seed: int = 0):
    """Tune ``mod``'s kernels with a reduction for ``target`` with at most ``trials`` measured
    candidates; returns the database and ``{"tuned": [...], "default_schedule": [...]}`` (kernel names)."""
    import logging

    import tvm
    from tvm.relax import pipeline
    from tvm.s_tir import meta_schedule as ms

    # The same preparation compile_relax applies before looking schedules up, so database keys match.
    with target:
        lowered = tvm.transform.Sequential(pipeline.library_dispatch_passes(target)
                                           + pipeline.legalize_passes(target))(mod)
    tasks, simple = split_simple_tasks(ms.relax_integration.extract_tasks(lowered, target))
    kernels = {"tuned": [_short(t.task_name) for t in tasks], "default_schedule": [_short(t.task_name) for t in simple]}
    work_dir.mkdir(parents=True, exist_ok=True)
    # MetaSchedule logs every round (tables of tasks) to stdout at INFO; the progress bar says enough.
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    database = ms.database.JSONDatabase(work_dir=str(work_dir))
    if not tasks:
        return database, kernels
    # The search runs on TVM's default thread count (physical cores); candidates are measured one at
    # a time with the threads the target asks for.
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(tasks, str(work_dir), seed=seed)
    per_iter = max(1, min(64, trials // max(1, len(tasks)) or 1))
    # Candidates run in runner subprocesses, which take their thread count from TVM_NUM_THREADS:
    # measure them on the cores they are planned for (the target's num-cores), not on all of them.
    cores = target.attrs.get("num-cores")
    with progress(f"tuning {len(tasks)} of {len(tasks) + len(simple)} kernels", trials) as tick, \
            _environ(TVM_NUM_THREADS=str(int(cores)) if cores else None):
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=str(work_dir), max_trials_global=trials,
            num_trials_per_iter=per_iter, builder=_in_process_builder(), runner=ms.runner.LocalRunner(timeout_sec=120),
            database=database, cost_model=cost_model(),
            measure_callbacks=[*ms.MeasureCallback.create("default"), _progress_callback(tick)],
        )
    return database, kernels


def cost_model() -> str:
    """MetaSchedule's cost model here: "xgb" when ``xgboost`` is importable, else "random"."""
    return "xgb" if importlib.util.find_spec("xgboost") else "random"


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def split_simple_tasks(tasks: list) -> tuple[list, list]:
    """(tasks with a reduction, the rest): a kernel without a reduction block has no anchor block."""
    from tvm.s_tir.analysis import find_anchor_sblock

    has_anchor = [find_anchor_sblock(t.dispatched[0]) is not None for t in tasks]
    return ([t for t, a in zip(tasks, has_anchor, strict=True) if a],
            [t for t, a in zip(tasks, has_anchor, strict=True) if not a])


def _short(name: str, limit: int = 80) -> str:
    """A kernel name for the report: fused kernels are named after every op they fuse (500+ characters)."""
    return name if len(name) <= limit else name[:limit - 1] + "…"


def _in_process_builder():
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for item in build_inputs:
                try:
                    results.append(BuilderResult(default_export(default_build(item.mod, item.target, None)), None))
                except Exception as exc:  # a candidate schedule that does not compile: reported, not fatal
                    results.append(BuilderResult(None, f"in-process build failed: {exc}"))
            return results

    return InProcessBuilder()


def _progress_callback(tick):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class ProgressCallback(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            tick(len(measure_candidates))

    return ProgressCallback()
