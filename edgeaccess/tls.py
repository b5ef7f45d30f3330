"""TLS contexts for the cluster's services and clients.

Servers present a certificate from the cluster CA; the auth API and the
tunnel server ask for client certificates from the same CA and read the
peer's identity from them (:func:`peer_identity`), never from a message.
Clients accept only the server they meant (:func:`client_options`,
:class:`ClusterPolicy`): a proxy of the expected cluster whose certificate
names the host dialled, never just any certificate the CA issued.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from edgeaccess import errors, internals
from edgeaccess.pki import x509ca

_log = Logger()


def _x509(cert) -> crypto.X509:
    # Only for trust stores (pyOpenSSL's X509Store takes nothing else, and
    # does not warn); certificates and keys a context presents are passed as
    # ``cryptography`` objects, which pyOpenSSL prefers (it deprecates
    # passing its own X509/PKey to a context).
    return crypto.X509.from_cryptography(cert)


def server_options(key, cert, ca_certs, *, client_certificates: str = "none",
                   alpn: list[bytes] | None = None, chain=None):
    """Server TLS options.

    :param client_certificates: ``"none"``, ``"optional"`` (verified against
        ``ca_certs`` when presented: the join endpoint needs none) or
        ``"required"``.
    :param chain: the certificates sent after ``cert`` (default: ``ca_certs``);
        the web port sends the web CA's link (:meth:`CertificateAuthority.sign_web`).
    """
    kwargs = dict(
        privateKey=key,
        certificate=cert,
        extraCertChain=list(ca_certs if chain is None else chain),
        raiseMinimumTo=ssl.TLSVersion.TLSv1_3,
        acceptableProtocols=alpn,
    )
    if client_certificates == "none":
        return ssl.CertificateOptions(**kwargs)
    return ssl.CertificateOptions(
        verify=True,
        caCerts=[_x509(c) for c in ca_certs],
        requireCertificate=(client_certificates == "required"),
        **kwargs,
    )


def client_options(hostname: str, ca_certs, *, cluster: str, key=None, cert=None,
                   alpn: list[bytes] | None = None, kinds=x509ca.SERVER_KINDS):
    """Client TLS options trusting only ``ca_certs``, with an optional
    client certificate, accepting only a server of one of ``kinds`` of
    ``cluster`` whose certificate names ``hostname`` (the name or address
    dialled): see :func:`edgeaccess.pki.x509ca.check_server_certificate`."""
    trust = ssl.trustRootFromCertificates([ssl.Certificate(_x509(c)) for c in ca_certs])
    extra: dict = {"raiseMinimumTo": ssl.TLSVersion.TLSv1_3}
    if key is not None and cert is not None:
        # What optionsForClientTLS(clientCertificate=...) would pass, as
        # cryptography objects (its PrivateCertificate holds pyOpenSSL ones).
        extra.update(privateKey=key, certificate=cert)
    inner = ssl.optionsForClientTLS(
        hostname, trustRoot=trust, acceptableProtocols=alpn,
        extraCertificateOptions=extra,
    )
    return ClusterServerCheck(inner, x509ca.ExpectedServer(cluster=cluster, host=hostname,
                                                          kinds=tuple(kinds)))


@implementer(IOpenSSLClientConnectionCreator)
class ClusterServerCheck:
    """Client connections that accept only the expected cluster server.

    Wraps Twisted's client options (trust root, SNI, ALPN, client
    certificate) and replaces the per-connection verify callback with one
    that, for the server's own certificate (the chain having verified
    against the cluster CA), runs
    :func:`~edgeaccess.pki.x509ca.check_server_certificate`: the kind, the
    cluster, EKU serverAuth and the dialled name or address. A mismatch
    fails the handshake, so not one byte of the application reaches that
    server; the reason reaches the protocol's ``connectionLost`` as
    :class:`~edgeaccess.errors.CertificateInvalid`.
    """

    def __init__(self, inner: IOpenSSLClientConnectionCreator,
                 expected: x509ca.ExpectedServer) -> None:
        self._inner = inner
        self.expected = expected

    def clientConnectionForTLS(self, tlsProtocol):  # noqa: N802 (Twisted interface)
        connection = self._inner.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                              _server_check_callback(tlsProtocol, self.expected))
        return connection


def _server_check_callback(tls_protocol, expected: x509ca.ExpectedServer):
    protocol_ref = [tls_protocol]

    def verify(connection, certificate, error_number, depth, ok) -> bool:
        if depth != 0:
            return bool(ok)
        protocol = protocol_ref.pop() if protocol_ref else None
        try:
            # Run even when OpenSSL refused the certificate (e.g. a client-only
            # one: "unsupported purpose"), to say what the server really is.
            x509ca.check_server_certificate(certificate.to_cryptography(), expected)
            if ok:
                return True
            reason = errors.CertificateInvalid(
                f"refused the server at {expected.host}: its certificate does not verify "
                f"against the cluster CA (X.509 error {error_number})")
        except x509ca.ServerMismatch as e:
            reason = errors.CertificateInvalid(
                f"refused the server at {expected.host}: {e}")
        except Exception as e:  # never raise into OpenSSL's callback
            _log.failure("while checking a server certificate")
            reason = errors.CertificateInvalid(
                f"refused the server at {expected.host}: {type(e).__name__}")
        _log.warn("{reason}", reason=reason)
        if protocol is not None:
            protocol.failVerification(Failure(reason))
        return False

    return verify


@implementer(IPolicyForHTTPS)
class ClusterPolicy:
    """treq/Agent policy: trust the cluster CA, accept only a server of
    ``kinds`` of ``cluster`` at the host of the URL, present our certificate.

    :param credentials: ``() -> (private_key, certificate)`` or None (no
        client certificate); called for each new connection, so a renewed
        certificate is used from the next connection on.
    """

    def __init__(self, ca_certs, *, cluster: str, credentials=None,
                 kinds=x509ca.SERVER_KINDS) -> None:
        self._ca_certs = list(ca_certs)
        self._cluster = cluster
        self._credentials = credentials
        self._kinds = tuple(kinds)
        self._cache: dict = {}

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:  # noqa: N802
        key, cert = self._credentials() if self._credentials is not None else (None, None)
        host = hostname.decode("ascii")
        cache_key = (host, port, None if cert is None else cert.fingerprint(hashes.SHA256()))
        creator = self._cache.get(cache_key)
        if creator is None:
            # One context per (host, certificate): the CA and key are loaded once.
            self._cache.clear()
            creator = self._cache[cache_key] = client_options(
                host, self._ca_certs, cluster=self._cluster, key=key, cert=cert,
                kinds=self._kinds)
        return creator


@implementer(IPolicyForHTTPS)
class UnverifiedPolicy:
    """Accepts any server: only for fetching a CA that is then checked
    against a pin (or trusted on first use, saying so)."""

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:  # noqa: N802
        return ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_3)


def peer_certificate(transport):
    """The peer's certificate (``cryptography``) of a TLS transport, or None."""
    getter = getattr(transport, "getPeerCertificate", None)
    if getter is None:
        return None
    cert = getter()
    if cert is None:
        return None
    return cert.to_cryptography()


