"""Two ``twistd edgeproxy`` processes on one PostgreSQL database.

What is shared through the backend today: users, roles, tokens and the
rest of the items. The CAs are still per data directory (see
docs/operations.md "PostgreSQL backend"), so each proxy is pinned by its
own CA; a user created through A logs in through B.
"""

from __future__ import annotations

import os

import pytest

from edgeaccess.devcluster import ProxyProcess
from edgeaccess.devpostgres import BIN, PostgresServer

pytestmark = pytest.mark.skipif(not os.path.exists(BIN), reason="PostgreSQL 15 is not installed")


@pytest.fixture(scope="module")
def database():
    server = PostgresServer()
    yield server.create_database()
    server.stop()


@pytest.fixture(scope="module")
def proxies(database, tmp_path_factory):
    base = tmp_path_factory.mktemp("pg-proxies")
    started = []
    try:
        for name in ("a", "b"):
            process = ProxyProcess(base / name, base / f"{name}.log", cluster="pg-e2e",
                                   extra_args=["--backend", database])
            started.append(process)
            process.start()
        yield started
    except Exception:
        for process in started:
            print(process.log()[-4000:])
        raise
    finally:
        for process in started:
            process.stop()


def test_a_user_created_through_one_proxy_logs_in_through_the_other(proxies, tmp_path):
    first, second = proxies
    first.add_user("alice", "correct horse battery", logins=("alice",))
    listed = [user["name"] for user in second.edgectl_json("users", "ls")]
    assert "alice" in listed
    home = second.login(tmp_path / "home", "alice", "correct horse battery")
    assert any(home.rglob("*")), "edge login wrote no profile"


def test_the_database_password_is_not_logged(proxies, database):
    password = database.split(":")[2].split("@")[0]
    for process in proxies:
        assert password not in process.log()
