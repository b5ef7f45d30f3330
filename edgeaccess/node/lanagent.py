"""The agent port of a LAN node: the proxy dials it for ``ssh``, ``kube`` and ``app`` channels.

A node in direct mode (``--auth-server`` is the auth API, the proxy dials
the node) listens on ``--agent-listen`` (default: the SSH listen host, port
:data:`AGENT_PORT`; ``off``: no agent port, the proxy reaches its SSH over
plain TCP).
The proxy connects over mutual TLS 1.3 (ALPN :data:`ALPN_AGENT`) and the
connection speaks the reverse tunnel's own protocol
(:class:`~edgeaccess.tunnel.agent.AgentTunnelProtocol` over
:class:`~edgeaccess.tunnel.connection.TunnelConnection`): only the TCP
direction is turned round. The node is the agent (it says ``Hello`` with its
inventory and pings), the proxy opens channels, and the node checks each
one with the same acceptor as over a tunnel.

Who is who (docs/security.md, "Who trusts whom"): the node presents its
*server* certificate (kind ``node``, EKU serverAuth, the addresses it
joined with); it accepts only a *client* certificate of kind ``proxy`` of
its own cluster (EKU clientAuth), checked in the handshake's verify
callback, so anyone else's handshake fails before a byte of the protocol
is exchanged.

Resumable channels (``resume/1``, as on a tunnel): the node keeps one
:class:`~edgeaccess.tunnel.resume.ResumeSlot` per proxy, keyed by the
proxy's verified certificate (its identity and its public key), so a proxy
that redials after a cut gets its own detached channels back and no other
proxy ever does. The Hello that offers the session waits for the TLS
handshake (the slot depends on who the peer is). A proxy's new connection
that arrives while its old one still looks alive to the node (a black hole
the proxy noticed first) takes the old one's channels over.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Hashable

from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeaccess import tls
from edgeaccess.pki import x509ca
from edgeaccess.tunnel.agent import AgentTunnelProtocol
from edgeaccess.tunnel.protocol import Inventory
from edgeaccess.tunnel.resume import ResumeSlot

_log = Logger()

#: Default port of the agent listener (next to the proxy's 3026).
AGENT_PORT = 3027
#: ALPN of the proxy's connection to a LAN agent (its own, so a tunnel port
#: and an agent port can never be mistaken for one another).
ALPN_AGENT = b"edge-agent/1"


def check_proxy_client(cert, cluster: str) -> x509ca.Identity:
    """The identity of a client certificate (already verified against the
    cluster CA) if it is a proxy's *client* certificate of ``cluster``.

    :raises ValueError: saying what it is instead.
    """
    identity = x509ca.identity_from_certificate(cert)
    if identity.kind != "proxy":
        raise ValueError(f"a {identity.kind} certificate ({identity.name}), not a proxy's")
    if identity.cluster != cluster:
        raise ValueError(f"a proxy certificate of cluster {identity.cluster}, not {cluster}")
    if ExtendedKeyUsageOID.CLIENT_AUTH not in x509ca.extended_key_usages(cert):
        raise ValueError("a proxy certificate that is not for clients")
    return identity


@implementer(IOpenSSLServerConnectionCreator)
class AgentServerTLS:
    """The agent port's TLS: the node's current server certificate, a
    required client certificate from the cluster CA, proxies of this cluster only.

    :param credentials: ``() -> (key, server_certificate, ca_certs)``, asked
        for each connection: a renewed certificate is used from the next one on.
    """

    def __init__(self, credentials: Callable[[], tuple], cluster: str) -> None:
        self._credentials = credentials
        self.cluster = cluster
        self._cached: tuple = (None, None)

    def _context(self):
        key, cert, ca_certs = self._credentials()
        if self._cached[0] is not cert:
            options = tls.server_options(key, cert, ca_certs, client_certificates="required",
                                         alpn=[ALPN_AGENT])
            self._cached = (cert, options.getContext())
        return self._cached[1]

    def serverConnectionForTLS(self, tlsProtocol):  # noqa: N802 (Twisted interface)
        connection = SSL.Connection(self._context(), None)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                              self._verify(tlsProtocol))
        return connection

    def _verify(self, tls_protocol):
        def verify(connection, certificate, error_number, depth, ok) -> bool:
            if depth != 0:
                return bool(ok)
            peer = tls_protocol.transport.getPeer() if tls_protocol.transport else None
            address = getattr(peer, "host", "?")
            try:
                # Even when OpenSSL refused it (e.g. a server-only certificate:
                # "unsupported purpose"), to say what the client really is.
                check_proxy_client(certificate.to_cryptography(), self.cluster)
            except Exception as e:  # never raise into OpenSSL's callback
                _log.warn("agent port: refused {addr}: it presented {what}", addr=address,
                          what=e)
                return False
            if not ok:
                _log.warn("agent port: refused {addr}: its certificate does not verify "
                          "against the cluster CA (X.509 error {error})", addr=address,
                          error=error_number)
                return False
            return True

        return verify


def proxy_key(transport) -> Hashable | None:
    """Whose channels a connection to the agent port may resume: the proxy's
    verified client certificate, as ``(kind, cluster, name, key digest)``
    (proxies behind one public name have one name but keys of their own),
    or None without one."""
    cert = tls.peer_certificate(transport)
    if cert is None:
        return None
    try:
        identity = x509ca.identity_from_certificate(cert)
    except ValueError:
        return None
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return (identity.kind, identity.cluster, identity.name, hashlib.sha256(spki).hexdigest())


@implementer(IHandshakeListener)
class LanAgentProtocol(AgentTunnelProtocol):
    """The node's end of one proxy connection: an agent tunnel whose
    resumable session is the one of the proxy at the other end."""

    factory: LanAgentFactory
    #: The proxy's key (:func:`proxy_key`), once known.
    proxy_key: Hashable | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        if not self.factory.after_handshake:
            self.begin()

    def handshakeCompleted(self) -> None:  # noqa: N802 (Twisted interface)
        """TLS is up: the peer is a verified proxy of this cluster."""
        if self.factory.after_handshake and not self._is_lost:
            self.begin()

    def begin(self) -> None:
        """Pick the proxy's session (a detached one to resume, or a new one), say Hello."""
        key = self.factory.proxy_identity(self.transport)
        if key is None:
            self._drop("no proxy identity")
            return
        self.proxy_key = key
        slot = self.factory.slot_for(key, self)
        if slot is not None:
            # Nothing was opened before Hello: the session this tunnel gets
            # is the slot's (waiting, or new with its own id).
            peer = self.mux.peer_name
            self._mux = None
            self.use_resume_slot(slot)
            self.mux.local_name = self.inventory.name
            self.mux.peer_name = peer
        self.send_hello()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self.factory.forget(self)


