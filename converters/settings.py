"""No silent settings: a setting the chosen target would not use is refused by name, before any work.

A target declares what it uses (``Target.honoured_pass_params``, ``calibrates``, ``unused_params``);
this module compares that with what was given and says, in one line, which option is unused, by which
target, and where it would apply. Options are named as ``edgeopt convert`` spells them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from edgeopt import registry
from edgeopt.converters.targets import Target, get_target
from edgeopt.errors import UserInputError

# the pass parameters `edgeopt convert` has an option for (the others are set through the API)
PASS_OPTIONS: dict[tuple[str, str], str] = {
    ("quantize-int8", "calibration_method"): "--calibration-method",
    ("quantize-int4", "block_size"): "--int4-block-size",
    ("quantize-fp16", "keep_io_types"): "--fp16-io",
    ("quantize-int8", "keep_float"): "--keep-float",
    ("quantize-int8", "kept_precision"): "--kept-precision",
}


def target_option(param: str) -> str:
    """The ``edgeopt convert`` option of a target parameter (generated from its name)."""
    return "--" + param.replace("_", "-")


def pass_option(pass_name: str, param: str) -> str:
    return PASS_OPTIONS.get((pass_name, param), f"pass '{pass_name}' parameter '{param}'")


def _given(option: str, value: Any) -> str:
    """How the user wrote it: '--int4-block-size 16', or '--fp16-io' for a flag."""
    return option if isinstance(value, bool) or option.startswith("pass ") else f"{option} {value}"


def _targets() -> dict[str, Target]:
    return {name: get_target(name)() for name in registry.names(registry.TARGETS)}


def _where_pass_param_applies(pass_name: str, param: str) -> str:
    found = []
    for name, target in _targets().items():
        modes = [q for q in target.quantize_modes if param in target.honoured_pass_params(q).get(pass_name, ())]
        if modes:
            found.append(f"--target {name} --quantize {'|'.join(modes)}")
    return f"; it applies with {', '.join(found)}" if found else ""


def _where_calibration_applies() -> str:
    found = [f"--target {name} --quantize {'|'.join(modes)}" for name, target in _targets().items()
             if (modes := [q for q in target.quantize_modes if target.calibrates(q)])]
    return ", ".join(found)


def unused_settings(target: Target, quantize: str, target_params: Mapping[str, Any],
                    pass_params: Mapping[str, Mapping[str, Any]], pipeline_passes: Iterable[str]) -> list[str]:
    """One line per given setting that ``target`` would not use for ``quantize`` ([] when all are used).

    ``target_params`` / ``pass_params``: what was given (None values count as not given);
    ``pipeline_passes``: passes the pipeline runs itself whatever the target (canonicalize, compression),
    whose parameters are used as given.
    """
    problems = []
    unused = target.unused_params(quantize)
    for name, value in target_params.items():
        if value is not None and name in unused:
            problems.append(f"{_given(target_option(name), value)}: target '{target.name}' does not use it "
                            f"{unused[name]}")
    honoured = target.honoured_pass_params(quantize)
    run_anyway = set(pipeline_passes)
    for pass_name, params in pass_params.items():
        if pass_name in run_anyway:
            continue
        for param, value in (params or {}).items():
            if value is None or param in honoured.get(pass_name, ()):
                continue
            option = pass_option(pass_name, param)
            problems.append(f"{_given(option, value)}: target '{target.name}' does not use it with --quantize "
                            f"{quantize}{_where_pass_param_applies(pass_name, param)}")
    return problems


def unread_calibration_note(target: Target, quantize: str, calibration: bool, validation: bool) -> str | None:
    """The report's note when calibration data was given but nothing reads it: the target does not
    calibrate for this mode and --validation supplies the validation data. A note, not a refusal:
    scripts pass both data files whatever the mode, and the data changes nothing — but it must not
    look as if it had been used."""
    if not calibration or not validation or target.calibrates(quantize):
        return None
    return (f"--calibration was not read: target '{target.name}' does not calibrate with --quantize {quantize}, and "
            f"the validation data came from --validation (calibration applies with {_where_calibration_applies()})")


def check_target_params(target_name: str, given: Mapping[str, Any]) -> None:
    """Options of another target (possible when the target comes from a profile) are refused by name."""
    known = {p.name for p in get_target(target_name).params}
    for name, value in given.items():
        if value is not None and name not in known:
            owners = [t for t in registry.names(registry.TARGETS) if any(p.name == name for p in get_target(t).params)]
            raise UserInputError(f"{target_option(name)} applies to target {', '.join(owners) or '(none)'}, "
                                 f"not {target_name}")


def check_settings(target: Target, quantize: str, target_params: Mapping[str, Any],
                   pass_params: Mapping[str, Mapping[str, Any]], pipeline_passes: Iterable[str]) -> None:
    """Raise ``UserInputError`` (exit 2) naming the first setting the target would not use."""
    problems = unused_settings(target, quantize, target_params, pass_params, pipeline_passes)
    if problems:
        raise UserInputError(problems[0])


__all__ = ["PASS_OPTIONS", "check_settings", "check_target_params", "pass_option", "target_option",
           "unread_calibration_note", "unused_settings"]


def searches(target: Target, quantize: str) -> bool:
    """Whether ``target`` keeps nodes float to meet an accuracy budget with ``quantize``."""
    return "min_cosine" in target.honoured_pass_params(quantize).get("quantize-int8", ())


def check_mixed_precision_flags(target: Target, quantize: str, budgeted: bool, mixed_precision: bool,
                                int8_given: Mapping[str, Any]) -> None:
    """--no-mixed-precision and --kept-precision only where they change something."""
    if not mixed_precision and (not budgeted or not searches(target, quantize)):
        raise UserInputError(f"--no-mixed-precision applies with --min-cosine or --max-accuracy-drop and --quantize "
                             f"int8 on targets onnx, tvm and tflite, not --quantize {quantize} on target "
                             f"'{target.name}'" + ("" if budgeted else " without either"))
    if int8_given.get("kept_precision") is not None and not (int8_given.get("keep_float") or
                                                             (budgeted and mixed_precision)):
        raise UserInputError(f"--kept-precision applies to the nodes target '{target.name}' keeps out of INT8: give "
                             f"--keep-float NODE, or a budget (--min-cosine / --max-accuracy-drop) for the search "
                             f"to keep the fewest")
