"""Recipes as files: every setting of ``edgeopt convert`` in one TOML file (``--recipe FILE``), one-offs
from the command line (``--set KEY=VALUE``), and an artifact's own settings (``--recipe
DIR/manifest.json``, which reproduces it with the same model and data).

A recipe holds settings, never data: the model, ``--calibration``, ``--validation``, ``--distill``
and ``--student`` come from the command line. Layout::

    target = "tflite"                    # the settings below (RECIPE_KEYS), as `edgeopt convert` names them
    quantize = "int8"
    min_cosine = 0.99
    input_shapes = { x = [1, 64] }       # tables: input_shapes, input_values, batch_axes, state,
                                         # prune_layers, preprocessing
    [targets.tflite]                     # a target's own parameters
    float_io = true
    [passes.quantize-int8]               # a pass's parameters
    calibration_method = "percentile"

The keys are checked against the same declarations the passes and targets use (``Param``) and the
CLI options carry the same names (tests/test_recipe.py checks both ways): an unknown key is named
with the closest known one. A flag given on the command line wins over the recipe; ``--set`` changes
the recipe itself (``--set quantize=int8``, ``--set passes.quantize-int8.calibration_method=entropy``,
or without ``passes.``/``targets.``: ``--set quantize-int8.per_channel=false``). Every conversion
records the recipe that reproduces it in its manifest (``settings``).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeopt import registry
from edgeopt.converters.gates import DEFAULT_MIN_COSINE, DEFAULT_MIN_TOP1_AGREEMENT
from edgeopt.converters.passes import get_pass
from edgeopt.converters.passes.distill import Distill
from edgeopt.converters.targets import QUANTIZE_MODES, get_target
from edgeopt.errors import UserInputError, closest
from edgeopt.params import Param, in_range, reference_table, type_ok


# the settings a recipe holds at its top level: ConvertOptions fields, as the CLI options name them
def _at_least_one(v: int) -> str | None:
    return None if v >= 1 else "must be at least 1"


_EXIT_1 = "exit 1 (artifact kept, report marked failed)"
RECIPE_KEYS: tuple[Param, ...] = (
    Param("target", str, None, "output format: onnx, tflite, coreml or tvm (default: the profile's)"),
    Param("profile", str, None, "hardware profile: a name from `edgeopt profiles list`, or a profile .toml file"),
    Param("quantize", str, None, "quantization mode (default: the profile's, else none)", choices=QUANTIZE_MODES),
    Param("max_accuracy_drop", float, None,
          f"quality gate: {_EXIT_1} when accuracy drops by more than this (percentage points of top-1, or MAE "
          f"increase; needs labels in the validation data); with --quantize int8 also the mixed-precision budget"),
    Param("min_cosine", float, None,
          f"quality gate: {_EXIT_1} when the cosine similarity of the converted model's outputs with the "
          f"original's is below this (without it: a warning below {DEFAULT_MIN_COSINE} when there are no class "
          f"labels); with --quantize int8 also the mixed-precision budget", check=in_range(-1.0, 1.0)),
    Param("min_top1_agreement", float, None,
          f"quality gate: {_EXIT_1} when the converted model picks the original's top class on less than this "
          f"fraction of the validation samples (without it: a warning below {DEFAULT_MIN_TOP1_AGREEMENT} when "
          f"there are no class labels)", check=in_range(0.0, 1.0)),
    Param("mixed_precision", bool, True, "false: a budget only checks, no node is kept float to meet it"),
    Param("validation_samples", int, None,
          "validate on the first N samples of the validation data (default: all), or on N generated inputs when "
          "no data is given (default: 64): less time and memory, a coarser check", check=_at_least_one),
    Param("seed", int, 0, "seed for distillation (split, shuffling) and generated inputs"),
    Param("threads", int, 1, "threads for validation and latency", check=_at_least_one),
    Param("name", str, None, "model name in the manifest (default: the model's file name)"),
    Param("version", str, "1", "model version in the manifest"),
    Param("prune_sparsity", float, None,
          "unstructured pruning: fraction of the Conv/Gemm/MatMul weights set to zero in each pruned layer (or "
          "overall)", check=in_range(0.0, 1.0, hi_open=True)),
    Param("prune_channels", float, None,
          "structured pruning: fraction of the output channels / hidden units removed from each prunable layer, "
          "giving a smaller dense model", check=in_range(0.0, 1.0, hi_open=True)),
    Param("epochs", int, None, f"with --distill: {Distill.param('epochs').help} (default: "
                               f"{Distill.param('epochs').default})", check=Distill.param("epochs").check),
)
# tables at the top level: name -> (what a value is, the CLI option)
RECIPE_TABLES: dict[str, str] = {
    "input_shapes": "input name → its shape, a list of dims (--input-shape)",
    "input_values": "input name → the constant it is frozen to (--input-value)",
    "batch_axes": 'input or output name → the axis samples stack along, or "none" (--batch-axis)',
    "state": "state input → the output that feeds it at the next step (--state)",
    "prune_layers": "node name → its pruning ratio or sparsity (--prune-layer)",
    "preprocessing": "the manifest's preprocessing: window, hop, layout, channels, sample_rate_hz, normalization "
                     "(--preprocessing FILE and the flags after it)",
}
# pass parameters that are ConvertOptions fields (the pipeline builds those passes from them)
_PASS_FIELDS: dict[tuple[str, str], str] = {
    ("canonicalize", "input_shapes"): "input_shapes", ("canonicalize", "input_values"): "input_values",
    ("canonicalize", "batch_axes"): "batch_axes",
    ("prune-unstructured", "sparsity"): "prune_sparsity", ("prune-unstructured", "layer_sparsity"): "prune_layers",
    ("prune-structured", "ratio"): "prune_channels", ("prune-structured", "layer_ratios"): "prune_layers",
    ("distill", "epochs"): "epochs", ("distill", "seed"): "seed",
    ("quantize-int8", "min_cosine"): "min_cosine", ("quantize-int8", "max_accuracy_drop"): "max_accuracy_drop",
}
_DATA_PARAMS = {("distill", "data"): "--distill", ("distill", "student"): "--student"}
_KEYS = {p.name: p for p in RECIPE_KEYS}


def recipe_key(name: str) -> Param:
    """The declaration of a top-level recipe key (the CLI's option of the same name is generated from it)."""
    return _KEYS[name]


def load_recipe(path: Path) -> tuple[dict[str, Any], str]:
    """(the recipe, where it came from): a TOML file, a JSON one, or an artifact (its directory or its
    manifest.json: the settings it was converted with)."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserInputError(f"--recipe {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"--recipe {path}: cannot read it ({exc})") from None
    try:
        doc = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise UserInputError(f"--recipe {path}: not valid {kind}: {exc}") from None
    if not isinstance(doc, dict):
        raise UserInputError(f"--recipe {path}: expected a table of settings")
    if path.name == "manifest.json" or "schema" in doc:
        if not isinstance(doc.get("settings"), dict):
            raise UserInputError(f"--recipe {path}: this manifest records no settings (written by an edgeopt "
                                 f"before recipes; its 'recipe' lists the passes it ran)")
        doc = doc["settings"]
    return doc, str(path)


def set_value(recipe: dict[str, Any], assignment: str) -> None:
    """Apply one ``--set KEY=VALUE``: KEY a top-level setting, ``TABLE.NAME`` (input_shapes.x=[1,64]), or a
    pass's or target's parameter (``[passes.]PASS.PARAM``, ``[targets.]TARGET.PARAM``); VALUE is read as
    a TOML value (true, 0.5, [1, 64], "text"), else taken as text."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserInputError(f"--set {assignment!r}: expected KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    parts = key.split(".")
    if parts[0] not in ("passes", "targets") and len(parts) == 2 and parts[0] not in RECIPE_TABLES:
        group = "targets" if parts[0] in registry.names(registry.TARGETS) else "passes"
        parts = [group, *parts]
    node = recipe
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserInputError(f"--set {key}: '{part}' is not a table in the recipe")
    node[parts[-1]] = value


def apply_recipe(opts: Any, recipe: Mapping[str, Any], where: str, given: frozenset[str] = frozenset()) -> Any:
    """``opts`` (ConvertOptions) with the recipe's settings, except the fields in ``given`` (set on the
    command line, which win); the recipe is checked first, naming any unknown or ill-typed key."""
    settings, target_params, pass_params = _checked(recipe, where)
    changes: dict[str, Any] = {}
    for name, value in settings.items():
        if name in given:
            continue
        current = getattr(opts, name)
        changes[name] = {**value, **current} if isinstance(value, dict) else value  # flags win key by key
    target = changes.get("target", opts.target)
    if len(target_params) > 1:
        raise UserInputError(f"{where}: parameters for several targets ({', '.join(sorted(target_params))}); "
                             f"a recipe converts for one")
    for owner, params in target_params.items():
        if target is not None and owner != target:
            raise UserInputError(f"{where}: [targets.{owner}] sets parameters of target '{owner}', but the target "
                                 f"is '{target}'")
        if target is None:
            changes["target"] = owner
        changes["target_params"] = {**params, **opts.target_params}
    if pass_params:
        merged = {name: dict(values) for name, values in pass_params.items()}
        for name, values in opts.pass_params.items():
            merged[name] = {**merged.get(name, {}), **values}
        changes["pass_params"] = merged
    if "distill" in recipe.get("passes", {}) and opts.distill is None:
        raise UserInputError(f"{where}: the recipe distils ([passes.distill]): give the data with --distill DATA")
    return dataclasses.replace(opts, **changes)


def _checked(recipe: Mapping[str, Any], where: str
             ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(ConvertOptions fields, target name → params, pass name → params), every key checked."""
    settings: dict[str, Any] = {}
    known = [*_KEYS, *RECIPE_TABLES, "targets", "passes"]
    for key, value in recipe.items():
        if key in _KEYS:
            settings[key] = _typed(_KEYS[key], value, where)
        elif key in RECIPE_TABLES:
            settings[key] = _table(key, value, where)
        elif key not in ("targets", "passes"):
            raise UserInputError(f"{where}: unknown setting '{key}'{closest(key, known)}")
    target_params: dict[str, dict[str, Any]] = {}
    for name, params in _tables(recipe, "targets", where).items():
        declared = _declared("targets", name, where)
        target_params[name] = {k: _typed(_param(declared, k, f"[targets.{name}]", where), v, where)
                               for k, v in params.items()}
    pass_params: dict[str, dict[str, Any]] = {}
    for name, params in _tables(recipe, "passes", where).items():
        declared = _declared("passes", name, where)
        for k, v in params.items():
            param = _param(declared, k, f"[passes.{name}]", where)
            if (name, k) in _DATA_PARAMS:
                raise UserInputError(f"{where}: [passes.{name}] {k}: a recipe holds settings, not data; give it "
                                     f"with {_DATA_PARAMS[name, k]}")
            field = _PASS_FIELDS.get((name, k))
            if field is None:
                pass_params.setdefault(name, {})[k] = _typed(param, v, where)
            elif field in settings:
                raise UserInputError(f"{where}: {field} is set twice (at the top and in [passes.{name}] {k})")
            else:
                settings[field] = _table(field, v, where) if field in RECIPE_TABLES else _typed(_KEYS[field], v, where)
    return settings, target_params, pass_params


def _declared(group: str, name: str, where: str) -> dict[str, Param]:
    """The parameters target or pass ``name`` declares (``group``: targets or passes); an unknown name is
    refused with the closest one."""
    kind, load = (registry.TARGETS, get_target) if group == "targets" else (registry.PASSES, get_pass)
    names = registry.names(kind)
    if name not in names:
        singular = "target" if group == "targets" else "pass"
        raise UserInputError(f"{where}: [{group}.{name}]: no {singular} '{name}'{closest(name, names)} "
                             f"({group}: {', '.join(names)})")
    return {p.name: p for p in load(name).params}


def _tables(recipe: Mapping[str, Any], group: str, where: str) -> dict[str, dict[str, Any]]:
    tables = recipe.get(group, {})
    if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
        raise UserInputError(f"{where}: '{group}' holds a table per {group[:-1]} ([{group}.NAME])")
    return tables


def _param(declared: dict[str, Param], key: str, table: str, where: str) -> Param:
    if key not in declared:
        raise UserInputError(f"{where}: {table} has no parameter '{key}'{closest(key, list(declared))} "
                             f"(parameters: {', '.join(declared) or 'none'})")
    return declared[key]


def _typed(param: Param, value: Any, where: str) -> Any:
    """``value`` as ``param`` takes it; TOML's types are checked, not converted (1.5 is no int)."""
    if param.type is str and isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)  # a list where the parameter takes comma-separated names
    elif param.type is str and isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)  # version = 7, --set version=7
    if param.type in (str, int, float, bool) and not type_ok(value, param.type):
        raise UserInputError(f"{where}: '{param.name}' must be {param.type.__name__}, got {value!r}")
    return param.coerce(value, where)


