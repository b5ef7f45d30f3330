"""The node's SSH server against the real OpenSSH tools: what a session does.

Interactive PTY shells (pexpect), scp in both directions, sftp, and
``direct-tcpip`` forwarding allowed or refused by the session permissions.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import threading

import pexpect
import pytest

from node_ssh_support import node_env, wait_for  # noqa: F401  (fixture)

PROMPT = "EDGE-READY> "


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def shell(node_env):
    key = node_env.user_key("alice")
    args = [*node_env.ssh_options(key), "-tt", "-p", str(node_env.port), "root@127.0.0.1"]
    child = pexpect.spawn("ssh", args, timeout=15, dimensions=(24, 80))
    try:
        child.sendline(f"export PS1='{PROMPT[:4]}''{PROMPT[4:]}'")
        child.expect_exact(PROMPT)
        yield child
    finally:
        child.close(force=True)


def test_interactive_shell_has_a_terminal_of_the_clients_size(shell):
    shell.sendline("tty; stty size")
    shell.expect(r"/dev/pts/\d+")
    shell.expect(r"24 80")
    shell.expect_exact(PROMPT)


def test_window_change_resizes_the_remote_terminal(shell):
    shell.setwinsize(40, 132)  # ssh forwards SIGWINCH as window-change
    # Query in a loop: the resize races the command only by a few ms.
    shell.sendline("for i in $(seq 50); do s=$(stty size); [ \"$s\" = '40 132' ] && break; sleep 0.1; done; echo size=$s")
    shell.expect(r"size=40 132")
    shell.expect_exact(PROMPT)


def test_ctrl_c_interrupts_the_foreground_command(shell):
    shell.sendline("sleep 6123")
    # Interrupt only once sleep runs, not while bash is still reading the line.
    assert wait_for(lambda: subprocess.run(
        ["pgrep", "-f", "^sleep 6123$"], capture_output=True).returncode == 0)
    shell.sendcontrol("c")
    shell.expect_exact(PROMPT, timeout=5)  # long before the sleep is over
    shell.sendline("echo status=$?")
    shell.expect(r"status=130")  # 128 + SIGINT
    shell.expect_exact(PROMPT)


def test_shell_exit_status_is_the_clients(shell):
    shell.sendline("exit 3")
    shell.expect(pexpect.EOF)
    shell.close()
    assert shell.exitstatus == 3


def test_scp_copies_20_mb_both_ways_byte_identical(node_env, tmp_path):
    key = node_env.user_key("alice")
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(20 * 1024 * 1024))
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    back = tmp_path / "back.bin"
    scp = ["scp", "-O", "-q", *node_env.ssh_options(key), "-P", str(node_env.port)]
    up = subprocess.run([*scp, str(source), f"root@127.0.0.1:{remote_dir}/up.bin"],
                        capture_output=True, timeout=120)
    assert up.returncode == 0, up.stderr
    assert _digest(remote_dir / "up.bin") == _digest(source)
    down = subprocess.run([*scp, f"root@127.0.0.1:{remote_dir}/up.bin", str(back)],
                          capture_output=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert _digest(back) == _digest(source)


def test_sftp_puts_lists_and_gets(node_env, tmp_path):
    key = node_env.user_key("alice")
    source = tmp_path / "sftp-source.bin"
    source.write_bytes(os.urandom(300 * 1024))
    remote_dir = tmp_path / "sftp-remote"
    remote_dir.mkdir()
    batch = tmp_path / "batch"
    batch.write_text(
        f"cd {remote_dir}\n"
        f"put {source} uploaded.bin\n"
        "mkdir sub\n"
        "ls -l\n"
        "pwd\n"
        f"get uploaded.bin {tmp_path}/downloaded.bin\n"
    )
    result = subprocess.run(
        ["sftp", "-b", str(batch), *node_env.ssh_options(key), "-P", str(node_env.port),
         "root@127.0.0.1"],
        capture_output=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    listing = result.stdout.decode()
    assert "uploaded.bin" in listing and "sub" in listing
    assert f"Remote working directory: {remote_dir}" in listing
    assert (remote_dir / "sub").is_dir()
    assert _digest(remote_dir / "uploaded.bin") == _digest(source)
    assert _digest(tmp_path / "downloaded.bin") == _digest(source)


def test_sftp_relative_paths_start_at_the_logins_home(node_env):
    key = node_env.user_key("alice")
    result = subprocess.run(
        ["sftp", "-b", "-", *node_env.ssh_options(key), "-P", str(node_env.port),
         "root@127.0.0.1"],
        input=b"pwd\n", capture_output=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert b"Remote working directory: /root" in result.stdout


@pytest.fixture
def echo_server():
    """A TCP server on 127.0.0.1 that echoes until EOF, then closes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(20)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    yield port
    try:  # wake up accept() if nobody connected
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        pass
    thread.join(timeout=5)
    listener.close()


def test_direct_tcpip_is_spliced_when_port_forwarding_is_permitted(node_env, echo_server):
    key = node_env.user_key("alice")
    result = node_env.ssh(key, extra=["-W", f"127.0.0.1:{echo_server}"],
                          input=b"through the tunnel\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"through the tunnel\n"


def test_direct_tcpip_is_refused_without_port_forwarding_permission(node_env, echo_server):
    key = node_env.user_key("bob")
    result = node_env.ssh(key, extra=["-W", f"127.0.0.1:{echo_server}"], input=b"x\n")
    assert result.returncode == 255
    assert b"administratively prohibited" in result.stderr
    assert b"port forwarding is not permitted" in result.stderr


def test_agent_forwarding_request_is_refused_without_breaking_the_session(node_env):
    key = node_env.user_key("alice")
    result = node_env.ssh(key, 'echo "${SSH_AUTH_SOCK-none}"', extra=["-A"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"none\n"


def test_shell_without_terminal_reads_commands_from_stdin(node_env):
    key = node_env.user_key("alice")
    result = node_env.ssh(key, extra=["-T"], input=b"echo no-tty:$(tty -s || echo none)\nexit 4\n")
    assert result.returncode == 4
    assert b"no-tty:none\n" in result.stdout
