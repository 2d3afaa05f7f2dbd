"""The device's view of the signed repository (python-tuf's ngclient does every check).

The device trusts only its pinned root (``metadata/root.json``, written at provisioning) and what
chains to it. ``refresh()`` walks root rotations and loads timestamp → snapshot → targets, checking
signatures, thresholds, expiry, versions (no rollback) and the snapshot/targets consistency; the
trusted metadata is kept on disk so a restart cannot be fed older metadata either. A model version
is installable only if it is in the signed targets (the allow-list); its bytes must match the
length and sha256 signed there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeopt.agent.update.fetcher import MqttFetcher, url_for
from edgeopt.errors import EdgeoptError, RemoteError, UserInputError


class UpdateRefused(EdgeoptError):
    """The repository or the request failed a security check; nothing is installed. ``reason`` is a
    short machine-readable word for the state topic, the message says what exactly."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class ModelTarget:
    path: str
    name: str
    version: str
    length: int
    sha256: str
    custom: dict[str, Any]


# python-tuf exception → our reason word. Order matters: subclasses first.
def _reason(exc: Exception) -> str:
    from tuf.api import exceptions as e

    for cls, word in ((e.ExpiredMetadataError, "expired"), (e.BadVersionNumberError, "rollback"),
                      (e.UnsignedMetadataError, "bad_signature"), (e.LengthOrHashMismatchError, "hash_mismatch"),
                      (e.DownloadLengthMismatchError, "oversized"), (e.RepositoryError, "repository_invalid"),
                      (e.DownloadError, "download_failed")):
        if isinstance(exc, cls):
            return word
    return "error"


class DeviceTrust:
    def __init__(self, metadata_dir: Path, fetcher: MqttFetcher, download_dir: Path):
        self.metadata_dir, self.fetcher, self.download_dir = Path(metadata_dir), fetcher, Path(download_dir)
        if not (self.metadata_dir / "root.json").is_file():
            raise UserInputError(f"no pinned root: {self.metadata_dir / 'root.json'} is missing (provision the device)")
        self.download_dir.mkdir(parents=True, exist_ok=True)
        self._updater = None

    def _new_updater(self):
        from tuf.ngclient import Updater, UpdaterConfig

        # targets metadata of a fleet stays small; artifacts are capped by their signed length
        config = UpdaterConfig(prefix_targets_with_hash=True)
        return Updater(str(self.metadata_dir), url_for("metadata"), str(self.download_dir), url_for("targets"),
                       fetcher=self.fetcher, config=config, bootstrap=None)

    def refresh(self) -> None:
        """Load the newest trusted metadata; raises ``UpdateRefused`` on any security failure."""
        from tuf.api import exceptions as e

        self._updater = self._new_updater()
        try:
            self._updater.refresh()
        except e.DownloadError as exc:
            self._updater = None
            raise RemoteError(f"repository unreachable: {exc}") from exc
        except e.RepositoryError as exc:
            self._updater = None
            raise UpdateRefused(_reason(exc), f"repository metadata refused: {exc}") from exc

    def lookup(self, name: str, version: str) -> ModelTarget:
        """The signed target for NAME@VERSION; ``UpdateRefused('not_allowed')`` if it is not signed."""
        from edgeopt.fleet.repository import target_name

        if self._updater is None:
            self.refresh()
        try:
            path = target_name(name, version)
        except UserInputError as exc:
            raise UpdateRefused("bad_name", str(exc)) from exc
        info = self._updater.get_targetinfo(path)
        if info is None:
            raise UpdateRefused("not_allowed", f"{name}@{version} is not in the signed targets (never published, "
                                               f"or revoked)")
        custom = info.custom or {}
        if custom.get("name") != name or custom.get("version") != version:
            raise UpdateRefused("repository_invalid", f"signed target {path} describes {custom.get('name')}@"
                                                      f"{custom.get('version')}")
        return ModelTarget(path, name, version, info.length, info.hashes["sha256"], custom)

    def download(self, target: ModelTarget) -> Path:
        """Download (resuming a partial download) and verify length + sha256; the verified file path."""
        from tuf.api import exceptions as e

        info = self._updater.get_targetinfo(target.path)
        dest = self.download_dir / target.path
        repo_path = f"targets/{target.sha256}.{target.path}"
        try:
            path = self._updater.download_target(info, str(dest))
        except e.LengthOrHashMismatchError as exc:
            self.fetcher.discard_partial(repo_path)  # poisoned bytes: never resume from them
            raise UpdateRefused("hash_mismatch", f"{target.path}: {exc}") from exc
        except e.DownloadLengthMismatchError as exc:
            self.fetcher.discard_partial(repo_path)
            raise UpdateRefused("oversized", f"{target.path}: {exc}") from exc
        except e.DownloadError as exc:
            raise RemoteError(f"download of {target.path} failed: {exc}") from exc
        self.fetcher.discard_partial(repo_path)
        return Path(path)
