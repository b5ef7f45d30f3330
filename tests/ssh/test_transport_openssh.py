"""The real OpenSSH client against the node server (EdgeServerTransport and
SessionProcessProtocol): AES-GCM and ETM MACs negotiate and carry data
byte-identical both ways."""

from __future__ import annotations

import hashlib
import os

import pytest

from node_ssh_support import node_env  # noqa: F401  (fixture)

ALGORITHMS = [
    ("aes128-gcm@openssh.com", None),
    ("aes256-gcm@openssh.com", None),
    ("aes128-ctr", "hmac-sha2-256-etm@openssh.com"),
    ("aes256-ctr", "hmac-sha2-512"),
]


@pytest.mark.parametrize(("cipher", "mac"), ALGORITHMS)
def test_openssh_client_negotiates_and_moves_data_both_ways(node_env, cipher, mac):
    key = node_env.user_key("alice")
    extra = ["-v", "-c", cipher] + (["-m", mac] if mac else [])
    data = os.urandom(3 * 1024 * 1024 + 17)
    upload = node_env.ssh(key, "sha256sum; exit 7", extra=extra, input=data)
    assert upload.returncode == 7, upload.stderr.decode()
    assert upload.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    log = upload.stderr.decode()
    expected_mac = mac or "<implicit>"
    assert f"kex: server->client cipher: {cipher} MAC: {expected_mac}" in log
    assert f"kex: client->server cipher: {cipher} MAC: {expected_mac}" in log

    download = node_env.ssh(
        key, "head -c 5000000 /dev/urandom | tee /tmp/.edge-dl-$$ | sha256sum >&2;"
        " cat /tmp/.edge-dl-$$; rm -f /tmp/.edge-dl-$$", extra=["-c", cipher],
    )
    assert download.returncode == 0, download.stderr.decode()
    assert len(download.stdout) == 5_000_000
    assert hashlib.sha256(download.stdout).hexdigest() in download.stderr.decode()


def test_openssh_client_sees_user_auth_algorithms_as_server_sig_algs(node_env):
    key = node_env.user_key("alice")
    result = node_env.ssh(key, "true", extra=["-v"])
    assert result.returncode == 0, result.stderr.decode()
    line = next(
        line for line in result.stderr.decode().splitlines() if "server-sig-algs=" in line
    )
    algorithms = line.split("server-sig-algs=<", 1)[1].rstrip(">").split(",")
    assert "rsa-sha2-256" in algorithms and "ssh-ed25519" in algorithms
