"""The ``edge`` profile in $EDGE_HOME and the commands that only read it (no sockets)."""

from __future__ import annotations

import shutil
import stat
import subprocess
from datetime import datetime, timedelta, timezone

import pytest

from edgeaccess.client import main as edge
from edgeaccess.client import profile as profiles
from edgeaccess.pki import keys, sshca

HOST_CA = keys.public_key_openssh(keys.generate_private_key()).decode()


def _profile(valid_before: datetime) -> profiles.Profile:
    return profiles.Profile(
        proxy="127.0.0.1:3080", cluster="example", username="alice", logins=["root", "alice"],
        roles=["access"], valid_before=valid_before.isoformat().replace("+00:00", "Z"),
        ssh_addr="127.0.0.1:3023", ca_pin="sha256:" + "ab" * 32)


def _save(home, valid_for: timedelta = timedelta(hours=8)) -> profiles.Profile:
    now = datetime.now(timezone.utc)
    key = keys.generate_private_key()
    cert = sshca.issue_user_certificate(
        keys.generate_private_key(), key.public_key(), username="alice",
        principals=["root", "alice"], roles=["access"], cluster="example",
        now=now, ttl=timedelta(hours=8))
    profile = _profile(now + valid_for)
    profiles.save(home, profile, private_key=key,
                  ssh_certificate=cert.public_bytes().decode(),
                  tls_certificate="-----BEGIN CERTIFICATE-----\n", ca_pem="CA PEM\n",
                  host_ca_lines=[HOST_CA])
    return profile


def _run(capsys, monkeypatch, home, *argv):
    monkeypatch.setenv("EDGE_HOME", str(home))
    code = edge.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_saved_profile_has_every_file_with_private_ones_owner_only(tmp_path):
    home = tmp_path / "edge"
    profile = _save(home)
    assert sorted(p.name for p in home.iterdir()) == sorted(profiles.FILES)
    for name in ("key", "tls.key"):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert profiles.load(home) == profile
    assert keys.load_public_key_openssh((home / "key.pub").read_text()) is not None
    assert sshca.load_certificate((home / "key-cert.pub").read_text()).key_id == b"alice"


def test_known_hosts_trusts_the_host_ca_for_the_cluster_and_the_proxy(tmp_path):
    home = tmp_path / "edge"
    _save(home)
    lines = [l for l in (home / "known_hosts").read_text().splitlines()
             if not l.startswith("#")]
    assert lines == [f"@cert-authority *.example,example,127.0.0.1,[127.0.0.1]:3023 {HOST_CA}"]


def test_ssh_config_never_disables_host_key_checking(tmp_path):
    home = tmp_path / "edge"
    _save(home)
    config = (home / "ssh_config").read_text()
    assert "StrictHostKeyChecking yes" in config
    assert "StrictHostKeyChecking no" not in config
    assert "/dev/null" not in config


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")
def test_openssh_reads_the_ssh_config_as_a_jump_through_the_proxy(tmp_path):
    home = tmp_path / "edge"
    _save(home)

    def resolved(target: str) -> dict:
        out = subprocess.run(["ssh", "-G", "-F", str(home / "ssh_config"), target],
                             capture_output=True, text=True, check=True, timeout=30).stdout
        settings: dict = {}
        for line in out.splitlines():
            name, _, value = line.partition(" ")
            settings.setdefault(name, value)
        return settings

    node = resolved("root@web1.example")
    assert node["proxyjump"] == "edge-proxy-example"
    assert node["user"] == "root"
    assert node["stricthostkeychecking"] == "true"
    assert node["userknownhostsfile"].strip('"') == str(home / "known_hosts")
    assert node["certificatefile"].strip('"') == str(home / "key-cert.pub")
    jump = resolved("edge-proxy-example")
    assert (jump["hostname"], jump["port"], jump["user"]) == ("127.0.0.1", "3023", "alice")
    assert "proxyjump" not in jump or jump["proxyjump"] == "none"
    # The hop to the proxy (Conch) prefers AES-GCM; nodes keep ssh's own order.
    assert jump["ciphers"].split(",")[0] == "aes128-gcm@openssh.com"
    assert "aes128-ctr" in jump["ciphers"].split(",")
    assert node["ciphers"] != jump["ciphers"]


