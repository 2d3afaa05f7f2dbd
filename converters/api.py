"""The Python API: ``edgeopt.convert``, ``edgeopt.analyze`` and ``edgeopt.optimize``.

The same work as the CLI commands (which build the same option objects), as functions with keyword
arguments that return result objects; docs/python.md has a worked example. Errors are the CLI's:
``edgeopt.errors.UserInputError`` for bad input (nothing written), ``ConvertCheckFailed`` when a check
fails after the artifact was written (``check=False`` returns the result instead).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgeopt.converters.analyze import AnalyzeOptions
from edgeopt.converters.analyze import analyze as _analyze
from edgeopt.converters.optimize import OptimizeOptions
from edgeopt.converters.optimize import optimize as _optimize
from edgeopt.converters.passes import ProgressFactory, no_progress
from edgeopt.converters.pipeline import ConvertCheckFailed, ConvertOptions, ConvertResult
from edgeopt.converters.pipeline import convert as _convert
from edgeopt.converters.recipe import apply_recipe, load_recipe
from edgeopt.errors import UserInputError
from edgeopt.profiles import load_profile
from edgeopt.progress import make_progress

__all__ = ["Analysis", "ConvertCheckFailed", "ConvertResult", "Optimization", "analyze", "convert", "optimize"]


def _options(cls: type, given: dict[str, Any], what: str) -> Any:
    names = {f.name for f in fields(cls)}
    if unknown := sorted(set(given) - names):
        raise UserInputError(f"edgeopt.{what}(): no option {', '.join(map(repr, unknown))} "
                             f"(options: {', '.join(sorted(names))})")
    return cls(**given)


def _progress(show: bool) -> ProgressFactory:
    return make_progress(True) if show else no_progress


def convert(model: str | Path, output: str | Path, *, check: bool = True, progress: bool = False,
            recipe: str | Path | dict[str, Any] | None = None, **options: Any) -> ConvertResult:
    """Convert ``model`` into the artifact directory ``output``; ``options`` are ``ConvertOptions``
    fields (``target``, ``profile``, ``quantize``, ``calibration``, ``validation``, ``max_accuracy_drop``,
    ``min_cosine``, ``prune_channels``, ``pass_params``, ...); ``recipe`` a recipe file, an artifact
    (its settings) or a dict laid out as the file is (docs/converter.md, "Recipes"), under the options
    given here. Returns the result (``.report``, ``.manifest``, ``.output``); a failed check raises
    ``ConvertCheckFailed`` (its ``.result`` holds the written artifact's) unless ``check=False``."""
    opts = _options(ConvertOptions, {"model": Path(model), "output": Path(output), **options}, "convert")
    if recipe is not None:
        settings, where = (recipe, "recipe") if isinstance(recipe, dict) else load_recipe(Path(recipe))
        opts = apply_recipe(opts, settings, where, frozenset(options))
    try:
        return _convert(opts, progress=_progress(progress))
    except ConvertCheckFailed as exc:
        if check:
            raise
        return exc.result


@dataclass(frozen=True)
class Analysis:
    """``edgeopt.analyze``'s result: every quantized node, most sensitive first."""

    layers: list[dict[str, Any]]  # {"node", "op", "sensitivity", "cosine", "max_abs_err", "top1_agreement"}
    float_vs_int8: dict[str, Any] | None  # the all-INT8 model against the float one (None: target coreml)
    raw: dict[str, Any]  # what `edgeopt analyze --json` prints

    def most_sensitive(self, n: int = 3) -> list[str]:
        """The node names to pass to ``convert(..., pass_params={"quantize-int8": {"keep_float": ...}})``."""
        return [row["node"] for row in self.layers[:n]]


def analyze(model: str | Path, calibration: str | Path | None = None, *, validation: str | Path | None = None,
            profile: str | None = None, progress: bool = False, **options: Any) -> Analysis:
    """Per-node INT8 sensitivity of ``model`` with the quantizer ``target`` ships (default ``"onnx"``:
    ONNX Runtime QDQ, as for tvm; ``"tflite"``: LiteRT's; ``"coreml"``: each compressed weight's own
    error, no data read); ``options`` are ``AnalyzeOptions`` fields (``target``, ``validation_samples``,
    ``input_shapes``, ``weights_only``)."""
    given = {"model": Path(model), "calibration": None if calibration is None else Path(calibration),
             "validation": None if validation is None else Path(validation),
             "profile": load_profile(profile) if profile else None, **options}
    raw = _analyze(_options(AnalyzeOptions, given, "analyze"), progress=_progress(progress))
    return Analysis(layers=raw["layers"], float_vs_int8=raw["float_vs_int8"], raw=raw)


@dataclass(frozen=True)
class Optimization:
    """``edgeopt.optimize``'s result: every candidate measured, the front, the best artifact."""

    candidates: list[dict[str, Any]]  # as in pareto.json
    best: str | None  # the best feasible candidate's name
    best_path: Path | None  # its copy, OUTPUT/best
    raw: dict[str, Any]  # pareto.json

    @property
    def front(self) -> list[dict[str, Any]]:
        return [c for c in self.candidates if c["pareto"]]


def optimize(model: str | Path, output: str | Path, *, profile: str, validation: str | Path,
             progress: bool = False, **options: Any) -> Optimization:
    """Every recipe ``profile``'s board takes, converted and measured (``edgeopt optimize``); ``options``
    are ``OptimizeOptions`` fields (``calibration``, ``max_accuracy_drop``, ``min_cosine``, ``objective``,
    ``targets``, ``quantize``, ``prune``, ``jobs``, ...)."""
    given = {"model": Path(model), "output": Path(output), "profile": profile, "validation": Path(validation),
             **{k: Path(v) if k in ("calibration", "distill") and v is not None else v for k, v in options.items()}}
    raw = _optimize(_options(OptimizeOptions, given, "optimize"), progress=_progress(progress))
    best = raw["best"]
    return Optimization(candidates=raw["candidates"], best=best,
                        best_path=None if best is None else Path(output) / "best", raw=raw)