def _table(name: str, value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UserInputError(f"{where}: '{name}' must be a table ({RECIPE_TABLES[name]})")
    if name == "input_shapes":
        bad = [k for k, v in value.items() if not (isinstance(v, list) and all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in v))]
        if bad:
            raise UserInputError(f"{where}: input_shapes.{bad[0]} must be a list of positive dims, got {value[bad[0]]!r}")
        return {k: tuple(v) for k, v in value.items()}
    if name == "batch_axes":
        bad = [k for k, v in value.items() if not (v == "none" or (isinstance(v, int) and not isinstance(v, bool)))]
        if bad:
            raise UserInputError(f"{where}: batch_axes.{bad[0]} must be an axis or \"none\", got {value[bad[0]]!r}")
        return {k: None if v == "none" else v for k, v in value.items()}
    if name == "input_values":
        return {k: str(v) for k, v in value.items()}
    if name == "prune_layers":
        bad = [k for k, v in value.items() if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1]
        if bad:
            raise UserInputError(f"{where}: prune_layers.{bad[0]} must be a ratio in [0, 1), got {value[bad[0]]!r}")
        return {k: float(v) for k, v in value.items()}
    return dict(value)


def settings_of(opts: Any, target: str, quantize: str) -> dict[str, Any]:
    """The recipe that reproduces a conversion with ``opts`` (what the manifest records as ``settings``):
    the settings that differ from the defaults, the resolved target and quantize mode, no data paths."""
    out: dict[str, Any] = {"target": target, "quantize": quantize}
    for p in RECIPE_KEYS:
        value = getattr(opts, p.name)
        if p.name not in out and value is not None and value != p.default:
            out[p.name] = str(value) if p.name in ("name", "version") else value
    for name in RECIPE_TABLES:
        value = getattr(opts, name)
        if value:
            out[name] = {k: "none" if name == "batch_axes" and v is None else list(v) if name == "input_shapes" else v
                         for k, v in value.items()}
    if opts.target_params:
        out["targets"] = {target: dict(opts.target_params)}
    passes = {name: dict(values) for name, values in opts.pass_params.items() if values}
    passes.get("quantize-int8", {}).pop("min_cosine", None)  # the budget is a top-level setting
    passes.get("quantize-int8", {}).pop("max_accuracy_drop", None)
    if passes := {k: v for k, v in passes.items() if v}:
        out["passes"] = passes
    return json.loads(json.dumps(out))  # plain JSON types (tuples → lists)


def reference_markdown() -> str:
    """The recipe keys, generated from the declarations (docs/converter.md embeds it; a test checks)."""
    rows = reference_table(RECIPE_KEYS)
    for name, what in RECIPE_TABLES.items():
        rows.append(f"| `{name}` | table | | {what} |")
    rows.append("| `[targets.NAME]` | table | | the target's parameters: the table below |")
    rows.append("| `[passes.NAME]` | table | | the pass's parameters: the table below |")
    params = []
    for group, names, load in (("targets", registry.names(registry.TARGETS), get_target),
                               ("passes", registry.names(registry.PASSES), get_pass)):
        for name in names:
            for p in load(name).params:
                if (name, p.name) in _DATA_PARAMS:
                    continue
                field = _PASS_FIELDS.get((name, p.name))
                also = f" (also the top-level `{field}`)" if field else ""
                params.append(dataclasses.replace(p, name=f"{group}.{name}.{p.name}", help=p.help + also))
    rows += ["", *reference_table(params, header="key in its table, as `--set` spells it")]
    return "\n".join(rows) + "\n"
