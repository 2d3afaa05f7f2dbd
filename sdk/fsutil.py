"""Crash-safe file writing: temp file + fsync + os.replace (+ fsync of the directory).

A crash at any point leaves either the old or the new content at a path, never a mix, and an output
directory is built next to its destination and renamed into place only once it is complete.

New files and directories honour the process umask (0666 / 0777 masked), unless a caller asks for a
stricter mode (keys, passwords): ``tempfile.mkstemp`` / ``mkdtemp`` would force 0600 / 0700, and an
artifact or model slot written by root beside an agent running as its own user must stay readable.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
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


Owner = tuple[int, int]  # (uid, gid) for os.chown


def _unique_name(parent: Path, prefix: str, suffix: str) -> Path:
    return Path(parent) / f"{prefix}{secrets.token_hex(6)}{suffix}"


def make_temp_dir(parent: Path, prefix: str, suffix: str) -> Path:
    """A new empty directory with a unique name in ``parent``, created with the umask's mode."""
    for _ in range(100):
        path = _unique_name(parent, prefix, suffix)
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unique temporary name", str(parent))


def _open_temp_file(parent: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    for _ in range(100):
        path = _unique_name(parent, prefix, suffix)
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unique temporary name", str(parent))


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None, owner: Owner | None = None) -> None:
    """Write ``data`` to ``path`` atomically and durably. The file gets ``mode`` when given (e.g.
    0o600 for a secret), else the umask's; ``owner`` (uid, gid) is set before it appears."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = _open_temp_file(path.parent, f".{path.name}.", ".tmp")
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise environment_fault(exc, path) from exc


def _first_nonfinite(obj: Any, where: str = "") -> str | None:
    """The path (``a.b[2]``) of the first NaN / Infinity float in ``obj``, or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "the value"
    if isinstance(obj, dict):
        items = ((f"{where}.{k}" if where else str(k), v) for k, v in obj.items())
    elif isinstance(obj, list | tuple):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    return next((found for key, value in items if (found := _first_nonfinite(value, key)) is not None), None)


def strict_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that refuses NaN and Infinity (which strict JSON parsers reject) by naming the
    key that holds one: a ValueError, since writers build their values finite (a bug if not)."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError as exc:
        where = _first_nonfinite(obj)
        if where is None:
            raise
        raise ValueError(f"{where} is not a finite number, which strict JSON cannot hold") from exc


def atomic_write_json(path: Path, obj: Any, mode: int | None = None) -> None:
    """Write ``obj`` as strict JSON (no NaN / Infinity), atomically."""
    try:
        text = strict_json(obj, indent=2, sort_keys=False)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    atomic_write_bytes(path, (text + "\n").encode(), mode)


def copy_tree(source: Path, dest: Path) -> None:
    """Copy the files and directories under ``source`` into the empty directory ``dest``. Contents
    only: modes come from the umask, not from the source (a 0700 source must not make a 0700 copy)."""
    source, dest = Path(source), Path(dest)
    for dirpath, dirnames, filenames in os.walk(source):
        rel = Path(dirpath).relative_to(source)
        for name in sorted(dirnames):
            os.mkdir(dest / rel / name, 0o777)
        for name in sorted(filenames):
            shutil.copyfile(Path(dirpath) / name, dest / rel / name, follow_symlinks=False)


def chown_tree(root: Path, owner: Owner) -> None:
    """Give ``root`` and everything under it to ``owner`` (uid, gid), links themselves not followed."""
    os.chown(root, *owner, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), *owner, follow_symlinks=False)


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


def check_writable_dir(directory: Path) -> None:
    """Raise ``EnvironmentFault`` unless entries can be created in ``directory``. Tried for real (a
    probe directory made and removed): permission bits say nothing for root, read-only mounts or ACLs."""
    try:
        os.rmdir(make_temp_dir(directory, ".edgeopt-probe-", ""))
    except OSError as exc:
        raise environment_fault(exc, directory) from exc


@contextlib.contextmanager
def staged_directory(dest: Path, force: bool = False,
                     replace_problem: Callable[[Path], str | None] | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``dest``; on success rename it to ``dest``.

    On any exception the temporary directory is removed and ``dest`` is untouched. With ``force``
    an existing ``dest`` is replaced: it is moved aside, the new directory renamed in, then the old
    one deleted, so ``dest`` is never missing a complete version for longer than two renames.
    ``replace_problem(dest)`` says why an existing ``dest`` must not be replaced after all; it is
    asked again right before the swap, since ``dest`` may have changed while the work ran.
    """
    dest = Path(dest)
    check_output_dir(dest, force)
    parent = dest.resolve().parent
    try:
        tmp = make_temp_dir(parent, f".{dest.name}.", ".partial")
    except OSError as exc:
        raise environment_fault(exc, dest) from exc
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if dest.exists() and replace_problem is not None and (problem := replace_problem(dest)):
            raise UserInputError(problem)
        if dest.exists():
            old = _unique_name(parent, f".{dest.name}.", ".old")
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
