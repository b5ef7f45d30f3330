"""The node side of app access: ``app`` tunnel channels to the apps it publishes.

Each channel carries one user connection's HTTP/1.1 stream, already checked
and rewritten by the proxy; the node connects it to the app (TCP, or TLS for
an ``https`` app, verified against the app's CA file or the system's trust
store) and splices bytes both ways with backpressure. One channel is one
keep-alive connection to the app, reused for every request the user's
connection carries; upgrades (WebSocket) need nothing more.

The node only serves the apps it announced: any other target is refused.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import ssl
from twisted.internet.endpoints import wrapClientTLS
from twisted.logger import Logger

from edgeaccess import errors
from edgeaccess.apps.spec import AppSpec
from edgeaccess.proxy.router import tcp_endpoint
from edgeaccess.proxy.splice import SpliceFactory, _Inbound, tune_transport

_log = Logger()

CONNECT_TIMEOUT = 10.0


class AppAgent:
    """The apps one node publishes, by name.

    :param apps: the parsed ``--app`` values.
    :param reactor: for the connections to the apps.
    """

    def __init__(self, apps: list[AppSpec], reactor) -> None:
        self.reactor = reactor
        self.apps = {app.name: app for app in apps}
        self._tls = {app.name: self._tls_options(app) for app in apps
                     if app.scheme == "https"}

    def inventory(self) -> tuple:
        return tuple(app.inventory() for app in self.apps.values())

    @staticmethod
    def _tls_options(app: AppSpec):
        if app.ca_file:
            try:
                pem = Path(app.ca_file).read_bytes()
                trust = ssl.trustRootFromCertificates(
                    [ssl.Certificate.loadPEM(pem)])
            except (OSError, ValueError) as e:
                raise errors.BadRequest(f"app {app.name}: cannot read CA file "
                                        f"{app.ca_file}: {e}")
        else:
            trust = ssl.platformTrust()
        return ssl.optionsForClientTLS(app.host, trustRoot=trust)

    def endpoint(self, app: AppSpec):
        """Where the app is: TCP, wrapped in TLS for an ``https`` app."""
        tcp = tcp_endpoint(self.reactor, app.host, app.port, CONNECT_TIMEOUT)
        if app.scheme == "https":
            return wrapClientTLS(self._tls[app.name], tcp)
        return tcp

    def accept(self, target: str):
        """The factory for a channel to app ``target`` (NotFound for any other)."""
        app = self.apps.get(target)
        if app is None:
            raise errors.NotFound(f"this node serves no app named {target[:64]!r}")
        endpoint = _Tuned(self.endpoint(app), self.reactor)
        _log.debug("app channel to {app}", app=app.name)
        return _AppSplice(lambda: endpoint, description=f"app {app.name} at {app.uri}",
                          app=app.name)


class _AppSplice(SpliceFactory):
    """A splice that answers ``502`` itself when the app cannot be reached."""

    def __init__(self, endpoint_for, description: str, app: str) -> None:
        super().__init__(endpoint_for, description)
        self.app = app

    def buildProtocol(self, addr):
        return _AppInbound(self)


class _AppInbound(_Inbound):
    def _failed(self, error: Exception) -> None:
        from edgeaccess.apps.proxy import error_page

        _log.warn("app {app} is unreachable: {why}", app=self.factory.app, why=error)
        if self.transport is not None and not self.lost:
            self.transport.write(error_page(
                502, f"app {self.factory.app} is unreachable from its node: "
                     f"{_reason(error)}"))
        super()._failed(error)


def _reason(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text.split(": ", 1)[-1][:200] if "Connection refused" in text else text[:200]


class _Tuned:
    """Connects like ``endpoint``, then turns Nagle off (requests are small
    writes that must not wait for an ACK)."""

    def __init__(self, endpoint, clock) -> None:
        self.endpoint = endpoint
        self.clock = clock

    def connect(self, factory):
        def connected(protocol):
            tune_transport(protocol.transport, self.clock, fast_tls=False)
            return protocol

        return self.endpoint.connect(factory).addCallback(connected)
