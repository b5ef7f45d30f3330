"""A throw-away PostgreSQL 15 server for tests and demos, on 127.0.0.1 (like devcluster).

``initdb`` into a fresh temporary directory (as the ``postgres`` user when
running as root: PostgreSQL refuses to run as root), ``pg_ctl start`` on a
free port with its unix socket in that directory, password (SCRAM) auth
over TCP so that tests use real ``postgresql://USER:PASS@...`` URLs;
``stop`` removes everything.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile

import psycopg

BIN = "/usr/lib/postgresql/15/bin"
USER = "edge"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """One cluster; :meth:`url` of a database made by :meth:`create_database`."""

    def __init__(self, durable: bool = False) -> None:
        self.root = tempfile.mkdtemp(prefix="edgeaccess-pg-")
        self.data = os.path.join(self.root, "data")
        self.password = secrets.token_hex(12)
        self.port = _free_port()
        self._as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self._count = 0
        # Fast by default; durable=True keeps synchronous commit, so that a
        # crash (restart -m immediate) loses no committed transaction.
        self._durable = durable
        password_file = os.path.join(self.root, "pw")
        with open(password_file, "w") as handle:
            handle.write(self.password)
        if self._as_postgres:
            shutil.chown(self.root, "postgres")
            shutil.chown(password_file, "postgres")
        self._pg("initdb", "-D", self.data, "-U", USER, "-E", "UTF8", "--locale=C",
                 f"--pwfile={password_file}", "--auth-host=scram-sha-256", "--auth-local=trust")
        self.start()

    def _pg(self, tool: str, *args: str) -> None:
        subprocess.run([*self._as_postgres, os.path.join(BIN, tool), *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def _options(self) -> str:
        options = f"-c listen_addresses=127.0.0.1 -c port={self.port} -k {self.root}"
        if not self._durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        return options

    def start(self) -> None:
        self._pg("pg_ctl", "start", "-w", "-t", "60", "-D", self.data, "-l",
                 os.path.join(self.root, "log"), "-o", self._options())

    def restart(self, mode: str) -> None:
        """``pg_ctl restart -m fast|immediate``: drops every connection."""
        self._pg("pg_ctl", "restart", "-w", "-t", "60", "-m", mode, "-D", self.data,
                 "-l", os.path.join(self.root, "log"), "-o", self._options())

    def url(self, database: str) -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{database}?sslmode=disable"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        self._count += 1
        name = f"test{self._count}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._pg("pg_ctl", "stop", "-w", "-m", "immediate", "-D", self.data)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
