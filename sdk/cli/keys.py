"""``edgeopt keys``: signing keys and root metadata for a fleet repository."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group("keys")
def keys_cmd() -> None:
    """Create and rotate the signing keys of a fleet repository (TUF roles)."""


@keys_cmd.command("init")
@click.argument("repo", type=click.Path(path_type=Path))
@click.option("--root-keys", type=int, default=1, show_default=True, help="Number of root keys to create.")
@click.option("--root-threshold", type=int, default=1, show_default=True,
              help="How many root keys must sign a new root.")
@click.option("--expiry", default="", metavar="ROLE=N(s|m|h|d),...",
              help="Expiry per role (defaults: root=365d, targets=90d, snapshot=7d, timestamp=1d).")
def init_cmd(repo: Path, root_keys: int, root_threshold: int, expiry: str) -> None:
    """Create REPO: Ed25519 keys (mode 0600) for root, targets, snapshot and timestamp, and the
    first signed metadata. Move the root keys offline afterwards; devices pin metadata/1.root.json."""
    from edgeopt.fleet.repository import Repository, parse_expiry  # lazy (as below): numpy, not for --help

    r = Repository.init(repo, root_keys=root_keys, root_threshold=root_threshold, expiry=parse_expiry(expiry))
    click.echo(f"created repository {r.root}: {root_keys} root key(s), threshold {root_threshold}; "
               f"pin {r.metadata_dir / '1.root.json'} on devices; keep {r.keys_dir}/root-*.pem offline")


@keys_cmd.command("rotate-root")
@click.argument("repo", type=click.Path(path_type=Path))
@click.option("--root-keys", type=int, default=1, show_default=True, help="Number of new root keys.")
@click.option("--root-threshold", type=int, default=1, show_default=True, help="Threshold of the new root.")
@click.option("--old-key", "old_keys", multiple=True, type=click.Path(path_type=Path),
              help="Old root key file(s) to sign with (default: every root key in REPO/keys).")
@click.option("--rotate-online", multiple=True, type=click.Choice(["targets", "snapshot", "timestamp"]),
              help="Also replace the key of this online role (repeatable).")
def rotate_root_cmd(repo: Path, root_keys: int, root_threshold: int, old_keys: tuple[Path, ...],
                    rotate_online: tuple[str, ...]) -> None:
    """Write the next root version with new root keys, signed by the old and the new thresholds."""
    from edgeopt.fleet.repository import Repository

    version = Repository(repo).rotate_root(root_keys, root_threshold, list(old_keys) or None, tuple(rotate_online))
    click.echo(json.dumps({"root_version": version}))
