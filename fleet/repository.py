"""The signed model repository: TUF metadata (root, targets, snapshot, timestamp) over a directory.

    REPO/keys/root-1.pem ...        Ed25519 root keys (0600) — keep them offline after `keys init`
    REPO/keys/{targets,snapshot,timestamp}.pem   online keys used by publish / revoke / refresh
    REPO/metadata/N.root.json       every root version (devices walk the chain when root rotates)
    REPO/metadata/N.targets.json    consistent snapshots: each version under its own name
    REPO/metadata/N.snapshot.json
    REPO/metadata/timestamp.json
    REPO/targets/SHA256.NAME-VERSION.tar   packed artifacts, named by hash (consistent snapshots)
    REPO/targets/SHA256.NAME-VERSION.from-BASESHA.zst   deltas to a version from an earlier one (edgeopt.delta)

The signed targets metadata is the allow-list: a model is installable only while its
``NAME-VERSION.tar`` entry is in it. Publishing adds an entry (versions are immutable), revoking
removes it. Every change bumps and re-signs targets, snapshot and timestamp under a file lock.
All metadata handling is python-tuf's (``tuf.api.metadata``); this module only decides layout,
naming and which role changes when.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from edgeopt.artifact import open_artifact, pack_artifact, refuse_failed
from edgeopt.delta import delta_path
from edgeopt.errors import EdgeoptError, UserInputError
from edgeopt.fleet.tensor_spans import chosen_delta
from edgeopt.fsutil import atomic_write_bytes, fsync_dir
from edgeopt.protocol import REPO_PATH_RE, is_name, matches
from edgeopt.signing import generate_key, load_signer

log = logging.getLogger("edgeopt.fleet.repository")
ROLES = ("root", "targets", "snapshot", "timestamp")
DELTA_BASES = 2      # a new version gets deltas from the last this many published versions of its model
# a delta at least this share of the full artifact is not published: below it a device on a metered link
# saves a quarter or more of the bytes; above it the saving is not worth another stored target and the
# device's rebuild (a whole-network fine-tune of a weights-only artifact comes out near half: docs/fleet.md)
DELTA_WORTH = 0.75
DEFAULT_EXPIRY = {"root": timedelta(days=365), "targets": timedelta(days=90), "snapshot": timedelta(days=7),
                  "timestamp": timedelta(days=1)}


def check_name(kind: str, value: str) -> str:
    if not is_name(value):
        raise UserInputError(f"invalid model {kind} {value!r}: use letters, digits, '.', '_', '+', '-' "
                             f"(at most 64, no '..', no '/')")
    return value


def target_name(name: str, version: str) -> str:
    """The TUF target path of a model version: ``NAME-VERSION.tar``."""
    return f"{check_name('name', name)}-{check_name('version', version)}.tar"


def check_labelled(manifest: dict[str, Any], name: str | None, version: str | None, where: str | Path) -> None:
    """The manifest must name the model and version it is published as (None: take the manifest's)."""
    labelled = (str(manifest.get("name")), str(manifest.get("version")))
    asked = (labelled[0] if name is None else name, labelled[1] if version is None else version)
    if labelled != asked:
        raise UserInputError(f"{where}: the manifest says {labelled[0]}@{labelled[1]}, not {asked[0]}@{asked[1]} "
                             f"(convert it with --name {asked[0]} --version {asked[1]})")


def parse_expiry(text: str) -> dict[str, timedelta]:
    """'targets=30d,timestamp=6h' → per-role expiry periods (the rest keep their defaults)."""
    out = dict(DEFAULT_EXPIRY)
    for part in filter(None, (p.strip() for p in text.split(","))):
        role, _, period = part.partition("=")
        m = re.fullmatch(r"(\d+)([smhd])", period.strip())
        if role not in ROLES or not m:
            raise UserInputError(f"--expiry {part!r}: expected ROLE=N(s|m|h|d) with ROLE in {', '.join(ROLES)}")
        out[role] = timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]:
                                 int(m.group(1))})
    return out


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class Repository:
    """A TUF repository in a directory. Mutating methods take an exclusive lock on REPO/.lock."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.metadata_dir = self.root / "metadata"
        self.targets_dir = self.root / "targets"
        self.keys_dir = self.root / "keys"
        if not (self.metadata_dir / "timestamp.json").is_file():
            raise UserInputError(f"{self.root}: not an edgeopt repository (run 'edgeopt keys init {self.root}')")

    # -- creation ------------------------------------------------------------------------------
    @classmethod
    def init(cls, root: str | Path, *, root_keys: int = 1, root_threshold: int = 1,
             expiry: dict[str, timedelta] | None = None) -> Repository:
        from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

        root = Path(root)
        if not 1 <= root_threshold <= root_keys:
            raise UserInputError(f"root threshold {root_threshold} must be between 1 and the number of root "
                                 f"keys ({root_keys})")
        if (root / "metadata").exists() or (root / "keys").exists():
            raise UserInputError(f"{root} already holds a repository; refusing to overwrite its keys")
        expiry = expiry or DEFAULT_EXPIRY
        for sub in ("metadata", "targets", "keys"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "keys").chmod(0o700)
        root_signers = [generate_key(root / "keys" / f"root-{i + 1}.pem") for i in range(root_keys)]
        online = {role: generate_key(root / "keys" / f"{role}.pem") for role in ("targets", "snapshot", "timestamp")}

        now = _now()
        root_md = Metadata(Root(expires=now + expiry["root"], consistent_snapshot=True))
        for signer in root_signers:
            root_md.signed.add_key(signer.public_key, "root")
        root_md.signed.roles["root"].threshold = root_threshold
        for role, signer in online.items():
            root_md.signed.add_key(signer.public_key, role)
        repo_files = {
            "1.root.json": root_md,
            "1.targets.json": Metadata(Targets(expires=now + expiry["targets"])),
            "1.snapshot.json": Metadata(Snapshot(expires=now + expiry["snapshot"])),
            "timestamp.json": Metadata(Timestamp(expires=now + expiry["timestamp"])),
        }
        for signer in root_signers:
            root_md.sign(signer, append=True)
        repo_files["1.targets.json"].sign(online["targets"])
        repo_files["1.snapshot.json"].sign(online["snapshot"])
        repo_files["timestamp.json"].sign(online["timestamp"])
        for name, md in repo_files.items():
            _write(root / "metadata" / name, md)
        repo = cls(root)
        repo._write_expiry_policy(expiry)
        return repo

    # -- reading -------------------------------------------------------------------------------
    def _load(self, name: str):
        from tuf.api.metadata import Metadata

        return Metadata.from_file(str(self.metadata_dir / name))

    def root_version(self) -> int:
        versions = [int(p.name.split(".")[0]) for p in self.metadata_dir.glob("*.root.json")]
        return max(versions)

    def root_metadata(self):
        return self._load(f"{self.root_version()}.root.json")

    def current(self) -> tuple[Any, Any, Any]:
        """(timestamp, snapshot, targets) metadata as the repository serves them now."""
        ts = self._load("timestamp.json")
        snap = self._load(f"{ts.signed.snapshot_meta.version}.snapshot.json")
        tgt = self._load(f"{snap.signed.meta['targets.json'].version}.targets.json")
        return ts, snap, tgt

    def list_models(self) -> list[dict[str, Any]]:
        """The published model versions (deltas are not models: see ``list_deltas``)."""
        _, _, targets = self.current()
        return [{"target": path, "length": tf.length, "sha256": tf.hashes["sha256"], **(tf.custom or {})}
                for path, tf in sorted(targets.signed.targets.items()) if "delta" not in (tf.custom or {})]

    def list_deltas(self) -> list[dict[str, Any]]:
        _, _, targets = self.current()
        return [{"target": path, "length": tf.length, "sha256": tf.hashes["sha256"], **tf.custom["delta"]}
                for path, tf in sorted(targets.signed.targets.items()) if "delta" in (tf.custom or {})]

    def file_for(self, repo_path: str) -> Path | None:
        """The file behind a request path ('metadata/3.targets.json', 'targets/<sha>.<name>'), or None.

        Request paths come from the network: they must match ``REPO_PATH_RE`` (no '/', no '..' in
        the file name), and the result must still lie inside the repository.
        """
        if not matches(REPO_PATH_RE, repo_path) or ".." in repo_path:
            return None
        path = (self.root / repo_path).resolve()
        base = (self.root / repo_path.split("/", 1)[0]).resolve()
        if path.parent != base or not path.is_file():
            return None
        return path

    # -- changes ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _expiry(self) -> dict[str, timedelta]:
        import json

        path = self.root / "expiry.json"
        if not path.is_file():
            return dict(DEFAULT_EXPIRY)
        return {role: timedelta(seconds=s) for role, s in json.loads(path.read_text()).items()}

    def _write_expiry_policy(self, expiry: dict[str, timedelta]) -> None:
        import json

        atomic_write_bytes(self.root / "expiry.json",
                           json.dumps({r: int(d.total_seconds()) for r, d in expiry.items()}).encode())

    def publish(self, artifact_dir: str | Path, name: str | None = None, version: str | None = None,
                allow_failed: bool = False) -> dict[str, Any]:
        """Pack and sign an artifact directory as ``NAME-VERSION.tar``; returns its listing entry.

        Refused: an artifact whose manifest names another name or version than the one asked for
        (devices check that the manifest matches the signed target, and would refuse it), and one
        whose report says it failed its checks, unless ``allow_failed`` — which is then signed into
        the target's custom fields (``allow_failed``, ``failed_checks``) for devices and operators."""
        from tuf.api.metadata import TargetFile

        for kind, asked in (("name", name), ("version", version)):
            if asked is not None:
                check_name(kind, asked)
        artifact = open_artifact(artifact_dir)
        artifact.verify()
        check_labelled(artifact.manifest, name, version, artifact_dir)
        failed = refuse_failed(artifact, allow_failed)
        name = check_name("name", artifact.manifest["name"])
        version = check_name("version", artifact.manifest["version"])
        path = target_name(name, version)
        with self._locked():
            _, _, targets = self.current()
            if path in targets.signed.targets:
                raise UserInputError(f"{name}@{version} is already published; versions are immutable "
                                     f"(publish a new version)")
            fd, tmp = tempfile.mkstemp(dir=self.targets_dir, suffix=".partial")
            os.close(fd)
            try:
                pack_artifact(Path(artifact_dir), Path(tmp))
                tf = TargetFile.from_file(path, tmp, ["sha256"])
                tf.unrecognized_fields["custom"] = {
                    "name": name, "version": version, "format": artifact.format,
                    "runtime": artifact.manifest["model"].get("runtime"),
                    "profile": artifact.manifest.get("target_profile"),
                    "quantize": artifact.manifest["model"].get("quantize"),
                    "published_at": _now().isoformat(timespec="seconds"),
                }
                if failed:
                    tf.unrecognized_fields["custom"].update(
                        allow_failed=True, failed_checks=[f[:200] for f in failed[:10]])
                full = self.targets_dir / f"{tf.hashes['sha256']}.{path}"
                Path(tmp).replace(full)
                deltas, skipped = self._write_deltas(targets.signed.targets, name, version, full, tf)
                fsync_dir(self.targets_dir)
            finally:
                Path(tmp).unlink(missing_ok=True)
            targets.signed.targets[path] = tf
            for dtf in deltas:
                targets.signed.targets[dtf.path] = dtf
            self._commit_targets(targets)
        return {"target": path, "length": tf.length, "sha256": tf.hashes["sha256"], **tf.custom,
                "deltas": [{"base_version": d.custom["delta"]["base_version"], "target": d.path, "length": d.length,
                            "codec": d.custom["delta"]["codec"]} for d in deltas],
                "deltas_skipped": skipped}

    def _write_deltas(self, published: dict, name: str, version: str, full: Path, tf) -> tuple[list, list]:
        """Deltas to the new ``full`` artifact from the last DELTA_BASES published versions of the same
        model (edgeopt.delta: the XOR kind where tensors line up and it is smaller, else patch-from), each
        a target of its own naming its base and the full target it makes; one not smaller than
        DELTA_WORTH × the full artifact is not worth a target and is skipped (``skipped`` says why)."""
        from tuf.api.metadata import TargetFile

        bases = sorted((t for t in published.values() if (t.custom or {}).get("name") == name),
                       key=lambda t: t.custom.get("published_at", ""))  # older repositories: no date, first
        new = full.read_bytes()
        out, skipped = [], []
        for base in bases[-DELTA_BASES:]:
            base_file = self.targets_dir / f"{base.hashes['sha256']}.{base.path}"
            if not base_file.is_file():
                skipped.append({"base_version": base.custom["version"], "why": "its artifact is not in the repository"})
                continue
            fd, tmp = tempfile.mkstemp(dir=self.targets_dir, suffix=".partial")
            os.close(fd)
            try:  # a delta is an optimisation: one that cannot be made leaves the version published without it
                codec, patch = chosen_delta(base_file.read_bytes(), new)
                if len(patch) >= DELTA_WORTH * len(new):
                    skipped.append({"base_version": base.custom["version"], "length": len(patch),
                                    "why": f"{len(patch) / len(new):.0%} of the full artifact: not worth it"})
                    continue
                dpath = delta_path(name, version, base.hashes["sha256"])
                Path(tmp).write_bytes(patch)
                dtf = TargetFile.from_file(dpath, tmp, ["sha256"])
                dtf.unrecognized_fields["custom"] = {"delta": {
                    "name": name, "version": version, "base_version": base.custom["version"],
                    "base_sha256": base.hashes["sha256"], "full_sha256": tf.hashes["sha256"],
                    "full_length": tf.length, "codec": codec}}
                Path(tmp).replace(self.targets_dir / f"{dtf.hashes['sha256']}.{dpath}")
                out.append(dtf)
            except (EdgeoptError, OSError, MemoryError) as exc:
                log.warning("no delta to %s@%s from %s@%s: %s", name, version, name, base.custom["version"], exc)
                skipped.append({"base_version": base.custom["version"], "why": str(exc).splitlines()[0][:200]})
            finally:
                Path(tmp).unlink(missing_ok=True)
        return out, skipped

    def revoke(self, name: str, version: str) -> None:
        """Remove NAME@VERSION from the signed targets: no device will install it from now on."""
        path = target_name(name, version)
        with self._locked():
            _, _, targets = self.current()
            if path not in targets.signed.targets:
                raise UserInputError(f"{name}@{version} is not in the repository")
            del targets.signed.targets[path]
            for dpath, dtf in list(targets.signed.targets.items()):  # the deltas that make it go too
                d = (dtf.custom or {}).get("delta") or {}
                if (d.get("name"), d.get("version")) == (name, version):
                    del targets.signed.targets[dpath]
            self._commit_targets(targets)

    def refresh_timestamp(self) -> int:
        """Re-sign the timestamp with a new expiry (the fleet service does this periodically)."""
        with self._locked():
            ts, _, _ = self.current()
            return self._commit_timestamp(ts, ts.signed.snapshot_meta.version)

    def _commit_targets(self, targets) -> None:
        expiry = self._expiry()
        ts, snap, _ = self.current()
        targets.signed.version += 1
        targets.signed.expires = _now() + expiry["targets"]
        targets.sign(load_signer(self.keys_dir / "targets.pem"))
        _write(self.metadata_dir / f"{targets.signed.version}.targets.json", targets)
        snap.signed.version += 1
        snap.signed.expires = _now() + expiry["snapshot"]
        snap.signed.meta["targets.json"].version = targets.signed.version
        snap.sign(load_signer(self.keys_dir / "snapshot.pem"))
        _write(self.metadata_dir / f"{snap.signed.version}.snapshot.json", snap)
        self._commit_timestamp(ts, snap.signed.version)

    def _commit_timestamp(self, ts, snapshot_version: int) -> int:
        ts.signed.version += 1
        ts.signed.expires = _now() + self._expiry()["timestamp"]
        ts.signed.snapshot_meta.version = snapshot_version
        ts.sign(load_signer(self.keys_dir / "timestamp.pem"))
        _write(self.metadata_dir / "timestamp.json", ts)
        return ts.signed.version

    def rotate_root(self, new_root_keys: int, threshold: int, old_key_files: list[Path] | None = None,
                    rotate_online: tuple[str, ...] = ()) -> int:
        """Write root version N+1 with freshly generated root keys (and, optionally, new online keys
        for some roles), signed by a threshold of the old root keys AND of the new ones, as TUF
        requires so that devices can walk from the root they trust to the new one."""
        from tuf.api.metadata import Metadata

        if not 1 <= threshold <= new_root_keys:
            raise UserInputError(f"root threshold {threshold} must be between 1 and {new_root_keys}")
        with self._locked():
            old = self.root_metadata()
            new: Metadata = Metadata.from_dict(old.to_dict())
            version = old.signed.version + 1
            old_files = old_key_files or sorted(self.keys_dir.glob("root-*.pem"))
            old_signers = [s for s in map(load_signer, old_files) if s.public_key.keyid in old.signed.roles["root"].keyids]
            for keyid in list(new.signed.roles["root"].keyids):
                new.signed.revoke_key(keyid, "root")
            new_signers = [generate_key(self.keys_dir / f"root-v{version}-{i + 1}.pem") for i in range(new_root_keys)]
            for signer in new_signers:
                new.signed.add_key(signer.public_key, "root")
            new.signed.roles["root"].threshold = threshold
            for role in rotate_online:
                for keyid in list(new.signed.roles[role].keyids):
                    new.signed.revoke_key(keyid, role)
                key_file = self.keys_dir / f"{role}.pem"
                key_file.rename(self.keys_dir / f"{role}-retired-v{version}.pem")
                new.signed.add_key(generate_key(key_file).public_key, role)
            new.signed.version = version
            new.signed.expires = _now() + self._expiry()["root"]
            new.signatures.clear()
            for signer in old_signers + new_signers:
                new.sign(signer, append=True)
            _write(self.metadata_dir / f"{version}.root.json", new)
        if rotate_online:  # re-sign what the rotated online keys cover
            with self._locked():
                _, _, targets = self.current()
                self._commit_targets(targets)
        return version


def _write(path: Path, md) -> None:
    from tuf.api.serialization.json import JSONSerializer

    atomic_write_bytes(path, md.to_bytes(JSONSerializer(compact=False)))
