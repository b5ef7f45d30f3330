"""OpenSSH certificates: issuing user and host certificates, reading them back.

Issuing only: checking a certificate presented by a peer (trusted CA,
type, validity, principals, critical options) is the job of
:mod:`edgeaccess.ssh.certauth`.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timedelta, timezone

import attrs
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import ssh

#: Custom certificate extensions (values are JSON).
EXT_ROLES = "roles@edgeaccess"
EXT_CLUSTER = "cluster@edgeaccess"
EXT_TRAITS = "traits@edgeaccess"

#: How far in the past a certificate becomes valid, to absorb clock skew.
CLOCK_SKEW = timedelta(minutes=1)


def _epoch(when: datetime) -> int:
    return int(when.timestamp())


def _serial() -> int:
    return secrets.randbits(63)


def issue_user_certificate(
    ca_key,
    public_key,
    *,
    username: str,
    principals: list[str] | tuple[str, ...],
    roles: list[str] | tuple[str, ...],
    cluster: str,
    now: datetime,
    ttl: timedelta,
    traits: dict[str, list[str]] | None = None,
    permit_port_forwarding: bool = False,
    permit_agent_forwarding: bool = False,
    critical_options: dict[str, str] | None = None,
) -> ssh.SSHCertificate:
    """Sign a user certificate for ``public_key``.

    The key id is the user name, the principals are the logins the user may
    use; ``permit-pty`` always, the forwarding permissions when granted, and
    the user's roles, cluster and traits as custom extensions.
    """
    if not principals:
        raise ValueError("a user certificate needs at least one principal")
    builder = (
        ssh.SSHCertificateBuilder()
        .public_key(public_key)
        .serial(_serial())
        .type(ssh.SSHCertificateType.USER)
        .key_id(username.encode("utf-8"))
        .valid_principals([p.encode("utf-8") for p in principals])
        .valid_after(_epoch(now - CLOCK_SKEW))
        .valid_before(_epoch(now + ttl))
        .add_extension(b"permit-pty", b"")
        .add_extension(EXT_ROLES.encode(), json.dumps(list(roles)).encode())
        .add_extension(EXT_CLUSTER.encode(), cluster.encode("utf-8"))
        .add_extension(
            EXT_TRAITS.encode(),
            json.dumps(traits or {}, sort_keys=True).encode(),
        )
    )
    if permit_port_forwarding:
        builder = builder.add_extension(b"permit-port-forwarding", b"")
    if permit_agent_forwarding:
        builder = builder.add_extension(b"permit-agent-forwarding", b"")
    for name, value in sorted((critical_options or {}).items()):
        builder = builder.add_critical_option(name.encode(), value.encode())
    return builder.sign(ca_key)


def issue_host_certificate(
    ca_key,
    public_key,
    *,
    host_id: str,
    principals: list[str] | tuple[str, ...],
    now: datetime,
    ttl: timedelta,
) -> ssh.SSHCertificate:
    """Sign a host certificate for ``public_key`` valid for ``principals``."""
    if not principals:
        raise ValueError("a host certificate needs at least one principal")
    return (
        ssh.SSHCertificateBuilder()
        .public_key(public_key)
        .serial(_serial())
        .type(ssh.SSHCertificateType.HOST)
        .key_id(host_id.encode("utf-8"))
        .valid_principals([p.encode("utf-8") for p in principals])
        .valid_after(_epoch(now - CLOCK_SKEW))
        .valid_before(_epoch(now + ttl))
        .sign(ca_key)
    )


def node_principals(name: str, uuid: str, cluster: str, extra=()) -> list[str]:
    """The principals a node's host certificate carries (SPEC: Addressing)."""
    found = [name, f"{name}.{cluster}", uuid, f"{uuid}.{cluster}", *extra]
    return list(dict.fromkeys(found))


def load_certificate(data: bytes | str) -> ssh.SSHCertificate:
    """Parse an OpenSSH certificate line (``...-cert-v01@openssh.com AAAA...``).

    :raises ValueError: not an OpenSSH certificate of a supported type.
    """
    if isinstance(data, str):
        data = data.encode("ascii")
    try:
        cert = ssh.load_ssh_public_identity(data.strip())
    except (UnsupportedAlgorithm, NotImplementedError) as error:
        raise ValueError(str(error)) from None
    if not isinstance(cert, ssh.SSHCertificate):
        raise ValueError("not an OpenSSH certificate")
    return cert


@attrs.frozen
class UserIdentity:
    """What a user certificate says about its holder (parsed, not verified)."""

    username: str
    principals: tuple[str, ...]
    roles: tuple[str, ...]
    cluster: str
    traits: dict
    valid_after: datetime
    valid_before: datetime
    serial: int
    permit_pty: bool
    permit_port_forwarding: bool
    permit_agent_forwarding: bool
    critical_options: dict
    #: The OpenSSH public line of the CA key that signed the certificate, so
    #: that a verifier can check that CA belongs to the claimed ``cluster``.
    signing_ca: str = ""


def _json_ext(exts: dict[bytes, bytes], name: str, default):
    raw = exts.get(name.encode())
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        raise ValueError(f"certificate extension {name} is not valid JSON")


def user_identity_from_certificate(cert: ssh.SSHCertificate) -> UserIdentity:
    """Read the identity a user certificate carries. Does not verify it."""
    exts = cert.extensions
    roles = _json_ext(exts, EXT_ROLES, [])
    traits = _json_ext(exts, EXT_TRAITS, {})
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise ValueError("certificate roles extension must be a list of names")
    if not isinstance(traits, dict):
        raise ValueError("certificate traits extension must be an object")
    return UserIdentity(
        username=cert.key_id.decode("utf-8", "replace"),
        principals=tuple(p.decode("utf-8", "replace") for p in cert.valid_principals),
        roles=tuple(roles),
        cluster=exts.get(EXT_CLUSTER.encode(), b"").decode("utf-8", "replace"),
        traits=traits,
        valid_after=datetime.fromtimestamp(cert.valid_after, timezone.utc),
        # 0xFFFFFFFFFFFFFFFF means forever; datetime stops at year 9999.
        valid_before=datetime.fromtimestamp(
            min(cert.valid_before, 253402300799), timezone.utc
        ),
        serial=cert.serial,
        permit_pty=b"permit-pty" in exts,
        permit_port_forwarding=b"permit-port-forwarding" in exts,
        permit_agent_forwarding=b"permit-agent-forwarding" in exts,
        critical_options={
            k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
            for k, v in cert.critical_options.items()
        },
        signing_ca=_public_line(cert.signature_key()),
    )


def _public_line(key) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH).decode("ascii")
