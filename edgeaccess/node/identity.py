"""A node's identity in its data directory.

Written once by the join (the token is needed only then) and rewritten
by each certificate renewal; every file is replaced atomically so a crash
never leaves a half-written identity.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import attrs

from edgeaccess.pki import keys, sshca, x509ca


@attrs.define
class NodeIdentity:
    uuid: str
    name: str
    cluster: str
    auth_server: str
    mode: str                  # "direct" or "tunnel"
    ssh_key: object
    ssh_certificate: str
    tls_key: object
    tls_certificate: str
    ca_pem: str
    user_ca_lines: list
    valid_before: str
    #: The server certificate of the agent port (``--agent-listen``; same
    #: key as ``tls_certificate``), for a LAN node that serves Kubernetes or apps.
    tls_server_certificate: str | None = None

    @property
    def host_certificate(self):
        return sshca.load_certificate(self.ssh_certificate)

    def valid_before_datetime(self) -> datetime:
        return datetime.fromisoformat(self.valid_before.replace("Z", "+00:00"))

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        keys.write_secret(directory / "ssh_host_key", keys.private_key_openssh(self.ssh_key))
        keys.write_public(directory / "ssh_host_key-cert.pub",
                          self.ssh_certificate.strip().encode() + b"\n")
        keys.write_secret(directory / "tls.key", keys.private_key_pem(self.tls_key))
        keys.write_public(directory / "tls.crt", self.tls_certificate.encode())
        keys.write_public(directory / "ca.pem", self.ca_pem.encode())
        if self.tls_server_certificate:
            keys.write_public(directory / "tls-server.crt", self.tls_server_certificate.encode())
        else:
            # No longer issued (the node stopped serving an agent port): no stale copy.
            (directory / "tls-server.crt").unlink(missing_ok=True)
        keys.write_public(directory / "ssh_user_ca.pub",
                          "\n".join(self.user_ca_lines).encode() + b"\n")
        meta = {"uuid": self.uuid, "name": self.name, "cluster": self.cluster,
                "auth_server": self.auth_server, "mode": self.mode,
                "valid_before": self.valid_before}
        # Written last: its presence means the identity is complete.
        keys.write_public(directory / "identity.json",
                          json.dumps(meta, indent=2, sort_keys=True).encode() + b"\n")

    @classmethod
    def load(cls, directory: Path) -> "NodeIdentity | None":
        try:
            meta = json.loads((directory / "identity.json").read_text())
        except FileNotFoundError:
            return None
        return cls(
            uuid=meta["uuid"], name=meta["name"], cluster=meta["cluster"],
            auth_server=meta["auth_server"], mode=meta.get("mode", "direct"),
            ssh_key=keys.load_private_key((directory / "ssh_host_key").read_bytes()),
            ssh_certificate=(directory / "ssh_host_key-cert.pub").read_text(),
            tls_key=keys.load_private_key((directory / "tls.key").read_bytes()),
            tls_certificate=(directory / "tls.crt").read_text(),
            ca_pem=(directory / "ca.pem").read_text(),
            user_ca_lines=[l for l in (directory / "ssh_user_ca.pub").read_text().splitlines()
                           if l.strip()],
            valid_before=meta["valid_before"],
            tls_server_certificate=_read_optional(directory / "tls-server.crt"),
        )

    def tls_identity(self) -> x509ca.Identity:
        return x509ca.identity_from_certificate(
            x509ca.load_certificate_pem(self.tls_certificate.encode()))


def _read_optional(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