class LanAgentFactory(Factory):
    """Builds the node's side of each proxy connection (see the module docstring).

    :param inventory: ``() -> Inventory`` (what the node serves now).
    :param accept_channel: ``(kind, target) -> factory`` (raises to refuse).
    :param resume_budget: seconds a proxy's channels outlive its connection
        (``--resume-budget``; 0: they end with it).
    :param proxy_identity: ``(transport) -> key`` of the proxy at the other
        end (default :func:`proxy_key`, from its verified certificate).
    :param after_handshake: whether Hello waits for the TLS handshake (the
        agent port's TLS: :func:`agent_server_factory` sets it).
    """

    protocol = LanAgentProtocol

    def __init__(self, *, clock, inventory: Callable[[], Inventory], accept_channel,
                 heartbeat_interval: float = 30.0, max_channels: int = 256,
                 resume_budget: float = 0.0,
                 proxy_identity: Callable[[object], Hashable | None] = proxy_key,
                 after_handshake: bool = False) -> None:
        self.clock = clock
        self.inventory = inventory
        self.accept_channel = accept_channel
        self.heartbeat_interval = heartbeat_interval
        self.max_channels = max_channels
        self.resume_budget = resume_budget
        self.proxy_identity = proxy_identity
        self.after_handshake = after_handshake
        #: Each proxy's session slot, by :func:`proxy_key`.
        self.slots: dict[Hashable, ResumeSlot] = {}
        #: Each proxy's newest connection.
        self._current: dict[Hashable, LanAgentProtocol] = {}

    def buildProtocol(self, addr) -> LanAgentProtocol:
        protocol = self.protocol(
            clock=self.clock, inventory=self.inventory(), accept_channel=self.accept_channel,
            heartbeat_interval=self.heartbeat_interval, max_channels=self.max_channels)
        protocol.hello_at_connection = False
        protocol.factory = self
        # Nobody waits on the Hello of a connection the proxy made: a refused
        # or dropped one is the proxy's to report (and it logs it there).
        protocol.ready.addErrback(lambda failure: _log.debug(
            "agent port: a connection from {addr} ended before its Hello: {why}",
            addr=addr, why=failure.getErrorMessage()))
        return protocol

    def slot_for(self, key: Hashable, protocol: LanAgentProtocol) -> ResumeSlot | None:
        """The session slot of proxy ``key`` for its new connection
        ``protocol`` (None: no resumption). An older connection of the same
        proxy that still carries channels hands them over."""
        previous = self._current.get(key)
        self._current[key] = protocol
        if self.resume_budget <= 0:
            return None
        slot = self.slots.get(key)
        if slot is None:
            # Slots of proxies with nothing waiting and no connection go.
            for other in [k for k, s in self.slots.items()
                          if not s.waiting and k not in self._current]:
                del self.slots[other]
            slot = self.slots[key] = ResumeSlot(self.clock, self.resume_budget)
        if previous is not None and previous is not protocol and not previous._is_lost:
            mux = previous._mux
            if mux is not None and mux.resumable and mux.held and not mux._lost \
                    and not mux.detached:
                _log.info("agent port: the new connection of {peer} takes over its "
                          "{count} channels", peer=mux.peer_name, count=len(mux.channels))
                previous.give_up_session()
                slot.detached(mux)
        return slot

    def forget(self, protocol: LanAgentProtocol) -> None:
        """``protocol``'s connection is gone."""
        key = protocol.proxy_key
        if key is not None and self._current.get(key) is protocol:
            del self._current[key]


def agent_server_factory(factory: LanAgentFactory, server_tls: AgentServerTLS):
    """The TCP factory of the agent port: TLS (proxies only), then the protocol
    (whose Hello waits for the handshake)."""
    factory.after_handshake = True
    return TLSMemoryBIOFactory(server_tls, False, factory)
