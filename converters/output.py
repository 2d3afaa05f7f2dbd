"""Where ``edgeopt convert`` may write, checked before any work (before the model is even loaded).

- An existing output location is replaced only with ``--force``, and then only when it is empty or an
  earlier edgeopt artifact (a ``manifest.json`` and the files it lists, nothing else): never a folder
  that holds an input of this conversion (the model, its data) or anything else someone put there.
- The output's parent must be writable: found out by creating (and removing) an entry there, which is
  what holds for root, read-only mounts and ACLs alike.
- The free space must cover an estimate of what the conversion writes (see ``space_needed``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgeopt.artifact import GOLDEN, MANIFEST, REPORT
from edgeopt.errors import EnvironmentFault, UserInputError
from edgeopt.fsutil import check_output_dir, check_writable_dir
from edgeopt.profiles import format_size

MiB = 2**20


def replace_problem(dest: Path, inputs: list[Path]) -> str | None:
    """Why ``--force`` must not replace the existing directory ``dest`` (None: it may)."""
    dest = Path(dest)
    real = Path(os.path.realpath(dest))
    for path in inputs:
        resolved = Path(os.path.realpath(path))
        if resolved == real or real in resolved.parents:
            return (f"output location {dest} holds {path}, an input of this conversion, and --force replaces the "
                    f"whole directory: write the artifact to another directory")
    entries = sorted(p.name for p in dest.iterdir())
    if not entries:
        return None
    if MANIFEST not in entries:
        return (f"output location {dest} is not empty and is not an edgeopt artifact (no {MANIFEST}): --force "
                f"replaces only an empty directory or an earlier artifact; choose another -o or empty it")
    others = [e for e in entries if e not in _artifact_entries(dest / MANIFEST)]
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        return (f"output location {dest} holds {shown} besides an edgeopt artifact, which --force would delete: "
                f"move {'it' if len(others) == 1 else 'them'} away or choose another -o")
    return None


def _artifact_entries(manifest: Path) -> set[str]:
    """Top-level names an artifact directory holds: the manifest, report, golden vectors, the model
    (with an ONNX model's external data) and whatever the manifest lists."""
    names = {MANIFEST, REPORT, GOLDEN}
    try:
        doc = json.loads(manifest.read_text())
        model_file = doc["model"]["file"]
        listed = doc.get("files") or {}
    except (OSError, ValueError, TypeError, KeyError):
        return names  # an unreadable manifest: its model file counts as "anything else"
    names.update({str(model_file), f"{model_file}.data"})
    names.update(str(name).split("/")[0] for name in listed)
    return names


@dataclass(frozen=True)
class SpaceNeeded:
    """Bytes a conversion writes next to the output location and into the temporary directory."""

    output: int
    temp: int


def space_needed(source_bytes: int, quantize: str, compression_steps: int) -> SpaceNeeded:
    """What a conversion of a ``source_bytes`` model writes, from measurements of peak disk use while
    converting the 4.5 MB digits MLP (sampled every 20 ms, this machine, 2026-12):

    - output (staging directory + golden + report): at most 1.03x the source for every target with
      float weights kept (onnx, tflite, coreml fp32, tvm), less when quantized → 1.1x + 1 MiB;
    - temporary directory: nothing for onnx / tflite without quantization, 1.0x for coreml and tvm
      (the saved program, the host stand-in library), 3.0x for tvm int8, 3.5x for onnx int8 (ONNX
      Runtime's quantizer writes the pre-processed, augmented and quantized models), 5.0x for
      prune + int8 (one model per compression step for the report's per-step measurements)
      → 1x + 3x when quantizing + 1x per compression step, + 1 MiB.
    """
    output = int(1.1 * source_bytes) + MiB
    temp = int(source_bytes * (1 + (3 if quantize != "none" else 0) + compression_steps)) + MiB
    return SpaceNeeded(output, temp)


def check_output_location(dest: Path, force: bool, inputs: list[Path], need: SpaceNeeded | None) -> None:
    """Everything about the output location that can be refused, refused before any work."""
    dest = Path(dest)
    check_output_dir(dest, force)
    if dest.exists() and (problem := replace_problem(dest, inputs)):
        raise UserInputError(problem)
    parent = Path(os.path.realpath(dest)).parent
    try:
        check_writable_dir(parent)
    except EnvironmentFault as exc:
        raise EnvironmentFault(f"output location {dest}: {exc}") from exc
    if need is not None:
        _check_space(dest, parent, need)


def _check_space(dest: Path, parent: Path, need: SpaceNeeded) -> None:
    temp = Path(tempfile.gettempdir())
    try:
        same_disk = os.stat(parent).st_dev == os.stat(temp).st_dev
        demands = ([(parent, need.output + need.temp, "the artifact and the temporary files")] if same_disk
                   else [(parent, need.output, "the artifact"), (temp, need.temp, "the temporary files")])
        for where, needed, what in demands:
            free = shutil.disk_usage(where).free
            if free < needed:
                shown = f"output location {dest}" if where == parent else "the temporary directory ($TMPDIR)"
                raise EnvironmentFault(f"not enough space: {shown} has {format_size(free)} free on its file system "
                                       f"and {what} need about {format_size(needed)}: free some, or write "
                                       f"{'elsewhere (-o)' if where == parent else 'temporary files elsewhere (TMPDIR)'}")
    except OSError:  # cannot tell: the write itself will say so
        return
