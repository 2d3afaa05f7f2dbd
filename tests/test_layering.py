"""Layers (DESIGN.md), each importing only those below it:

    sdk core  (sdk/ except sdk/cli/: errors, specs, params, artifact, data, runtime, protocol, ...)
      ← converters, agent, fleet   (siblings: none imports another)
      ← the CLI  (sdk/cli/: ``edgeopt`` and ``edgeopt-agent``)

The agent and the fleet share only sdk core modules — the protocol (``edgeopt.protocol``), the
repository client (``edgeopt.repo_client``) and the golden-vector check (``edgeopt.golden_vectors``).
Imports are read from the source (ast), at module top and inside functions, relative ones resolved
against the module's package, and so are module names given as strings (``importlib``, ``python -m``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# source folder → the package it installs as (setup.py, PACKAGE_ROOTS)
PACKAGES = {"sdk": "edgeopt", "converters": "edgeopt.converters", "agent": "edgeopt.agent", "fleet": "edgeopt.fleet"}
CONVERTERS, AGENT, FLEET, CLI = "edgeopt.converters", "edgeopt.agent", "edgeopt.fleet", "edgeopt.cli"
# layer → the edgeopt packages its modules must never import (the CLI, on top, may import them all)
FORBIDDEN = {
    "sdk core": (CONVERTERS, AGENT, FLEET, CLI),
    "converters": (AGENT, FLEET, CLI),
    "agent": (CONVERTERS, FLEET, CLI),
    "fleet": (CONVERTERS, AGENT, CLI),
}
SHARED = ("sdk/protocol.py", "sdk/repo_client.py", "sdk/golden_vectors.py")
# the one upward edge, with its reason: `edgeopt.convert` / `analyze` / `optimize` (docs/python.md) are
# the package's front door, resolved by a module __getattr__ on first use -- never at import, so the
# core (and the device agent, which has no converter) imports nothing above it
ALLOWED = {("sdk/__init__.py", "edgeopt.converters.api")}


def layer_of(rel: Path) -> str:
    """The layer of a module, given its path relative to the repository root."""
    if rel.parts[0] == "sdk":
        return "cli" if rel.parts[1] == "cli" else "sdk core"
    return rel.parts[0]


def module_name(rel: Path) -> str:
    """``converters/targets/tflite/sparse.py`` → ``edgeopt.converters.targets.tflite.sparse``."""
    parts = [PACKAGES[rel.parts[0]], *rel.with_suffix("").parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def imported_names(path: Path, package: str | None = None) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in the file, and of every string that names a module.
    ``package`` is the file's package, which relative imports are resolved against."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                assert package is not None, f"{path}:{node.lineno}: relative import outside a package"
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("edgeopt."):
            out.append((node.lineno, node.value.split()[0]))
    return out


def package_of(path: Path) -> str:
    name = module_name(path.relative_to(ROOT))
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def violations(layer: str) -> list[str]:
    found = []
    for folder in PACKAGES:
        for path in source_files(folder):
            rel = path.relative_to(ROOT)
            if layer_of(rel) != layer:
                continue
            for line, name in imported_names(path, package_of(path)):
                if (str(rel), name) in ALLOWED:
                    continue
                if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[layer]):
                    found.append(f"{rel}:{line} imports {name}")
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_each_layer_imports_only_the_layers_below_it(layer):
    assert violations(layer) == []


def test_every_source_folder_is_checked():
    """PACKAGES is setup.py's PACKAGE_ROOTS, less hardware/: package data, whose __init__.py imports nothing."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    roots = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PACKAGE_ROOTS")
    assert {folder: name for name, folder in roots.items() if folder != "hardware"} == PACKAGES
    assert not [name for path in source_files("hardware") for name in imported_names(path)]


def test_the_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from edgeopt.fleet.repository import NAME_RE\n    import edgeopt.agent.model\n"
                     "    return __import__('importlib').import_module('edgeopt.fleet.simulator')\n")
    names = [n for _, n in imported_names(probe)]
    assert "edgeopt.fleet.repository" in names and "edgeopt.agent.model" in names
    assert "edgeopt.fleet.simulator" in names


def test_the_check_resolves_relative_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from . import ops\nfrom .flatbuffer import schema\n"
                     "def f():\n    from ..passes import canonicalize\n    from ... import cli\n")
    names = [n for _, n in imported_names(probe, "edgeopt.converters.targets")]
    assert {"edgeopt.converters.targets.ops", "edgeopt.converters.targets.flatbuffer.schema",
            "edgeopt.converters.passes.canonicalize", "edgeopt.cli"} <= set(names)
    assert module_name(Path("converters/targets/tflite/__init__.py")) == "edgeopt.converters.targets.tflite"
    assert module_name(Path("sdk/runtime/tvm.py")) == "edgeopt.runtime.tvm"


