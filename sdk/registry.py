"""Named extension points (passes, targets, runtimes) discovered through entry points.

Built-ins are registered in pyproject.toml exactly as a third-party plugin would register its own,
so a plugin distribution adds a target with one ``[project.entry-points."edgeopt.targets"]`` line.
Loading an entry point imports only its module; heavy toolchains are imported later, inside the
functions that use them.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING, Any

from edgeopt.errors import EnvironmentFault, UserInputError, closest

PASSES = "edgeopt.passes"
TARGETS = "edgeopt.targets"
RUNTIMES = "edgeopt.runtimes"

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

_KIND = {PASSES: "pass", TARGETS: "target", RUNTIMES: "runtime"}

# edgeopt's own runtimes as pyproject.toml registers them (tests/test_registry.py keeps the two equal).
# ``load`` takes these without reading entry points, so the device agent, which loads the one runtime
# its model names, never imports importlib.metadata: that import (email, zipfile, csv with it) is 1.5 MiB
# of the agent's peak RSS, whose bound is 60 MiB (docs/benchmarks.md, "Issue 18, third pass").
BUILTIN = {RUNTIMES: {
    "onnxruntime": "edgeopt.runtime.onnxruntime:OnnxRuntime",
    "litert": "edgeopt.runtime.litert:LiteRtRuntime",
    "coreml": "edgeopt.runtime.coreml:CoreMLRuntime",
    "tvm": "edgeopt.runtime.tvm:TVMRuntime",
}}


@cache
def _entry_points(group: str) -> dict[str, EntryPoint]:
    from importlib.metadata import entry_points  # lazy: see BUILTIN

    return {ep.name: ep for ep in entry_points(group=group)}


def registered(group: str, name: str) -> bool:
    """Whether ``load(group, name)`` finds ``name`` (a built-in without reading entry points)."""
    return name in BUILTIN.get(group, {}) or name in _entry_points(group)


def names(group: str) -> list[str]:
    return sorted(_entry_points(group))


@cache
def load(group: str, name: str) -> Any:
    builtin = BUILTIN.get(group, {}).get(name)
    eps = {} if builtin else _entry_points(group)
    if not builtin and name not in eps:
        kind = _KIND.get(group, group)
        available = ", ".join(sorted(eps)) or "none"
        raise UserInputError(f"unknown {kind} '{name}'{closest(name, list(eps))}; available: {available}")
    try:
        if builtin:
            module, attr = builtin.split(":")
            obj = getattr(importlib.import_module(module), attr)
        else:
            obj = eps[name].load()
    except ImportError as exc:
        raise EnvironmentFault(f"{_KIND.get(group, group)} '{name}' could not be imported: {exc}") from exc
    if getattr(obj, "name", name) != name:
        raise EnvironmentFault(f"entry point '{name}' in {group} loads {obj!r} whose name is {obj.name!r}")
    return obj


def load_all(group: str) -> dict[str, Any]:
    return {n: load(group, n) for n in names(group)}
