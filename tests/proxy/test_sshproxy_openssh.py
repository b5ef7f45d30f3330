"""The proxy's SSH service end to end with the OpenSSH client.

``ssh -W host:port proxy`` opens the same ``direct-tcpip`` channel that
``ssh -J`` / ProxyJump opens, with the client's stdin/stdout as its ends.
"""

from __future__ import annotations

import subprocess
import threading

import pytest

from proxy_ssh_testkit import (
    CLUSTER,
    ProxyEnv,
    echo_target,
    rss_bytes,
    sink_target,
    source_target,
    wait_for,
)


BIG = 200 * 1024 * 1024


@pytest.fixture(scope="module")
def targets():
    made = {"echo": echo_target(), "source": source_target(BIG), "sink": sink_target(0.002)}
    try:
        yield made
    finally:
        for target in made.values():
            target.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, targets):
    nodes = [
        {"name": "echo", "uuid": "uuid-echo", "address": targets["echo"].address},
        {"name": "source", "uuid": "uuid-source", "address": targets["source"].address},
        {"name": "sink", "uuid": "uuid-sink", "address": targets["sink"].address},
        {"name": "down", "uuid": "uuid-down", "address": "127.0.0.1:1"},
        {"name": "edge7", "uuid": "uuid-edge7", "address": "tunnel"},
    ]
    env = ProxyEnv(tmp_path_factory.mktemp("proxyssh"), nodes)
    env.start()
    try:
        yield env
    finally:
        env.stop()


@pytest.fixture(scope="module")
def alice_config(proxy):
    return proxy.ssh_config(proxy.user_key("alice"))


def run_forward(proxy, config, target, data: bytes = b"", timeout: float = 30):
    return subprocess.run(
        ["ssh", "-F", str(config), "-W", target, f"proxy.{CLUSTER}"],
        input=data, capture_output=True, timeout=timeout,
    )


def test_bytes_reach_the_node_and_come_back_with_eof_both_ways(proxy, alice_config):
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    result = run_forward(proxy, alice_config, f"echo.{CLUSTER}:22", data)
    # ssh exits only after stdin's EOF reached the echo server (half-close),
    # the server's EOF came back, and every byte was echoed.
    assert result.returncode == 0, result.stderr
    assert result.stdout == data


def test_node_name_alone_means_the_local_cluster(proxy, alice_config):
    result = run_forward(proxy, alice_config, "uuid-echo:3022", b"by uuid")
    assert result.stdout == b"by uuid", result.stderr


def test_routing_decisions_are_logged_in_one_line(proxy, alice_config):
    run_forward(proxy, alice_config, f"echo.{CLUSTER}:22", b"x")
    assert wait_for(
        lambda: f"user=alice peer=127.0.0.1 target=echo.{CLUSTER}:22 route=direct outcome=ok"
        in proxy.log_text()
    ), proxy.log_text()


def test_unknown_node_is_a_clear_open_failure(proxy, alice_config):
    result = run_forward(proxy, alice_config, f"nosuch.{CLUSTER}:22")
    assert result.returncode != 0
    assert (
        f"open failed: connect failed: node nosuch not found in cluster {CLUSTER}"
        in result.stderr.decode()
    ), result.stderr
    assert wait_for(lambda: "target=nosuch.test:22 route=- outcome=refused: node nosuch not found"
                    in proxy.log_text())


def test_unreachable_node_is_reported_offline(proxy, alice_config):
    result = run_forward(proxy, alice_config, f"down.{CLUSTER}:22")
    assert f"node down.{CLUSTER} is offline" in result.stderr.decode(), result.stderr


def test_tunnelled_node_without_tunnel_is_reported_offline(proxy, alice_config):
    result = run_forward(proxy, alice_config, f"edge7.{CLUSTER}:22")
    assert f"node edge7.{CLUSTER} is offline" in result.stderr.decode(), result.stderr


def test_proxy_refuses_a_shell_with_a_message(proxy, alice_config):
    result = subprocess.run(
        ["ssh", "-F", str(alice_config), f"proxy.{CLUSTER}", "true"],
        capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0
    assert "only forwards connections to nodes" in result.stderr.decode(), result.stderr


def test_certificate_from_another_ca_is_refused(proxy):
    config = proxy.ssh_config(proxy.user_key("mallory", ca=proxy.other_ca))
    result = run_forward(proxy, config, f"echo.{CLUSTER}:22", b"x")
    assert result.returncode != 0
    assert result.stdout == b""
    assert "Permission denied" in result.stderr.decode(), result.stderr


def test_any_certificate_principal_is_not_needed_as_jump_login(proxy):
    # ProxyJump logs in with whatever user the config names for the proxy.
    config = proxy.ssh_config(proxy.user_key("carol", principals=("ubuntu",)),
                              jump_user="carol-laptop")
    assert run_forward(proxy, config, f"echo.{CLUSTER}:22", b"hi").stdout == b"hi"


def _watch_rss(pid: int, stop: threading.Event, samples: list[int]) -> None:
    while not stop.is_set():
        samples.append(rss_bytes(pid))
        stop.wait(0.05)


def test_slow_reader_of_a_big_stream_keeps_proxy_memory_bounded(proxy, alice_config):
    baseline = rss_bytes(proxy.process.pid)
    samples: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_rss, args=(proxy.process.pid, stop, samples))
    watcher.start()
    client = proxy.forward(
        alice_config, f"source.{CLUSTER}:22",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    received = 0
    pace = threading.Event()
    try:
        while True:
            chunk = client.stdout.read(256 * 1024)
            if not chunk:
                break
            received += len(chunk)
            # The reader stalls for a while early on, then trails the source
            # (~50 MiB/s): unchecked, the proxy would buffer at its own pace.
            pace.wait(1.5 if received == len(chunk) else 0.005)
        client.stdin.close()
        client.wait(timeout=30)
    finally:
        stop.set()
        watcher.join()
        if client.poll() is None:
            client.kill()
            client.wait()
    assert received == BIG
    growth = max(samples) - baseline
    # Two 2 MiB windows, a 64 KiB socket buffer and the allocator's
    # slack; without flow control the proxy would hold most of 200 MiB.
    assert growth < 16 * 1024 * 1024, (baseline, max(samples))


def test_slow_target_of_a_big_upload_keeps_proxy_memory_bounded(proxy, alice_config, targets):
    size = 64 * 1024 * 1024
    baseline = rss_bytes(proxy.process.pid)
    samples: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_rss, args=(proxy.process.pid, stop, samples))
    watcher.start()
    try:
        result = subprocess.run(
            ["ssh", "-F", str(alice_config), "-W", f"sink.{CLUSTER}:22", f"proxy.{CLUSTER}"],
            input=b"u" * size, capture_output=True, timeout=90,
        )
    finally:
        stop.set()
        watcher.join()
    assert result.stdout == str(size).encode(), result.stderr
    growth = max(samples) - baseline
    assert growth < 16 * 1024 * 1024, (baseline, max(samples))
