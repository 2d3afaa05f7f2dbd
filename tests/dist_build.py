"""Building edgeopt's sdist and wheel the way a user gets them (``python -m build``: the sdist first,
then the wheel from the unpacked sdist, in an isolated build environment), and what they must hold.

Shared by tests/test_packaging.py (what is in them) and tests/device/ (installing the wheel).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# source folder → where its files land in the wheel (the import name as a path)
SOURCE_ROOTS = {"sdk": "edgeopt", "converters": "edgeopt/converters", "agent": "edgeopt/agent",
                "fleet": "edgeopt/fleet", "hardware": "edgeopt/hardware"}
# data files shipped beside the modules (globs relative to the repository)
PACKAGE_DATA = ("hardware/profiles/*.toml", "hardware/systemd/*", "fleet/dashboard/static/*")


def clean_copy(dest: Path) -> Path:
    """The repository's files as a fresh clone has them (tracked and new, not ignored), copied to
    ``dest``: a build in the work tree would read its stale ``edgeopt.egg-info/SOURCES.txt`` (which
    setuptools ships as package data: it once hid a folder missing from the package list) and
    write build/lib there."""
    import shutil

    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@dataclass
class Dists:
    wheel: Path
    sdist: Path
    log: str  # what the build printed (setuptools' warnings among it)


def build_dists(out: Path) -> Dists:
    """The wheel and sdist built into ``out`` from a clean copy of the sources; the wheel is built
    from the sdist, as pip does for an sdist."""
    import tempfile

    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.whl"), *out.glob("*.tar.gz")]:
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="edgeopt-src-") as tmp:
        src = clean_copy(Path(tmp))
        proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(src)], capture_output=True,
                              text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"python -m build failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, (wheels, sdists)
    return Dists(wheels[0], sdists[0], proc.stdout + proc.stderr)


def source_files(root: Path = ROOT) -> dict[str, str]:
    """Every module and data file the wheel must hold: repository path → wheel path
    (``agent/update/link.py`` → ``edgeopt/agent/update/link.py``)."""
    found = [p for folder in SOURCE_ROOTS for p in (root / folder).rglob("*.py") if "__pycache__" not in p.parts]
    found += [p for pattern in PACKAGE_DATA for p in root.glob(pattern) if p.is_file()]
    out = {}
    for path in found:
        rel = path.relative_to(root)
        out[rel.as_posix()] = "/".join([SOURCE_ROOTS[rel.parts[0]], *rel.parts[1:]])
    return out


def wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return {n for n in zf.namelist() if ".dist-info/" not in n and not n.endswith("/")}


def wheel_metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return zf.read(name).decode()


def wheel_content_key(wheel: Path) -> str:
    """A hash of what the wheel holds (its RECORD: every file's sha256), not of the zip bytes, which
    change with each build's timestamps: equal keys mean the same installed files."""
    with zipfile.ZipFile(wheel) as zf:
        record = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        lines = sorted(line.split(",")[0] + "," + line.split(",")[1] for line in zf.read(record).decode().splitlines()
                       if line and not line.split(",")[0].endswith("RECORD"))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
