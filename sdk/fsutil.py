"""Crash-safe file writing: temp file + fsync + os.replace (+ fsync of the directory).

A crash at any point leaves either the old or the new content at a path, never a mix, and an output
directory is built next to its destination and renamed into place only once it is complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeopt.errors import EnvironmentFault, UserInputError


def cache_dir() -> Path:
    """Where edgeopt keeps what it can recompute: ``$XDG_CACHE_HOME/edgeopt`` (``~/.cache/edgeopt``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeopt"


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def environment_fault(exc: OSError, path: Path) -> EnvironmentFault:
    """A one-line ``EnvironmentFault`` for an OSError while writing ``path`` (disk full, read-only...)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return EnvironmentFault(f"no space left on device while writing {path}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return EnvironmentFault(f"cannot write {path}: {exc.strerror}")
    return EnvironmentFault(f"cannot write {path}: {exc.strerror or exc}")


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically and durably."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise environment_fault(exc, path) from exc


def atomic_write_json(path: Path, obj: Any, mode: int = 0o644) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), mode)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (before renaming it into place)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def check_output_dir(dest: Path, force: bool) -> None:
    """Refuse an existing output location unless ``force``; called before any work starts."""
    dest = Path(dest)
    if dest.exists() and not force:
        raise UserInputError(f"output location {dest} already exists; pass --force to replace it")
    if dest.exists() and not dest.is_dir():
        raise UserInputError(f"output location {dest} exists and is not a directory")
    parent = dest.resolve().parent
    if not parent.is_dir():
        raise UserInputError(f"parent directory of the output location does not exist: {parent}")


@contextlib.contextmanager
def staged_directory(dest: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``dest``; on success rename it to ``dest``.

    On any exception the temporary directory is removed and ``dest`` is untouched. With ``force``
    an existing ``dest`` is replaced: it is moved aside, the new directory renamed in, then the old
    one deleted, so ``dest`` is never missing a complete version for longer than two renames.
    """
    dest = Path(dest)
    check_output_dir(dest, force)
    parent = dest.resolve().parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=parent))
    except OSError as exc:
        raise environment_fault(exc, dest) from exc
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=parent))
            os.rmdir(old)
            os.replace(dest, old)
        os.replace(tmp, dest)
        fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise environment_fault(exc, dest) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_size(path: Path) -> int:
    """Size in bytes of a file, or of every file under a directory (e.g. an .mlpackage)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