def peer_identity(transport) -> x509ca.Identity | None:
    """The edgeaccess identity of a TLS peer that presented a verified
    client certificate, or ``None`` (also for a certificate that is not for
    clients: a proxy's, whatever it says, is never a caller)."""
    cert = peer_certificate(transport)
    if cert is None or not x509ca.is_client_certificate(cert):
        return None
    try:
        return x509ca.identity_from_certificate(cert)
    except ValueError:
        return None


def shrink_tls_buffers(transport) -> bool:
    """Give back the memory BIO capacity an established TLS connection
    kept from its handshake.

    Twisted's TLS runs OpenSSL over two memory BIOs that keep the capacity
    of the largest flight they ever held (the handshake: certificates, the
    post-quantum key shares), ~5 KiB per connection that an idle connection
    never needs again. Both are replaced by empty ones; this is only done
    when neither holds a byte, so nothing in flight is touched. The copy of
    the chosen ALPN name pyOpenSSL keeps for OpenSSL during the handshake
    goes too (OpenSSL has its own since). Returns whether the BIOs were
    replaced (False: not a memory-BIO TLS transport, the handshake is not
    done, bytes are pending, or pyOpenSSL is not the shape this was checked
    on: the ``tls-buffers`` reach of :mod:`edgeaccess.internals`).
    """
    return internals.shrink_tls_buffers(transport)
