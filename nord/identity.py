"""A peer's identity: an ed25519 key pair. The public key names the peer; its signature binds a
contribution (or a seal) to it.

Key files hold the private key as PKCS#8 PEM (what we write) or 32 raw bytes (accepted on read).
`load_or_create` creates a missing file atomically with mode 0600 and never replaces an existing one,
so two processes racing on the same path end up with the same key.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from nord.checks import PUBLIC_KEY_BYTES, fingerprint
from nord.errors import ConfigError
from nord.fsutil import fsync_dir

SIGNATURE_BYTES = 64


class Identity:
    """An ed25519 private key with its 32-byte public key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Identity:
        """From a 32-byte ed25519 seed (deterministic identities for tests and tools)."""
        if not isinstance(raw, bytes) or len(raw) != PUBLIC_KEY_BYTES:
            raise ConfigError("an ed25519 private key is 32 raw bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> Identity:
        """Load the key at `path`, creating it (PEM, mode 0600, atomically) if it does not exist."""
        p = Path(path)
        if not p.exists():
            _create_key_file(p, Ed25519PrivateKey.generate())
        return cls(_read_key_file(p))

    @property
    def public_hex(self) -> str:
        return self.public_key.hex()

    @property
    def fingerprint(self) -> str:
        """The short hex users compare and pin (`nord-node join --authority`)."""
        return fingerprint(self.public_hex)

    def private_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def sign(self, message: bytes) -> bytes:
        """64-byte ed25519 signature of `message`."""
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"Identity({self.public_hex[:16]}…)"


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True iff `signature` is `public_key`'s ed25519 signature of `message` (False if not, or malformed)."""
    if not all(isinstance(v, bytes) for v in (public_key, message, signature)):
        return False
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError, UnsupportedAlgorithm):
        return False
    return True


def _read_key_file(p: Path) -> Ed25519PrivateKey:
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read identity key {p}: {e.strerror}") from None
    if len(data) == PUBLIC_KEY_BYTES:
        return Ed25519PrivateKey.from_private_bytes(data)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"{p} is neither a PEM private key nor 32 raw ed25519 bytes") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{p} holds a {type(key).__name__}, not an ed25519 key")
    return key


def _create_key_file(p: Path, key: Ed25519PrivateKey) -> None:
    """Write `key` to a 0600 temp file, then link it to `p` unless someone else created `p` first."""
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(Identity(key).private_pem())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp_name, p)  # atomic create-if-absent
        except FileExistsError:
            pass  # another process won the race: use its key
        except OSError:
            os.replace(tmp_name, p)  # filesystems without hard links (e.g. FUSE mounts)
        fsync_dir(p.parent)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
