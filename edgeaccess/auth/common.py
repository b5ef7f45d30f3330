"""Small pieces shared by the auth service modules."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import attrs

from edgeaccess import errors
from edgeaccess.identity import resources
from edgeaccess.pki import keys


def _dumps(value) -> bytes:
    return json.dumps(value, sort_keys=True).encode("utf-8")


def _loads(item) -> dict:
    return json.loads(item.value)


def _iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@attrs.frozen
class Certificates:
    """What a successful login returns."""

    username: str
    ssh_certificate: str
    tls_certificate: str
    roles: tuple[str, ...]
    logins: tuple[str, ...]
    valid_before: datetime

    def to_dict(self) -> dict:
        return {
            "username": self.username,
            "ssh_certificate": self.ssh_certificate,
            "tls_certificate": self.tls_certificate,
            "roles": list(self.roles),
            "logins": list(self.logins),
            "valid_before": _iso(self.valid_before),
        }


def _validate_name(name: str, what: str) -> str:
    return resources.validate_resource_name(name, what)


def _load_public_key(text: str, what: str):
    try:
        return keys.load_public_key_openssh(text)
    except (ValueError, TypeError, UnicodeError):
        raise errors.BadRequest(f"{what} is not an OpenSSH public key")


def _load_pem_public_key(text: str, what: str):
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_public_key(text.encode("ascii"))
    except (ValueError, TypeError, UnicodeError, UnsupportedAlgorithm):
        raise errors.BadRequest(f"{what} is not a PEM public key")


def well_formed_token(token) -> bool:
    """Tokens we issue are hex; anything else is refused before any lookup
    (and never used to build a storage key)."""
    return isinstance(token, str) and token.isalnum() and 0 < len(token) <= 64


async def record_for_token(backend, prefix: str, token, error) -> dict:
    """The JSON record stored under ``prefix + token``, or raise ``error``
    (the same one for a malformed and an unknown token)."""
    if not well_formed_token(token):
        raise error
    try:
        return _loads(await backend.get(prefix + token))
    except errors.NotFound:
        raise error
