"""Run the node SSH server for the OpenSSH end-to-end tests.

``python node_ssh_server_main.py CONFIG.json`` listens on 127.0.0.1:0,
prints ``PORT <n>`` on stdout once listening, and logs to ``<config>.log``.
The config names the host key and certificate files, the trusted user CA
lines and the authorizer's grants ``[username, login, port_forwarding]``.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta

from twisted.internet import reactor
from twisted.internet.defer import fail
from twisted.internet.task import deferLater
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from zope.interface import implementer

from edgeaccess.errors import EdgeError
from edgeaccess.pki.keys import load_private_key
from edgeaccess.pki.sshca import load_certificate
from edgeaccess.ssh.interfaces import (
    ISessionObserver,
    SessionPermissions,
    StaticAuthorizer,
)
from edgeaccess.ssh.server import make_node_ssh_factory
from tests.serverscript import serve_on_ephemeral_port


@implementer(ISessionObserver)
class LoggingObserver:
    """Writes each event as one ``EVENT`` log line the tests look for."""

    _log = Logger()

    def auth_refused(self, username, login, peer_address, reason):
        self._log.info("EVENT auth_refused user={u} login={l}", u=username, l=login)

    def session_started(self, session, kind):
        self._log.info("EVENT session_started {s.session_id} {s.username} {k}", s=session, k=kind)
        # As the audit spool does: the session runs once this fires.
        if session.username == "slowdisk":
            def durable():
                self._log.info("EVENT durable {s.session_id}", s=session)

            return deferLater(reactor, 1.0, durable)
        if session.username == "brokendisk":
            return fail(EdgeError("this node cannot write its audit spool"))
        return None

    def exec_started(self, session, command):
        self._log.info("EVENT exec {s.session_id} {c!r}", s=session, c=command)

    def session_ended(self, session, exit_status, exit_signal):
        self._log.info(
            "EVENT session_ended {s.session_id} status={st} signal={sg}",
            s=session, st=exit_status, sg=exit_signal,
        )

    def port_forward(self, session, host, port, allowed):
        self._log.info("EVENT port {h}:{p} allowed={a}", h=host, p=port, a=allowed)


def main(config_path: str) -> None:
    with open(config_path) as f:
        config = json.load(f)
    log_file = open(config_path + ".log", "a", buffering=1)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)
    with open(config["host_key"], "rb") as f:
        host_key = load_private_key(f.read())
    with open(config["host_cert"], "rb") as f:
        host_cert = load_certificate(f.read())
    grants = {
        (user, login): SessionPermissions(
            port_forwarding=forwarding,
            roles=("access",),
            session_ttl=timedelta(seconds=ttl) if ttl else None,
        )
        for user, login, forwarding, ttl in config["grants"]
    }
    factory = make_node_ssh_factory(
        host_key,
        host_cert,
        lambda: [line.encode() for line in config["user_cas"]],
        StaticAuthorizer(grants),
        config["node_name"],
        reactor,
        env_allow=config.get("env_allow", ()),
        observer=LoggingObserver(),
    )
    serve_on_ephemeral_port(reactor, factory)


if __name__ == "__main__":
    main(sys.argv[1])
