"""Issued SSH certificates as OpenSSH itself reads them (``ssh-keygen -L``)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone

import pytest

from edgeaccess.pki import keys, sshca

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None,
                                reason="needs ssh-keygen (openssh-client)")

NOW = datetime(2027, 1, 15, 8, 0, 0, tzinfo=timezone.utc)


def _keygen_list(tmp_path, cert) -> dict:
    """``ssh-keygen -L`` of ``cert``, parsed into ``{field: value or [lines]}``."""
    path = tmp_path / "cert-cert.pub"
    path.write_bytes(cert.public_bytes() + b"\n")
    result = subprocess.run(["ssh-keygen", "-L", "-f", str(path)], capture_output=True,
                            text=True, timeout=30, env={**os.environ, "TZ": "UTC"})
    assert result.returncode == 0, result.stderr
    fields: dict = {}
    current = None
    for line in result.stdout.splitlines()[1:]:
        if line.startswith("        ") and not line.startswith("         "):
            name, _, value = line.strip().partition(":")
            current = name
            fields[name] = value.strip() if value.strip() else []
        elif line.strip():
            fields[current].append(line.strip())
    return fields


def _validity(text: str) -> tuple[datetime, datetime]:
    start, end = re.fullmatch(r"from (\S+) to (\S+)", text).groups()
    return tuple(datetime.fromisoformat(t).replace(tzinfo=timezone.utc) for t in (start, end))


def test_user_certificate_reads_back_in_ssh_keygen(tmp_path):
    ca = keys.generate_private_key()
    user = keys.generate_private_key()
    cert = sshca.issue_user_certificate(
        ca, user.public_key(), username="alice", principals=["root", "alice"],
        roles=["access", "dev"], cluster="example", now=NOW, ttl=timedelta(hours=8),
        permit_port_forwarding=True)

    shown = _keygen_list(tmp_path, cert)
    assert shown["Type"] == "ssh-ed25519-cert-v01@openssh.com user certificate"
    assert shown["Key ID"] == '"alice"'
    assert shown["Principals"] == ["root", "alice"]
    assert shown["Signing CA"].startswith(f"ED25519 {keys.ssh_fingerprint(ca.public_key())} ")
    assert shown["Public key"] == f"ED25519-CERT {keys.ssh_fingerprint(user.public_key())}"
    assert _validity(shown["Valid"]) == (NOW - timedelta(minutes=1), NOW + timedelta(hours=8))
    extensions = [line.split()[0] for line in shown["Extensions"]]
    assert {"permit-pty", "permit-port-forwarding", sshca.EXT_ROLES,
            sshca.EXT_CLUSTER, sshca.EXT_TRAITS} == set(extensions)
    assert "permit-agent-forwarding" not in extensions
    assert shown["Critical Options"] == "(none)"


def test_host_certificate_reads_back_in_ssh_keygen(tmp_path):
    ca = keys.generate_private_key()
    host = keys.generate_private_key()
    node_uuid = "6f1c3c5e-8a51-4d6e-9a8e-1b2c3d4e5f60"
    cert = sshca.issue_host_certificate(
        ca, host.public_key(), host_id=node_uuid,
        principals=sshca.node_principals("web1", node_uuid, "example"),
        now=NOW, ttl=timedelta(hours=24))

    shown = _keygen_list(tmp_path, cert)
    assert shown["Type"] == "ssh-ed25519-cert-v01@openssh.com host certificate"
    assert shown["Key ID"] == f'"{node_uuid}"'
    assert shown["Principals"] == ["web1", "web1.example", node_uuid, f"{node_uuid}.example"]
    assert _validity(shown["Valid"]) == (NOW - timedelta(minutes=1), NOW + timedelta(hours=24))
    assert shown["Extensions"] == "(none)"


def test_issued_user_certificate_parses_back_to_the_same_identity():
    ca = keys.generate_private_key()
    cert = sshca.issue_user_certificate(
        ca, keys.generate_private_key().public_key(), username="alice", principals=["root"],
        roles=["access"], cluster="example", now=NOW, ttl=timedelta(hours=1),
        traits={"logins": ["root"]}, permit_agent_forwarding=True,
        critical_options={"source-address": "10.0.0.0/8"})
    identity = sshca.user_identity_from_certificate(sshca.load_certificate(cert.public_bytes()))
    assert identity.username == "alice"
    assert identity.principals == ("root",)
    assert identity.roles == ("access",)
    assert identity.cluster == "example"
    assert identity.traits == {"logins": ["root"]}
    assert identity.valid_after == NOW - timedelta(minutes=1)
    assert identity.valid_before == NOW + timedelta(hours=1)
    assert identity.permit_pty and identity.permit_agent_forwarding
    assert not identity.permit_port_forwarding
    assert identity.critical_options == {"source-address": "10.0.0.0/8"}


def test_certificates_need_a_principal():
    ca = keys.generate_private_key()
    with pytest.raises(ValueError):
        sshca.issue_user_certificate(ca, ca.public_key(), username="a", principals=[],
                                     roles=[], cluster="c", now=NOW, ttl=timedelta(hours=1))
    with pytest.raises(ValueError):
        sshca.issue_host_certificate(ca, ca.public_key(), host_id="h", principals=[],
                                     now=NOW, ttl=timedelta(hours=1))


def test_a_plain_public_key_is_not_a_certificate():
    line = keys.public_key_openssh(keys.generate_private_key())
    with pytest.raises(ValueError):
        sshca.load_certificate(line)


def test_node_principals_add_extra_names_without_duplicates():
    assert sshca.node_principals("web1", "u-1", "example", ["10.0.0.5", "web1"]) == [
        "web1", "web1.example", "u-1", "u-1.example", "10.0.0.5"]
