"""Ed25519 signing keys for a fleet repository (python-tuf / securesystemslib signers).

Private keys are PKCS#8 PEM files written with mode 0600; a key file with looser permissions is
refused, like ssh does, because anyone who can read it can sign models for the whole fleet.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from edgeopt.errors import EnvironmentFault, UserInputError
from edgeopt.fsutil import atomic_write_bytes


def generate_key(path: Path):
    """Create a new Ed25519 key at ``path`` (0600) and return its signer."""
    from securesystemslib.signer import CryptoSigner

    path = Path(path)
    if path.exists():
        raise UserInputError(f"key file {path} already exists; refusing to overwrite a signing key")
    signer = CryptoSigner.generate_ed25519()
    atomic_write_bytes(path, signer.private_bytes, mode=0o600)
    return signer


def load_signer(path: Path):
    """The signer for the private key at ``path`` (which must not be readable by group or others)."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from securesystemslib.signer import CryptoSigner

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"signing key not found: {path}")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise EnvironmentFault(f"signing key {path} has permissions {oct(mode)}; run: chmod 600 {path}")
    try:
        private = load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise UserInputError(f"{path}: not a PEM private key ({exc})") from exc
    return CryptoSigner(private)
