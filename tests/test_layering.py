"""The agent and the fleet never import each other (DESIGN.md, layers): they share only the sdk core
— the protocol (``edgeopt.protocol``), the repository client (``edgeopt.repo_client``) and the
golden-vector check (``edgeopt.golden_vectors``). Imports are read from the source (ast), at module
top and inside functions, and so are module names given as strings (``importlib``, ``python -m``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folder → the edgeopt packages its modules must never import
FORBIDDEN = {
    "agent": ("edgeopt.fleet",),
    "fleet": ("edgeopt.agent",),
    "sdk": ("edgeopt.agent", "edgeopt.fleet"),  # the core below both (its CLI is the layer above: skipped)
}
SHARED = ("sdk/protocol.py", "sdk/repo_client.py", "sdk/golden_vectors.py")


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in the file, and of every string that names a module."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            out += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("edgeopt."):
            out.append((node.lineno, node.value.split()[0]))
    return out


def violations(folder: str) -> list[str]:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[:2] == ("sdk", "cli"):
            continue
        for line, name in imported_names(path):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[folder]):
                found.append(f"{rel}:{line} imports {name}")
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_agent_and_fleet_never_import_each_other(folder):
    assert violations(folder) == []


def test_the_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from edgeopt.fleet.repository import NAME_RE\n    import edgeopt.agent.model\n"
                     "    return __import__('importlib').import_module('edgeopt.fleet.simulator')\n")
    names = [n for _, n in imported_names(probe)]
    assert "edgeopt.fleet.repository" in names and "edgeopt.agent.model" in names
    assert "edgeopt.fleet.simulator" in names


def test_the_shared_modules_exist_where_both_sides_find_them():
    for rel in SHARED:
        assert (ROOT / rel).is_file(), rel
