"""The artifact directory written by ``edgeopt convert`` and read by bench and the agent.

    DIR/model.<ext>     the compiled model
    DIR/manifest.json   what a device needs (I/O, preprocessing, golden tolerance, sha256 of every file)
    DIR/golden.npz      inputs and the original model's outputs for them (``input:NAME``, ``output:NAME``)
    DIR/report.json     what the engineer needs (sizes, parity, accuracy, latency, fit)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.errors import EnvironmentFault, UserInputError
from edgeopt.fsutil import sha256_file
from edgeopt.specs import TensorSpec

MANIFEST_SCHEMA = "edgeopt.manifest/1"
REPORT_SCHEMA = "edgeopt.report/1"
MANIFEST = "manifest.json"
REPORT = "report.json"
GOLDEN = "golden.npz"


class TamperedArtifact(UserInputError):
    """A file of an artifact does not match the sha256 its manifest lists (or is missing)."""


class UnreadableArtifact(EnvironmentFault):
    """A file of an artifact exists but cannot be read here (permissions, I/O error)."""


def _unreadable(exc: OSError, path: Path) -> UnreadableArtifact:
    return UnreadableArtifact(f"cannot read {path}: {exc.strerror or exc}")


def report_failures(report: Any) -> list[str]:
    """The checks a conversion report says failed ([] when it passed). A report fails when its
    ``status`` is "failed", when it lists ``failures``, or when its ``fit`` says the model does not fit."""
    if not isinstance(report, dict):
        return ["report.json is not a JSON object"]
    failures = report.get("failures")
    listed = [str(f) for f in failures] if isinstance(failures, list) else []
    if report.get("status") == "failed" and not listed:
        listed = ["status: failed"]
    fit = report.get("fit")
    if isinstance(fit, dict) and fit.get("ok") is False and not listed:
        listed = [f"does not fit profile {fit.get('profile')}"]
    return listed


def refuse_failed(artifact: Artifact, allow_failed: bool) -> list[str]:
    """Raise ``UserInputError`` when the artifact's report says it failed, unless ``allow_failed``;
    returns the failed checks (for the record of an allowed one)."""
    failures = artifact.failed_checks()
    if failures and not allow_failed:
        raise UserInputError(f"{artifact.root / REPORT}: the conversion failed its checks "
                             f"({'; '.join(failures)[:300]}); pass --allow-failed to use it anyway")
    return failures


def tool_versions(*packages: str) -> dict[str, str]:
    # lazy: the device agent opens artifacts without importing importlib.metadata (registry.BUILTIN)
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("edgeopt", "numpy", "onnx", "onnxruntime", "onnxslim", *packages):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def file_hashes(root: Path, names: list[str]) -> dict[str, str]:
    """sha256 of each named file; a directory (e.g. an .mlpackage) contributes each file inside it."""
    hashes = {}
    for name in names:
        path = root / name
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                hashes[str(f.relative_to(root))] = sha256_file(f)
        else:
            hashes[name] = sha256_file(path)
    return hashes


def save_golden(path: Path, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
                expected: dict[str, np.ndarray] | None = None) -> None:
    """``input:NAME`` and the original model's ``output:NAME``; ``expected:NAME`` (optional) holds
    the converted model's own outputs for the same inputs."""
    arrays = {f"input:{k}": v for k, v in inputs.items()}
    arrays.update({f"output:{k}": v for k, v in outputs.items()})
    arrays.update({f"expected:{k}": v for k, v in (expected or {}).items()})
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_expected(path: Path) -> dict[str, np.ndarray]:
    """The converted model's own golden outputs (empty for artifacts made before they were stored)."""
    with np.load(path, allow_pickle=False) as npz:
        return {k[len("expected:"):]: npz[k] for k in npz.files if k.startswith("expected:")}