def test_remove_deletes_keys_and_certificates(tmp_path):
    home = tmp_path / "edge"
    _save(home)
    (home / "unrelated").write_text("keep me")
    assert profiles.remove(home) is True
    assert sorted(p.name for p in home.iterdir()) == ["unrelated"]
    assert profiles.remove(home) is False
    assert profiles.load(home) is None


def test_status_shows_the_login(tmp_path, capsys, monkeypatch):
    home = tmp_path / "edge"
    profile = _save(home)
    code, out, err = _run(capsys, monkeypatch, home, "status")
    assert code == 0 and err == ""
    assert "User:         alice" in out
    assert "Cluster:      example" in out
    assert "Logins:       root, alice" in out
    assert "Roles:        access" in out
    assert f"Valid until:  {profile.valid_before} [valid for 7h5" in out


def test_status_of_an_expired_login_fails(tmp_path, capsys, monkeypatch):
    home = tmp_path / "edge"
    _save(home, valid_for=timedelta(minutes=-1))
    code, out, _ = _run(capsys, monkeypatch, home, "status")
    assert code == 1
    assert "[EXPIRED]" in out


def test_ssh_with_an_expired_login_says_so(tmp_path, capsys, monkeypatch):
    home = tmp_path / "edge"
    _save(home, valid_for=timedelta(minutes=-1))
    code, out, err = _run(capsys, monkeypatch, home, "ssh", "root@web1")
    assert code == 1
    assert err.count("\n") == 1 and "expired" in err and "edge login" in err


def test_status_without_a_login_is_one_line_on_stderr(tmp_path, capsys, monkeypatch):
    code, out, err = _run(capsys, monkeypatch, tmp_path / "nothing", "status")
    assert code == 1 and out == ""
    assert err.startswith("error: not logged in") and err.count("\n") == 1


def test_logout_removes_the_profile(tmp_path, capsys, monkeypatch):
    home = tmp_path / "edge"
    _save(home)
    code, out, _ = _run(capsys, monkeypatch, home, "logout")
    assert code == 0 and "Logged out" in out
    assert not (home / "key").exists() and not (home / "key-cert.pub").exists()
    code, out, _ = _run(capsys, monkeypatch, home, "logout")
    assert code == 0 and "Not logged in" in out


@pytest.mark.parametrize("pin", ["abc", "sha1:" + "ab" * 20, "sha256:" + "ab" * 31])
def test_login_refuses_a_malformed_pin_before_any_connection(tmp_path, capsys, monkeypatch,
                                                              pin):
    code, out, err = _run(capsys, monkeypatch, tmp_path / "edge", "login", "--proxy",
                          "127.0.0.1:9", "--user", "alice", "--password-stdin",
                          "--ca-pin", pin)
    assert code == 1
    assert err == "error: a CA pin looks like sha256:<64 hex digits>\n"
    assert not (tmp_path / "edge").exists()


def test_login_takes_either_a_pin_or_insecure(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exited:
        _run(capsys, monkeypatch, tmp_path / "edge", "login", "--proxy", "127.0.0.1:9",
             "--insecure", "--ca-pin", "sha256:" + "ab" * 32)
    assert exited.value.code == 2


def test_scp_paths_get_the_cluster_name():
    assert edge._scp_path("root@web1:/etc/hosts", "example") == "root@web1.example:/etc/hosts"
    assert edge._scp_path("./local:file", "example") == "./local:file"
    assert edge._scp_path("/tmp/x", "example") == "/tmp/x"
