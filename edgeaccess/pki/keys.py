"""Key generation and (de)serialisation helpers.

Every key edgeaccess creates is Ed25519: small, fast, and understood by
OpenSSH, TLS 1.3 and ``cryptography`` alike.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


def generate_private_key() -> ed25519.Ed25519PrivateKey:
    """A fresh Ed25519 private key."""
    return ed25519.Ed25519PrivateKey.generate()


def private_key_openssh(key) -> bytes:
    """``key`` in OpenSSH's private key format (what ``ssh -i`` reads)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def private_key_pem(key) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM (what TLS libraries read)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(data: bytes):
    """Load a private key in OpenSSH or PEM (PKCS#8) format."""
    if b"OPENSSH PRIVATE KEY" in data:
        return serialization.load_ssh_private_key(data, password=None)
    return serialization.load_pem_private_key(data, password=None)


def public_key_openssh(key) -> bytes:
    """The ``ssh-ed25519 AAAA...`` line of a private or public key."""
    public = key.public_key() if hasattr(key, "public_key") else key
    return public.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


def load_public_key_openssh(line: bytes | str):
    """Parse an ``ssh-ed25519 AAAA...`` line (no certificates).

    :raises ValueError: not an OpenSSH public key line of a supported type
        (cryptography says UnsupportedAlgorithm for an unknown type, and
        NotImplementedError for a compressed elliptic-curve point).
    """
    if isinstance(line, str):
        line = line.encode("ascii")
    try:
        return serialization.load_ssh_public_key(line.strip())
    except (UnsupportedAlgorithm, NotImplementedError) as error:
        raise ValueError(str(error)) from None


def ssh_fingerprint(public_key) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key."""
    blob = base64.b64decode(public_key_openssh(public_key).split()[1])
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by the owner only."""
    _write_atomically(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Write non-secret ``data`` to ``path`` atomically (mode 0644)."""
    _write_atomically(path, data, 0o644)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    # Write, fsync, rename: a crash leaves the old file or the new one,
    # never half of one.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
