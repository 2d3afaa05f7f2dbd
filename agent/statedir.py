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
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from edgeopt.artifact import open_artifact
from edgeopt.errors import UserInputError
from edgeopt.fsutil import atomic_write_bytes, environment_fault, fsync_dir, fsync_tree

SLOTS = ("a", "b")
ACTIVE = "active"


class StateDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def ensure(self) -> None:
        try:
            (self.root / "slots").mkdir(parents=True, exist_ok=True)
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
        if not (self.slot_path(slot) / "manifest.json").is_file():
            raise UserInputError(f"slot {slot} holds no artifact ({self.slot_path(slot)})")
        atomic_write_bytes(self.root / ACTIVE, f"{slot}\n".encode())

    def stage(self, artifact_dir: str | Path, slot: str) -> Path:
        """Copy a verified artifact into ``slot`` (never the active one), complete or not at all."""
        if slot == self.active_slot():
            raise UserInputError(f"slot {slot} is active; stage into the inactive slot")
        source = open_artifact(artifact_dir)
        source.verify()
        self.ensure()
        dest = self.slot_path(slot)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{slot}.", suffix=".partial", dir=dest.parent))
            os.rmdir(tmp)
            shutil.copytree(source.root, tmp)
            fsync_tree(tmp)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise environment_fault(exc, dest) from exc
        open_artifact(dest).verify()
        return dest

    def install(self, artifact_dir: str | Path) -> str:
        """Stage an artifact into the inactive slot and activate it; returns the slot."""
        slot = self.inactive_slot()
        self.stage(artifact_dir, slot)
        self.activate(slot)
        return slot
