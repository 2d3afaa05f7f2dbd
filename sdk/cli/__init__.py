"""The command lines: ``edgeopt`` (``edgeopt.cli.app``, built on click) and ``edgeopt-agent``
(``edgeopt.cli.agent``, which is not).

This ``__init__`` imports nothing, so that ``edgeopt-agent`` on a board does not load click: click and
what it imports held ~1.2 MiB of the running agent and its worker (docs/benchmarks.md, "Issue 18, fourth
pass"). The ``edgeopt`` CLI's names (``main``, ``cli``, ``COMMANDS``, ``debug_requested``, ...) are
read from ``edgeopt.cli.app`` on first use, so ``from edgeopt.cli import main`` keeps working.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__") or name == "app":  # import machinery probing; the submodule itself
        raise AttributeError(f"module 'edgeopt.cli' has no attribute {name!r}")
    import importlib

    try:
        return getattr(importlib.import_module("edgeopt.cli.app"), name)
    except AttributeError:
        raise AttributeError(f"module 'edgeopt.cli' has no attribute {name!r}") from None
