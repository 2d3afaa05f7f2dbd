"""The agent's state directory: two model slots and the pointer to the active one.

    STATE_DIR/
      active          "a" or "b": the slot whose model runs (absent: no model yet)
      slots/a/        an artifact directory (manifest.json, model file, golden.npz, report.json)
      slots/b/        the other slot: where the next model is staged
      outbox/         results waiting for the broker (see outbox.py)
      status.json     the last status / telemetry snapshot

The active slot changes by one atomic rename (``active`` is written to a temporary file, fsynced,
and renamed over the old one, then the directory is fsynced): after a crash it names either the
old or the new slot, never anything else. A slot being filled is built under a temporary name and
renamed into place complete. The signed-update state machine (DOWNLOADING → ... → COMMITTED) stages
into ``inactive_slot()`` and calls ``activate``; ``install`` is the local, offline form of that.

Files and folders get the umask's modes. Run as root on a state directory someone else owns (an
operator's ``install-model`` beside an agent running as its own user), every new file is given to
that owner before it appears, so the agent can read, replace and remove it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from edgeopt.artifact import open_artifact, refuse_failed
from edgeopt.errors import EdgeoptError, UserInputError
from edgeopt.fsutil import (
    Owner,
    atomic_write_bytes,
    chown_tree,
    copy_tree,
    environment_fault,
    fsync_dir,
    fsync_tree,
    make_temp_dir,
)

SLOTS = ("a", "b")
ACTIVE = "active"
GOOD = ".passed"  # inside a slot: the sha256 of the manifest that passed its checks


class StateDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def owner(self) -> Owner | None:
        """(uid, gid) for new files: the state directory's owner when this process runs as root and
        someone else owns it; None otherwise (new files are ours, as usual)."""
        if os.geteuid() != 0:
            return None
        try:
            st = self.root.stat()
        except OSError:
            return None
        return None if st.st_uid == 0 else (st.st_uid, st.st_gid)

    def ensure(self) -> None:
        slots = self.root / "slots"
        try:
            if not slots.is_dir():
                slots.mkdir(parents=True, exist_ok=True)
                if (owner := self.owner()) is not None:
                    os.chown(slots, *owner)
        except OSError as exc:
            raise environment_fault(exc, self.root) from exc

    def slot_path(self, slot: str) -> Path:
        if slot not in SLOTS:
            raise ValueError(f"unknown slot {slot!r}")
        return self.root / "slots" / slot

    def active_slot(self) -> str | None:
        try:
            slot = (self.root / ACTIVE).read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise environment_fault(exc, self.root / ACTIVE) from exc
        if slot not in SLOTS:
            raise UserInputError(f"{self.root / ACTIVE}: names slot {slot!r}; expected one of {', '.join(SLOTS)}")
        return slot

    def active_artifact(self) -> Path | None:
        slot = self.active_slot()
        return None if slot is None else self.slot_path(slot)

    def inactive_slot(self) -> str:
        return "b" if self.active_slot() == "a" else "a"

    def activate(self, slot: str) -> None:
        """Make ``slot`` the active one (one atomic rename)."""
        manifest = self.slot_path(slot) / "manifest.json"
        try:
            present = manifest.is_file()
        except OSError as exc:
            raise environment_fault(exc, manifest) from exc
        if not present:
            raise UserInputError(f"slot {slot} holds no artifact ({self.slot_path(slot)})")
        atomic_write_bytes(self.root / ACTIVE, f"{slot}\n".encode(), owner=self.owner())

    def mark_good(self, slot: str) -> None:
        """Record that the model in ``slot`` passed its checks (installed by an operator, or committed
        after self-test and probation). The mark lives inside the slot, so restaging the slot drops it,
        and it names the manifest it vouches for."""
        path = self.slot_path(slot)
        try:
            digest = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
        except OSError as exc:
            raise environment_fault(exc, path / "manifest.json") from exc
        atomic_write_bytes(path / GOOD, digest.encode(), owner=self.owner())

    def is_good(self, slot: str) -> bool:
        path = self.slot_path(slot)
        try:
            return (path / GOOD).read_text() == hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
        except OSError:
            return False

    def deactivate(self) -> None:
        """No active slot (a first install rolled back): the agent waits for a model again."""
        try:
            (self.root / ACTIVE).unlink(missing_ok=True)
            fsync_dir(self.root)
        except OSError as exc:
            raise environment_fault(exc, self.root / ACTIVE) from exc

    def slot_problem(self, slot: str) -> str | None:
        """Why the artifact in ``slot`` cannot be used — unreadable, damaged, failing its hashes — or
        None when it reads and verifies."""
        try:
            open_artifact(self.slot_path(slot)).verify()
        except EdgeoptError as exc:
            return str(exc)
        return None

    def stage(self, artifact_dir: str | Path, slot: str) -> Path:
        """Copy a verified artifact into ``slot`` (never the active one), complete or not at all."""
        if slot == self.active_slot():
            raise UserInputError(f"slot {slot} is active; stage into the inactive slot")
        source = open_artifact(artifact_dir)
        source.verify()
        self.ensure()
        dest = self.slot_path(slot)
        tmp = None
        try:
            tmp = make_temp_dir(dest.parent, f".{slot}.", ".partial")
            copy_tree(source.root, tmp)
            if (owner := self.owner()) is not None:
                chown_tree(tmp, owner)
            fsync_tree(tmp)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        except OSError as exc:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise environment_fault(exc, dest) from exc
        open_artifact(dest).verify()
        return dest

    def install(self, artifact_dir: str | Path, allow_failed: bool = False) -> str:
        """Stage an artifact into the inactive slot and activate it; returns the slot. An artifact
        whose report says it failed its checks is refused unless ``allow_failed``."""
        refuse_failed(open_artifact(artifact_dir), allow_failed)
        slot = self.inactive_slot()
        self.stage(artifact_dir, slot)
        self.activate(slot)
        self.mark_good(slot)  # an operator installed it by hand
        return slot
