"""The device side as a board gets it: edgeopt's wheel installed with only the extras a board uses, into
a fresh virtualenv (this machine) or an aarch64 target directory run under qemu-user (tools/).

Environments are cached under build/device/, keyed by what the wheel holds and the extras, so a
second `make test-device` reuses them; a changed wheel gets a new one (the old one is removed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dist_build import ROOT, build_dists, wheel_content_key

BUILD = Path(os.environ.get("EDGEOPT_DEVICE_BUILD", ROOT / "build" / "device"))


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would let the dev venv's packages leak in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "EDGEOPT_DEBUG")}
    return {**env, **extra}


def dists() -> tuple[Path, Path]:
    """The wheel (built from the sdist) and the sdist of the current sources."""
    return build_dists(BUILD / "dist")


@dataclass
class Venv:
    root: Path

    def bin(self, name: str) -> Path:
        return self.root / "bin" / name

    @property
    def python(self) -> Path:
        return self.bin("python")

    @property
    def site_packages(self) -> Path:
        return next((self.root / "lib").glob("python3*/site-packages"))

    def run(self, *args: str | Path, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                              env=clean_env(), **kw)


def _replace_stale(prefix: str, keep: Path) -> None:
    for old in BUILD.glob(prefix + "*"):
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def wheel_venv(wheel: Path, extras: str = "agent") -> Venv:
    """A virtualenv (python3.11 -m venv) holding ``wheel[extras]`` and its dependencies from the index,
    nothing else; reused while the wheel's content and the extras are the same."""
    key = f"{wheel_content_key(wheel)}-{sys.version_info[0]}{sys.version_info[1]}"
    prefix = f"venv-{extras.replace(',', '+')}-"
    venv = Venv(BUILD / f"{prefix}{key}")
    if (venv.root / ".ready").exists():
        return venv
    _replace_stale(prefix, keep=venv.root)
    shutil.rmtree(venv.root, ignore_errors=True)  # a half-built one (no .ready)
    python = shutil.which("python3.11") or sys.executable
    subprocess.run([python, "-m", "venv", str(venv.root)], check=True, timeout=120, env=clean_env())
    proc = subprocess.run([str(venv.bin("pip")), "install", "--quiet", f"{wheel}[{extras}]"],
                          capture_output=True, text=True, timeout=900, env=clean_env())
    if proc.returncode != 0:
        shutil.rmtree(venv.root, ignore_errors=True)
        raise AssertionError(f"pip install '{wheel.name}[{extras}]' failed:\n{proc.stderr[-3000:]}")
    (venv.root / ".ready").write_text(json.dumps({"wheel": wheel.name, "extras": extras}))
    return venv


def installed_mib(site_packages: Path, baseline: Path | None = None) -> float:
    """Disk use of a site-packages folder (du), less a baseline folder's (pip + setuptools of a bare venv)."""
    def du(path: Path) -> int:
        return int(subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True,
                                  check=True).stdout.split()[0])
    return (du(site_packages) - (du(baseline) if baseline else 0)) / 1024
