"""The device side as a board gets it: edgeopt's wheel installed with only the extras a board uses, into
a fresh virtualenv (this machine) or an aarch64 target directory run under qemu-user (tools/).

Environments are cached under build/device/, keyed by what the wheel holds and the extras, so a
second `make test-device` reuses them; a changed wheel gets a new one (the old one is removed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dist_build import ROOT, Dists, build_dists, wheel_content_key

BUILD = Path(os.environ.get("EDGEOPT_DEVICE_BUILD", ROOT / "build" / "device"))

# Run by an installed Python: walks the installed edgeopt.agent (not a list) and imports every
# module, then every edgeopt module those import anywhere (also inside functions: found in their
# source) and the third-party packages the agent reaches for at run time (signed updates, MQTT, the
# ONNX and LiteRT runtimes); prints one JSON line about what it found.
IMPORT_EVERY_AGENT_MODULE = """
import ast, importlib, importlib.util, json, pkgutil, platform, sys
import edgeopt.agent
agent = sorted(m.name for m in pkgutil.walk_packages(edgeopt.agent.__path__, "edgeopt.agent."))
used = set()
for name in agent:
    module = importlib.import_module(name)
    for node in ast.walk(ast.parse(open(module.__file__).read())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("edgeopt."):
            used.add(node.module)
        elif isinstance(node, ast.Import):
            used.update(a.name for a in node.names if a.name.startswith("edgeopt."))
sdk = sorted(m for m in used if not m.startswith("edgeopt.agent"))
for name in sdk + ["edgeopt.runtime.onnxruntime", "edgeopt.runtime.litert"]:  # the runtimes' entry points
    importlib.import_module(name)
import tuf.ngclient, securesystemslib.signer, paho.mqtt.client, onnxruntime
import cryptography.hazmat.primitives.asymmetric.ed25519  # securesystemslib verifies Ed25519 with it
litert = importlib.util.find_spec("ai_edge_litert") is not None
if litert:
    import ai_edge_litert.interpreter
print(json.dumps({"agent": agent, "sdk": sdk, "file": edgeopt.agent.__file__, "machine": platform.machine(),
                  "litert": litert, "loaded": sorted(m for m in sys.modules if "." not in m),
                  "installed": {m: importlib.util.find_spec(m) is not None
                                for m in ("onnx", "onnxslim", "onnx_ir", "sympy", "torch", "tvm", "coremltools",
                                          "amqtt", "psycopg")}}))
"""


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would let the dev venv's packages leak in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "EDGEOPT_DEBUG")}
    return {**env, **extra}


def dists() -> Dists:
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


# -- aarch64 under qemu-user --------------------------------------------------------------------------
AARCH64 = BUILD / "aarch64"
AARCH64_SETUP = ROOT / "tools" / "make_aarch64_agent_env.sh"


def aarch64_missing() -> str | None:
    """Why the emulated aarch64 board cannot be built here (the skip reason), or None."""
    ready = (AARCH64 / "sysroot" / ".packages").exists()
    if shutil.which("qemu-aarch64-static") is None and not _can_apt():
        return "needs qemu-user-static (Debian/Ubuntu: apt-get install qemu-user-static)"
    if not ready and not _can_apt():
        return (f"needs an aarch64 Python 3.11 at {AARCH64}/sysroot: run tools/aarch64_python_sysroot.sh "
                f"{AARCH64} as root on Debian/Ubuntu (it downloads bookworm's arm64 python3.11 .debs)")
    return None


def _can_apt() -> bool:
    return shutil.which("apt-get") is not None and os.geteuid() == 0


@dataclass
class EmulatedBoard:
    """An aarch64 Python (under qemu-user, Cortex-A72) with the wheel's extras in ``site``."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "sysroot" / "usr" / "bin" / "python3.11-qemu"

    @property
    def site(self) -> Path:
        return self.root / "site"

    def env(self) -> dict[str, str]:
        return clean_env(PYTHONPATH=str(self.site))

    def console_script(self, name: str) -> list[str]:
        """The command the wheel's console script ``name`` runs (its entry point, read from the
        installed metadata), as an argument list for the emulated Python."""
        (dist_info,) = self.site.glob("edgeopt-*.dist-info")
        for line in (dist_info / "entry_points.txt").read_text().splitlines():
            script, _, target = (part.strip() for part in line.partition("="))
            if script == name:
                module, _, func = target.partition(":")
                code = f"import sys; sys.argv[0] = {name!r}; from {module} import {func}; sys.exit({func}())"
                return [str(self.python), "-c", code]
        raise AssertionError(f"{dist_info}: no console script {name}")

    def run(self, *args: str | Path, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.python), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                              env=self.env(), **kw)


def aarch64_board(wheel: Path, pip: Path, extras: str = "agent,litert") -> EmulatedBoard:
    """The emulated board with ``wheel[extras]``; rebuilt only when the wheel's content, the extras or
    the setup scripts changed."""
    scripts = hashlib.sha256(b"".join(p.read_bytes() for p in sorted((ROOT / "tools").glob("*aarch64*.sh"))))
    key = f"{wheel_content_key(wheel)} {extras} {scripts.hexdigest()[:12]}"
    board = EmulatedBoard(AARCH64)
    stamp = board.site / ".edgeopt-key"
    if stamp.exists() and stamp.read_text() == key and board.python.exists():
        return board
    proc = subprocess.run([str(AARCH64_SETUP), str(wheel), str(AARCH64)], capture_output=True, text=True,
                          timeout=1800, env=clean_env(PIP=str(pip), EXTRAS=extras), cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"{AARCH64_SETUP.name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                             f"{proc.stderr[-3000:]}")
    stamp.write_text(key)
    return board
