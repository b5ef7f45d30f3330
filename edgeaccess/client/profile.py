"""The user's profile in ``$EDGE_HOME`` (default ``~/.edge``).

Files::

    key, key.pub, key-cert.pub   SSH key and certificate (OpenSSH reads these)
    tls.key, tls.crt, ca.pem     TLS client identity and the cluster CA
    known_hosts                  @cert-authority lines for the cluster's host CA
    ssh_config                   ProxyJump through the proxy for *.CLUSTER
    profile.json                 who, where, until when
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import attrs

from edgeaccess.client import tlsroute
from edgeaccess.httpclient import split_addr
from edgeaccess.pki import keys

FILES = ("key", "key.pub", "key-cert.pub", "tls.key", "tls.crt", "ca.pem", "known_hosts",
         "ssh_config", "profile.json")


def edge_home() -> Path:
    return Path(os.environ.get("EDGE_HOME") or Path.home() / ".edge").absolute()


@attrs.define
class Profile:
    proxy: str
    cluster: str
    username: str
    logins: list
    roles: list
    valid_before: str
    ssh_addr: str
    ca_pin: str = ""
    leaf_clusters: list = attrs.Factory(list)
    #: The proxy's tunnel port (``/v1/ping`` ``proxy.tunnel_addr``).
    tunnel_addr: str = ""
    #: ssh_config reaches nodes with a ``ProxyCommand`` (:mod:`edgeaccess.client.tlsroute`)
    #: opening a TLS stream to the tunnel port (ALPN edge-ssh/1) instead of ProxyJump.
    tls_routing: bool = False

    def to_dict(self) -> dict:
        return attrs.asdict(self)


def load(home: Path | None = None) -> Profile | None:
    home = home or edge_home()
    try:
        data = json.loads((home / "profile.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    fields = {a.name for a in attrs.fields(Profile)}
    return Profile(**{k: v for k, v in data.items() if k in fields})


def render_known_hosts(cluster: str, host_ca_lines: list[str], proxy_host: str,
                       proxy_port: int, leaf_clusters=()) -> str:
    patterns = [f"*.{cluster}", cluster, proxy_host, f"[{proxy_host}]:{proxy_port}"]
    lines = [f"# edgeaccess: host CA of cluster {cluster}"]
    for ca in host_ca_lines:
        lines.append(f"@cert-authority {','.join(dict.fromkeys(patterns))} {ca.strip()}")
    for leaf in leaf_clusters:
        for ca in leaf.get("ssh_host_ca", []):
            lines.append(f"@cert-authority *.{leaf['name']} {ca.strip()}")
    return "\n".join(lines) + "\n"


def _config_path(path: Path) -> str:
    """``path`` for an ssh_config file line: OpenSSH expands ``%`` tokens
    (``%d``, ``%h``...) in these directives, so a literal ``%`` is ``%%``."""
    return str(path).replace("%", "%%")




def render_tls_routing_command(home: Path, tunnel_addr: str, cluster: str) -> str:
    """The ``ProxyCommand`` of TLS routing: :mod:`edgeaccess.client.tlsroute`
    (standard library only, started with ``-I -S``: ~15 ms) opens a mutual
    TLS stream to the proxy's tunnel port with ALPN ``edge-ssh/1`` and the
    target node (``%h``) as the server name, and relays until the proxy
    closes it. Only the cluster CA is trusted (no system stores), the
    proxy's certificate must be a proxy's of ``cluster`` and name the host
    dialled, and any failure ends the connection with one line on stderr.
    ``--stock`` where the ``cpython-tls-route`` reach is off."""
    from edgeaccess import internals  # here: most edge commands never need it

    host, port = split_addr(tunnel_addr, 3024)
    connect = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    argv = [sys.executable, "-I", "-S", tlsroute.__file__,
            "--ca", str(home / "ca.pem"), "--cert", str(home / "tls.crt"),
            "--key", str(home / "tls.key"), "--verify-host", host,
            "--alpn", "edge-ssh/1", "--cluster", cluster, "--connect", connect,
            *internals.tls_route_stock_argument()]
    command = " ".join(shlex.quote(a) for a in argv).replace("%", "%%")
    return f"{command} --servername %h"


#: The ProxyJump hop to the proxy (Conch) prefers AES-GCM: one AEAD pass with
#: AES-NI, where OpenSSH's first choice among what Conch offers would be
#: AES-CTR with HMAC-SHA-256 (a second pass over every byte, ~0.4 CPU-s per GiB
#: on the proxy). ChaCha20-Poly1305 (OpenSSH's own first choice) stays listed for
#: a proxy that offers it; the CTR ciphers remain the fallback.
PROXY_HOP_CIPHERS = (
    "    Ciphers aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
    "aes128-ctr,aes192-ctr,aes256-ctr\n"
)


def render_ssh_config(home: Path, cluster: str, username: str, ssh_addr: str,
                      leaf_names=(), *, tls_routing_addr: str | None = None) -> str:
    """The ssh_config for ``*.CLUSTER`` (and leaf clusters): ProxyJump through
    the proxy's SSH port, or with ``tls_routing_addr`` (the proxy's tunnel
    port) a ``ProxyCommand`` opening a TLS-routed stream there."""
    host, port = split_addr(ssh_addr, 3023)
    alias = f"edge-proxy-{cluster}"
    common = (
        f"    UserKnownHostsFile \"{_config_path(home / 'known_hosts')}\"\n"
        f"    IdentityFile \"{_config_path(home / 'key')}\"\n"
        f"    CertificateFile \"{_config_path(home / 'key-cert.pub')}\"\n"
        "    IdentitiesOnly yes\n"
        "    StrictHostKeyChecking yes\n"
        "    HostKeyAlgorithms ssh-ed25519-cert-v01@openssh.com,ssh-ed25519\n"
        "    PreferredAuthentications publickey\n"
    )
    patterns = " ".join([f"*.{cluster}"] + [f"*.{leaf}" for leaf in leaf_names])
    if tls_routing_addr:
        route = f"    ProxyCommand {render_tls_routing_command(home, tls_routing_addr, cluster)}\n"
        how = f"TLS routing at {tls_routing_addr}"
    else:
        route = f"    ProxyJump {alias}\n"
        how = f"the proxy at {ssh_addr}"
    return (
        f"# edgeaccess: cluster {cluster} through {how}\n"
        f"# Include this file from ~/.ssh/config, or use ssh -F with it.\n"
        f"Host {alias}\n"
        f"    HostName {host}\n"
        f"    Port {port}\n"
        f"    User {username}\n"
        f"{PROXY_HOP_CIPHERS}"
        f"{common}\n"
        f"Host {patterns}\n"
        f"{route}"
        f"{common}"
    )


def write_ssh_config(home: Path, profile: Profile) -> str:
    """(Re)write ``home/ssh_config`` for ``profile``'s routing mode; returns it."""
    if profile.tls_routing and not profile.tunnel_addr:
        from edgeaccess import errors

        raise errors.BadRequest("this proxy announced no tunnel address: TLS routing "
                                "is not available; log in again")
    text = render_ssh_config(
        home, profile.cluster, profile.username, profile.ssh_addr, profile.leaf_clusters,
        tls_routing_addr=profile.tunnel_addr if profile.tls_routing else None)
    keys.write_public(home / "ssh_config", text.encode())
    return text


