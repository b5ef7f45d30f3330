"""The node's SSH server against the real OpenSSH client: who gets in.

Every refusal must leave OpenSSH with "Permission denied", show the reason
in a banner where a certificate was presented, and be logged in one line.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from node_ssh_support import node_env, now, wait_for  # noqa: F401  (fixture)


def _refusal_logged(env, text: str) -> bool:
    return wait_for(
        lambda: any(
            "refused SSH login" in line and text in line
            for line in env.log_text().splitlines()
        ),
        timeout=5,
    )


def test_certificate_login_runs_command_with_exit_status_and_stderr(node_env):
    key = node_env.user_key("alice")
    result = node_env.ssh(key, "echo out; echo err >&2; exit 7")
    assert result.returncode == 7
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"


def test_exec_environment_is_the_logins_and_skips_bashrc(node_env):
    key = node_env.user_key("alice")
    result = node_env.ssh(key, 'echo "$HOME|$USER|$LOGNAME|$SHELL|$PATH|${PYENV_ROOT-unset}"')
    assert result.returncode == 0, result.stderr
    home, user, logname, shell, path, pyenv = result.stdout.decode().strip().split("|")
    assert (home, user, logname, shell) == ("/root", "root", "root", "/bin/bash")
    assert "pyenv" not in path
    assert pyenv == "unset"  # ~/.bashrc (pyenv init) was not sourced


def test_client_environment_passes_only_allowed_names(node_env):
    key = node_env.user_key("alice")
    result = node_env.ssh(
        key,
        'echo "$LC_EDGE|$EDGE_ALLOWED|${EDGE_DENIED-unset}"',
        extra=["-o", "SetEnv=LC_EDGE=lc EDGE_ALLOWED=yes EDGE_DENIED=no"],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"lc|yes|unset\n"


def test_bare_key_without_certificate_is_refused(node_env):
    key = node_env.user_key("plainkey", with_certificate=False)
    result = node_env.ssh(key, "true")
    assert result.returncode == 255
    assert b"Permission denied" in result.stderr
    assert _refusal_logged(node_env, "only OpenSSH user certificates are accepted")


def test_expired_certificate_is_refused(node_env):
    key = node_env.user_key(
        "expired", issued_at=now() - timedelta(hours=2), ttl=timedelta(hours=1)
    )
    result = node_env.ssh(key, "true")
    assert result.returncode == 255
    assert b"certificate has expired" in result.stderr
    assert _refusal_logged(node_env, "user=expired login=root peer=127.0.0.1")


def test_certificate_from_untrusted_ca_is_refused(node_env):
    key = node_env.user_key("foreign", ca=node_env.other_ca)
    result = node_env.ssh(key, "true")
    assert result.returncode == 255
    assert b"not signed by a trusted user CA" in result.stderr
    assert _refusal_logged(node_env, "user=foreign")


def test_host_certificate_from_another_ca_is_refused_by_the_client(node_env):
    key = node_env.user_key("alice")
    result = node_env.ssh(key, "true", known_hosts=node_env.wrong_known_hosts)
    assert result.returncode == 255
    assert b"Host key verification failed" in result.stderr


def test_login_not_among_principals_is_refused(node_env):
    key = node_env.user_key("alice", principals=["ubuntu"])
    result = node_env.ssh(key, "true", login="root")
    assert result.returncode == 255
    assert b"login root is not among the certificate's principals" in result.stderr


def test_authorizer_refusal_is_shown_and_logged(node_env):
    key = node_env.user_key("mallory")
    result = node_env.ssh(key, "true")
    assert result.returncode == 255
    assert b"user mallory may not log in as root" in result.stderr
    assert _refusal_logged(node_env, "user=mallory login=root")


def test_unknown_unix_login_is_refused_with_a_clear_message(node_env):
    key = node_env.user_key("alice", principals=["nosuchuser-edge"])
    result = node_env.ssh(key, "true", login="nosuchuser-edge")
    assert result.returncode == 255
    assert b"login nosuchuser-edge does not exist on node node1" in result.stderr


def test_force_command_replaces_the_requested_command(node_env):
    key = node_env.user_key(
        "alice", critical_options={"force-command": 'echo "forced:$SSH_ORIGINAL_COMMAND"'}
    )
    result = node_env.ssh(key, "echo asked")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"forced:echo asked\n"


def test_source_address_allows_a_matching_peer(node_env):
    key = node_env.user_key(
        "alice", critical_options={"source-address": "10.0.0.0/8,127.0.0.0/8"}
    )
    result = node_env.ssh(key, "echo in")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"in\n"


def test_source_address_mismatch_is_refused(node_env):
    key = node_env.user_key("alice", critical_options={"source-address": "192.0.2.0/24"})
    result = node_env.ssh(key, "true")
    assert result.returncode == 255
    assert b"client address 127.0.0.1 is not allowed" in result.stderr


def test_unknown_critical_option_is_refused(node_env):
    key = node_env.user_key("alice", critical_options={"verify-required": ""})
    result = node_env.ssh(key, "true")
    assert result.returncode == 255
    assert b"unsupported critical options: verify-required" in result.stderr


def test_connection_is_closed_when_the_session_ttl_ends(node_env):
    key = node_env.user_key("shorty")
    result = node_env.ssh(key, "sleep 20", timeout=15)
    assert result.returncode == 255  # dropped after 1 s, not after 20


def test_exec_is_reported_to_the_observer_with_its_exit_status(node_env):
    key = node_env.user_key("alice")
    result = node_env.ssh(key, "exit 42 # observer-marker")
    assert result.returncode == 42

    def events():
        lines = [l for l in node_env.log_text().splitlines() if "EVENT" in l]
        exec_line = [l for l in lines if "observer-marker" in l]
        if not exec_line:
            return None
        session_id = exec_line[0].split("EVENT exec ")[1].split()[0]
        return [l.split("EVENT ")[1] for l in lines if session_id in l]

    assert wait_for(lambda: events() and len(events()) == 3)
    started, executed, ended = events()
    assert started.endswith(" alice exec")
    assert ended.endswith("status=42 signal=None")


def test_a_session_runs_only_once_its_start_is_durable_holding_stdin_and_eof(
        node_env, tmp_path):
    """The observer's Deferred (the audit spool's fsync) fires 1 s late: the
    command starts after it, and the data and EOF sent meanwhile reach it."""
    key = node_env.user_key("slowdisk")
    marker = tmp_path / "ran-at"
    data = b"typed before the program ran\n" * 1000
    result = node_env.ssh(key, f"date +%s.%N > {marker}; cat", input=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data
    durable_line = [l for l in node_env.log_text().splitlines() if "EVENT durable" in l][-1]
    durable_at = datetime.strptime(durable_line[:19], "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=timezone.utc).timestamp()
    ran_at = float(marker.read_text())
    assert ran_at >= durable_at  # (the log's clock has whole seconds)


def test_a_session_whose_start_cannot_be_made_durable_is_refused(node_env, tmp_path):
    key = node_env.user_key("brokendisk")
    marker = tmp_path / "must-not-exist"
    result = node_env.ssh(key, f"touch {marker}")
    assert result.returncode == 255
    assert b"the session cannot be audited" in result.stderr
    assert not marker.exists()
    assert wait_for(lambda: "session refused: the session cannot be audited"
                    in node_env.log_text(), timeout=5)


def test_login_of_another_unix_user_runs_with_its_uid_and_shell(node_env):
    # "nobody" exists everywhere; its shell is nologin, which proves the
    # session used the login's password entry rather than the server's.
    key = node_env.user_key("alice", principals=["nobody"])
    result = node_env.ssh(key, "id -u", login="nobody")
    assert result.returncode == 1
    assert b"This account is currently not available" in result.stdout


def test_sftp_as_another_unix_user_is_confined_to_its_permissions(node_env, tmp_path):
    import subprocess

    private = tmp_path / "root-only"
    private.mkdir(mode=0o700)
    (private / "secret").write_text("root's")
    key = node_env.user_key("alice", principals=["nobody"])
    result = subprocess.run(
        ["sftp", "-b", "-", *node_env.ssh_options(key), "-P", str(node_env.port),
         "nobody@127.0.0.1"],
        input=f"ls /\nget {private}/secret {tmp_path}/stolen\n".encode(),
        capture_output=True, timeout=30,
    )
    assert b"etc" in result.stdout  # listing / works as nobody
    assert result.returncode != 0
    # The file exists, but nobody may not look into root's 0700 directory.
    assert b"not found" in result.stderr or b"Permission denied" in result.stderr
    assert not (tmp_path / "stolen").exists()
    # The server switched back to root afterwards.
    root_key = node_env.user_key("alice")
    assert node_env.ssh(root_key, "id -u").stdout == b"0\n"


def test_command_killed_by_a_signal_is_reported_as_exit_signal(node_env):
    key = node_env.user_key("alice")
    result = node_env.ssh(key, "kill -TERM $$ # signal-marker")
    assert result.returncode == 255  # OpenSSH's answer to exit-signal
    assert wait_for(
        lambda: any(
            "status=None signal=TERM" in line for line in node_env.log_text().splitlines()
        )
    )


def test_rsa_user_certificate_is_accepted(node_env):
    # OpenSSH signs with rsa-sha2-* only if server-sig-algs lists them
    # (Conch lists its host key algorithms there: DESIGN.md).
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = node_env.user_key(
        "alice", private_key=rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    result = node_env.ssh(key, "echo rsa")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"rsa\n"