def test_the_shared_modules_exist_where_both_sides_find_them():
    for rel in SHARED:
        assert (ROOT / rel).is_file(), rel


# -- project imports at module top -------------------------------------------------------------------
# The project's own modules are imported at module top; only heavy third-party packages are imported
# inside the functions that need them. The exceptions, per file, with the reason (the counts are
# exact, so that an import moved to the top lowers its file's number here and none creeps back):
LAZY_PROJECT_IMPORTS = {
    # CLI start-up: a command imports the subsystem it drives when it runs, where that subsystem pulls
    # in numpy (edgeopt.artifact), onnx or python-tuf, so that `edgeopt GROUP --help` and the group's
    # other commands do not load it (tests/test_cli.py checks that --help loads none of them).
    "sdk/cli/agent.py": 1,  # the agent service (numpy, the runtimes): `edgeopt-agent --help` loads neither
    "sdk/cli/agent_commands.py": 3,  # state dir and model loading (numpy, the runtimes); rich for status
    "sdk/cli/fleet.py": 4,  # the signed repository (numpy), the fleet service
    "sdk/cli/fleet_ops.py": 2,  # the device simulator (numpy, python-tuf), provisioning (the repository)
    "sdk/cli/fleet_rollout.py": 1,  # the repository, to check that a rollout's model is published
    "sdk/cli/inspect.py": 3,  # the converter (onnx): `edgeopt inspect --help` works without the convert extra
    "sdk/cli/analyze.py": 2,  # the converter (onnx, onnxruntime), as for inspect
    "sdk/cli/optimize.py": 2,  # the converter, as for inspect
    "sdk/cli/keys.py": 2,  # the repository
    # python-tuf and cryptography (~0.1 s) load only when the agent's updates are on; urllib3 only when
    # they come over HTTP
    "agent/update/updater.py": 3,
    # the update machinery (~1 MiB of the running agent) loads only with a broker: updates come over MQTT
    "agent/service.py": 1,
}


def lazy_project_imports(path: Path) -> list[int]:
    """Lines of the imports of edgeopt modules (absolute or relative) inside functions."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.Import | ast.ImportFrom):
                names = [child.module or ""] if isinstance(child, ast.ImportFrom) else [a.name for a in child.names]
                relative = isinstance(child, ast.ImportFrom) and child.level > 0
                if relative or any(n == "edgeopt" or n.startswith("edgeopt.") for n in names):
                    found.append(child.lineno)
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def test_project_modules_are_imported_at_module_top():
    counts, lines = {}, []
    for folder in PACKAGES:
        for path in source_files(folder):
            rel = path.relative_to(ROOT).as_posix()
            if found := lazy_project_imports(path):
                counts[rel] = len(found)
                if len(found) != LAZY_PROJECT_IMPORTS.get(rel):
                    lines += [f"{rel}:{line}" for line in found]
    assert counts == LAZY_PROJECT_IMPORTS, (
        "imports of edgeopt modules inside functions (move them to the module's top, or say in "
        f"LAZY_PROJECT_IMPORTS why one must stay): {lines}")


def test_the_count_sees_lazy_project_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import edgeopt.errors\nfrom edgeopt import bench\nimport numpy\n\n"
                     "def f():\n    import json\n    from edgeopt.fleet import rollout\n    from .sparse import x\n"
                     "    class C:\n        def g(self):\n            import edgeopt.agent\n"
                     "    return lambda: __import__('json')\n")
    assert lazy_project_imports(probe) == [7, 8, 11]


MAX_LINES = 600  # issue 16: a module past this has more than one job


def test_no_module_is_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for folder in PACKAGES for p in source_files(folder)
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, "split these modules by what they do"


def slot_changes(path: Path) -> set[str]:
    """Names of the functions in ``path`` that call ``.activate(...)`` or ``.deactivate(...)``."""
    found = set()
    for fn in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and any(
                isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)
                and c.func.attr in ("activate", "deactivate") for c in ast.walk(fn)):
            found.add(fn.name)
    return found


def test_the_running_agent_changes_its_active_slot_by_one_route():
    """Issue 16 point 4: the updater's swaps and the fall-back from a damaged slot both go through
    ``Agent._set_active`` on the main loop (statedir.py is the slot store itself)."""
    routes = {(str(p.relative_to(ROOT)), name) for p in source_files("agent") if p.name != "statedir.py"
              for name in slot_changes(p)}
    # a nested helper counts its enclosing function too: only _set_active may appear
    assert routes == {("agent/service.py", "_set_active")}


def test_the_slot_route_check_sees_a_direct_call(tmp_path):
    (tmp_path / "m.py").write_text("def step(host):\n    host.state.activate('b')\n")
    assert slot_changes(tmp_path / "m.py") == {"step"}
