"""The node's SSH server against the real OpenSSH client: who gets in.

Every refusal must leave OpenSSH with "Permission denied", show the reason
in a banner where a certificate was presented, and be logged in one line.
"""

from __future__ import annotations

from datetime import timedelta

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
