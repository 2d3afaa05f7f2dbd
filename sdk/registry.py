"""Named extension points (passes, targets, runtimes) discovered through entry points.

Built-ins are registered in pyproject.toml exactly as a third-party plugin would register its own,
so a plugin distribution adds a target with one ``[project.entry-points."edgeopt.targets"]`` line.
Loading an entry point imports only its module; heavy toolchains are imported later, inside the
functions that use them.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from edgeopt.errors import EnvironmentFault, UserInputError, closest

PASSES = "edgeopt.passes"
TARGETS = "edgeopt.targets"
RUNTIMES = "edgeopt.runtimes"

_KIND = {PASSES: "pass", TARGETS: "target", RUNTIMES: "runtime"}


@cache
def _entry_points(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def names(group: str) -> list[str]:
    return sorted(_entry_points(group))


@cache
def load(group: str, name: str) -> Any:
    eps = _entry_points(group)
    if name not in eps:
        kind = _KIND.get(group, group)
        available = ", ".join(sorted(eps)) or "none"
        raise UserInputError(f"unknown {kind} '{name}'{closest(name, list(eps))}; available: {available}")
    try:
        obj = eps[name].load()
    except ImportError as exc:
        raise EnvironmentFault(f"{_KIND.get(group, group)} '{name}' could not be imported: {exc}") from exc
    if getattr(obj, "name", name) != name:
        raise EnvironmentFault(f"entry point '{name}' in {group} loads {obj!r} whose name is {obj.name!r}")
    return obj


def load_all(group: str) -> dict[str, Any]:
    return {n: load(group, n) for n in names(group)}
