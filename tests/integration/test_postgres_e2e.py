"""Several ``twistd edgeproxy`` processes on one PostgreSQL database.

Everything is shared through the backend: users, roles, tokens and the
cluster's CAs (sealed with the CA key every proxy is given, here through
``--ca-key-file``). A user created through A logs in through B pinning the
one CA; a proxy without the key, or with another, refuses to start and
says why; two first starts at the same moment make one CA set.
"""

from __future__ import annotations

import base64
import os
import threading

import pytest

from edgeaccess.devcluster import ProxyProcess, wait_for
from edgeaccess.devpostgres import BIN, PostgresServer

pytestmark = pytest.mark.skipif(not os.path.exists(BIN), reason="PostgreSQL 15 is not installed")


@pytest.fixture(scope="module")
def server():
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def database(server):
    return server.create_database()


@pytest.fixture(scope="module")
def ca_key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ca-key") / "ca.key"
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    path.chmod(0o600)
    return path


def _start_all(processes) -> None:
    """Start the processes at the same moment (each waits for its own readiness)."""
    errors = []

    def start(process):
        try:
            process.start()
        except Exception as error:  # reported below, with the logs
            errors.append(error)

    threads = [threading.Thread(target=start, args=(p,)) for p in processes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        for process in processes:
            print(process.log()[-4000:])
        raise errors[0]


@pytest.fixture(scope="module")
def proxies(database, ca_key_file, tmp_path_factory):
    base = tmp_path_factory.mktemp("pg-proxies")
    started = [ProxyProcess(base / name, base / f"{name}.log", cluster="pg-e2e",
                            extra_args=["--backend", database, "--ca-key-file", str(ca_key_file)])
               for name in ("a", "b")]
    try:
        # Two first starts on an empty database at once: one CA set.
        _start_all(started)
        yield started
    finally:
        for process in started:
            process.stop()


def test_two_proxies_started_at_once_share_one_ca_set(proxies):
    first, second = proxies
    a, b = first.edgectl_json("status"), second.edgectl_json("status")
    assert a["ca_pin"] == b["ca_pin"]
    assert a["fingerprints"] == b["fingerprints"]
    logs = first.log() + second.log()
    assert logs.count("created certificate authorities of cluster pg-e2e") == 1
    assert "loaded certificate authorities of cluster pg-e2e from the backend" in logs
    for process in proxies:
        assert not (process.data_dir / "ca" / "tls_ca.key").exists()


def test_a_user_created_through_one_proxy_logs_in_through_the_other(proxies, tmp_path):
    first, second = proxies
    first.add_user("alice", "correct horse battery", logins=("alice",))
    listed = [user["name"] for user in second.edgectl_json("users", "ls")]
    assert "alice" in listed
    # One CA pin for the whole cluster: A's pin is good for B.
    home = second.login(tmp_path / "home", "alice", "correct horse battery", pin=first.pin())
    assert any(home.rglob("*")), "edge login wrote no profile"
    known_hosts = next(home.rglob("known_hosts")).read_text()
    host_ca = first.edgectl_json("status")["ssh_host_ca"][0]
    assert " ".join(host_ca.split()[:2]) in known_hosts


def test_the_database_password_and_the_ca_key_are_not_logged(proxies, database, ca_key_file):
    password = database.split(":")[2].split("@")[0]
    secret = ca_key_file.read_text().strip()
    for process in proxies:
        assert password not in process.log()
        assert secret not in process.log()


@pytest.mark.parametrize("given", ["none", "wrong"])
def test_a_proxy_without_the_cas_key_refuses_to_start(proxies, database, tmp_path, given):
    extra = ["--backend", database]
    if given == "wrong":
        wrong = tmp_path / "wrong.key"
        wrong.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        extra += ["--ca-key-file", str(wrong)]
    process = ProxyProcess(tmp_path / "c", tmp_path / "c.log", cluster="pg-e2e",
                           extra_args=extra)
    try:
        with pytest.raises(Exception):
            process.start(timeout=30)
        wait_for(lambda: process.process.poll() is not None, 30, "the proxy to exit")
        log = process.log()
        assert "cannot start:" in log
        assert ("has no CA key" if given == "none" else "is not the CA key of cluster") in log
        assert not (process.data_dir / "ca.key").exists(), "it made no key of its own"
        assert not (process.data_dir / "runtime.json").exists()
    finally:
        process.stop()