def load_golden(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as npz:
        inputs = {k[len("input:"):]: npz[k] for k in npz.files if k.startswith("input:")}
        outputs = {k[len("output:"):]: npz[k] for k in npz.files if k.startswith("output:")}
    return inputs, outputs


@dataclass
class Artifact:
    """A loaded artifact directory (manifest parsed; files not yet verified)."""

    root: Path
    manifest: dict[str, Any]

    @property
    def model_file(self) -> Path:
        return self.root / self.manifest["model"]["file"]

    @property
    def format(self) -> str:
        return self.manifest["model"]["format"]

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_json(t) for t in self.manifest["inputs"]]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_json(t) for t in self.manifest["outputs"]]

    def report(self) -> dict[str, Any]:
        return json.loads((self.root / REPORT).read_text())

    def failed_checks(self) -> list[str]:
        """What report.json says failed ([] when it passed, or when the artifact has no report)."""
        path = self.root / REPORT
        try:
            report = json.loads(path.read_text())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _unreadable(exc, path) from exc
        except ValueError as exc:
            raise UserInputError(f"{path}: malformed JSON ({exc})") from exc
        return report_failures(report)

    def golden(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        return load_golden(self.root / GOLDEN)

    def verify(self) -> None:
        """Check every file against the manifest's sha256; raise ``TamperedArtifact`` naming the file."""
        files: dict[str, str] = self.manifest.get("files") or {}
        if not files:
            raise TamperedArtifact(f"{self.root / MANIFEST}: lists no file hashes")
        for rel, expected in files.items():
            path = (self.root / rel).resolve()
            if self.root.resolve() not in path.parents:
                raise TamperedArtifact(f"{self.root / MANIFEST}: file entry {rel!r} points outside the artifact")
            try:
                if not path.is_file():
                    raise TamperedArtifact(f"{self.root}: file {rel} listed in the manifest is missing")
                actual = sha256_file(path)
            except OSError as exc:
                raise _unreadable(exc, path) from exc
            if actual != expected:
                raise TamperedArtifact(f"{self.root}: {rel} does not match its sha256 in the manifest (modified?)")


def open_artifact(root: str | Path) -> Artifact:
    root = Path(root)
    path = root / MANIFEST
    try:
        if not path.is_file():
            raise UserInputError(f"{root}: not an edgeopt artifact (no {MANIFEST})")
        text = path.read_bytes()
    except OSError as exc:
        raise _unreadable(exc, path) from exc
    try:
        manifest = json.loads(text)
    except ValueError as exc:  # UnicodeDecodeError included
        raise UserInputError(f"{path}: malformed JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST_SCHEMA:
        raise UserInputError(f"{path}: unknown manifest schema {manifest.get('schema') if isinstance(manifest, dict) else None!r}")
    for key in ("model", "inputs", "outputs", "files"):
        if key not in manifest:
            raise UserInputError(f"{path}: manifest has no '{key}'")
    return Artifact(root, manifest)


# -- packing: one file per artifact for the signed repository ---------------------------------------

MAX_UNPACKED_BYTES = 4 * 2**30


def pack_artifact(root: Path, dest: Path, exclude: frozenset[str] = frozenset()) -> None:
    """Write the artifact directory ``root`` as a deterministic tar (sorted names, zeroed owners and
    times), so the same artifact always packs to the same bytes and the same sha256 — which is how a
    device rebuilds the archive of what it runs, to apply a delta to (``exclude``: top-level names of
    its own it keeps beside the artifact's files, such as the slot's pass mark)."""
    import tarfile

    root = Path(root)
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if rel.split("/", 1)[0] in exclude:
                continue
            info = tar.gettarinfo(str(path), arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise UserInputError(f"{path}: artifacts may hold only regular files and directories")
            info.mode = 0o755 if path.is_dir() else 0o644
            if path.is_file():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)


def _as_data_member(member, archive: Path):
    """What tarfile's 'data' filter does, for Pythons without it: a relative name that stays inside
    the destination, no setuid/setgid/sticky or group/other-write bits, owned by whoever unpacks it."""
    import os
    from pathlib import PurePosixPath

    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts or not name.parts:
        raise TamperedArtifact(f"{archive}: member {member.name!r} is not a relative path inside the artifact")
    member.mode &= 0o755
    member.uid, member.gid, member.uname, member.gname = os.getuid(), os.getgid(), "", ""
    return member


def unpack_artifact(archive: Path, dest: Path, max_bytes: int = MAX_UNPACKED_BYTES) -> Artifact:
    """Unpack a packed artifact into the new directory ``dest`` and verify every file's hash.

    Only regular files and directories with relative, non-escaping names are accepted (tarfile's
    'data' filter), and the unpacked size is capped: the archive came over the network.
    """
    import tarfile

    dest = Path(dest)
    try:
        with tarfile.open(archive, "r") as tar:
            members = tar.getmembers()
            total = 0
            for m in members:
                if not (m.isfile() or m.isdir()):
                    raise TamperedArtifact(f"{archive}: member {m.name!r} is not a regular file or directory")
                total += m.size
                if total > max_bytes:
                    raise TamperedArtifact(f"{archive}: unpacks to more than {max_bytes} bytes")
            if hasattr(tarfile, "data_filter"):
                dest.mkdir(parents=True)
                tar.extractall(dest, members=members, filter="data")
            else:  # Python < 3.11.4 (Debian bookworm, Raspberry Pi OS: 3.11.2) has no extraction filters
                members = [_as_data_member(m, archive) for m in members]
                dest.mkdir(parents=True)
                tar.extractall(dest, members=members)
    except tarfile.TarError as exc:  # includes the 'data' filter's refusals (FilterError)
        raise TamperedArtifact(f"{archive}: not a valid or not a safe artifact archive ({exc})") from exc
    artifact = open_artifact(dest)
    artifact.verify()
    return artifact
