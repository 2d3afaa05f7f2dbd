"""Which folders become which ``edgeopt.*`` packages (everything else lives in pyproject.toml).

The source folders map onto import names (sdk/ → edgeopt, agent/ → edgeopt.agent, ...), which plain
``packages.find`` cannot express, and a hand-kept package list once shipped a wheel without
``edgeopt/agent/update/``. So every folder under those roots that holds Python modules is a
package, found by walking the tree: a new subpackage needs no edit here.
tests/test_packaging.py builds the wheel and sdist and fails when any module or data file is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent

# source folder → the import name it installs as
PACKAGE_ROOTS = {
    "edgeopt": "sdk",
    "edgeopt.converters": "converters",
    "edgeopt.agent": "agent",
    "edgeopt.fleet": "fleet",
    "edgeopt.hardware": "hardware",
}

# Data-only folders, shipped as packages of their own so setuptools knows them (it warns
# "Package would be ignored" about a data folder that is no listed package).
PACKAGE_DATA = {
    "edgeopt.hardware.profiles": ["*.toml"],
    "edgeopt.hardware.systemd": ["*"],
    "edgeopt.fleet.dashboard.static": ["*"],  # the dashboard's page, script and style
}


def module_packages(name: str, folder: Path) -> list[str]:
    """The package names of ``folder`` and of each folder below it that holds a ``.py`` file."""
    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith(".") and not d.endswith(".egg-info"))
        if any(f.endswith(".py") for f in files):
            rel = Path(here).relative_to(folder)
            found.append(".".join([name, *rel.parts]))
    return found


def packages() -> list[str]:
    found = set(PACKAGE_DATA)
    for name, folder in PACKAGE_ROOTS.items():
        found.update(module_packages(name, HERE / folder))
    return sorted(found)


setup(packages=packages(), package_dir=PACKAGE_ROOTS, package_data=PACKAGE_DATA)
