"""The fenced code blocks of README.md and docs/*.md, with the HTML comment marking each one.

A marker is a comment on the line right above the opening fence, e.g. ``<!-- runnable -->`` or
``<!-- walkthrough 3 -->``; it does not show when the page is rendered. tests/test_docs_runnable.py
and tests/test_docs_walkthrough.py run the blocks so marked."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = ("README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")))
SHELL = ("sh", "bash", "shell", "console")
_FENCE = re.compile(r"^```(?P<lang>[\w-]*)[ \t]*\n(?P<text>.*?)^```[ \t]*$", re.S | re.M)
_MARKER = re.compile(r"^<!--\s*(?P<marker>.*?)\s*-->[ \t]*$")


@dataclass(frozen=True)
class Block:
    page: str           # "README.md", "docs/agent.md"
    line: int           # line number of the opening fence
    lang: str           # "sh", "toml", "" ...
    marker: str | None  # "runnable", "walkthrough 3", or None
    text: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.text.splitlines() if line.strip()), "")


def blocks(page: str) -> list[Block]:
    """Every fenced block of ``page``, in order."""
    text = (ROOT / page).read_text()
    found = []
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        above = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.match(above)
        found.append(Block(page, line, m.group("lang"), marker.group("marker") if marker else None, m.group("text")))
    return found


def marked(page: str, marker: re.Pattern[str]) -> list[tuple[re.Match[str], Block]]:
    """The blocks of ``page`` whose marker matches ``marker`` (in full), with the match."""
    return [(m, b) for b in blocks(page) if b.marker is not None and (m := marker.fullmatch(b.marker))]


def marker_count(page: str, marker: re.Pattern[str]) -> int:
    """How many marker comments (a line of its own) matching ``marker`` the page holds, over a block or
    not (a marker whose block does not parse would otherwise drop it silently)."""
    comments = re.findall(r"^<!--\s*(.*?)\s*-->[ \t]*$", (ROOT / page).read_text(), flags=re.M)
    return sum(1 for c in comments if marker.fullmatch(c))
