"""Progress bars on stderr (rich), handed to passes as a ``ProgressFactory`` (the CLI, and the Python
API with ``progress=True``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


def make_progress(enabled: bool = True):
    @contextlib.contextmanager
    def progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        console = Console(stderr=True)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=console, transient=True,
                      disable=not enabled or not console.is_terminal) as bar:
            task = bar.add_task(description, total=total, status="")

            def advance(n: int = 1, status: str | None = None) -> None:
                bar.update(task, advance=n, **({"status": status} if status is not None else {}))

            yield advance

    return progress