def write_profile(home: Path, profile: Profile) -> None:
    """Write ``home/profile.json``."""
    keys.write_public(home / "profile.json",
                      json.dumps(profile.to_dict(), indent=2, sort_keys=True).encode() + b"\n")


def save(home: Path, profile: Profile, *, private_key, ssh_certificate: str,
         tls_certificate: str, ca_pem: str, host_ca_lines: list[str],
         leaf_clusters=()) -> None:
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home, 0o700)
    keys.write_secret(home / "key", keys.private_key_openssh(private_key))
    keys.write_public(home / "key.pub", keys.public_key_openssh(private_key) + b"\n")
    keys.write_public(home / "key-cert.pub", ssh_certificate.strip().encode() + b"\n")
    keys.write_secret(home / "tls.key", keys.private_key_pem(private_key))
    keys.write_public(home / "tls.crt", tls_certificate.encode())
    keys.write_public(home / "ca.pem", ca_pem.encode())
    host, port = split_addr(profile.ssh_addr, 3023)
    keys.write_public(home / "known_hosts", render_known_hosts(
        profile.cluster, host_ca_lines, host, port, leaf_clusters).encode())
    keys.write_public(home / "ssh_config", render_ssh_config(
        home, profile.cluster, profile.username, profile.ssh_addr,
        [l["name"] for l in leaf_clusters],
        tls_routing_addr=profile.tunnel_addr if profile.tls_routing else None).encode())
    write_profile(home, profile)


def remove(home: Path) -> bool:
    found = False
    for name in FILES:
        try:
            (home / name).unlink()
            found = True
        except FileNotFoundError:
            pass
    return found
