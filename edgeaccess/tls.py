"""TLS contexts for the cluster's services and clients.

Servers present a certificate from the cluster CA; the auth API and the
tunnel server ask for client certificates from the same CA and read the
peer's identity from them (:func:`peer_identity`), never from a message.
"""

from __future__ import annotations

from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from edgeaccess import internals
from edgeaccess.pki import x509ca


def _x509(cert) -> crypto.X509:
    # Only for trust stores (pyOpenSSL's X509Store takes nothing else, and
    # does not warn); certificates and keys a context presents are passed as
    # ``cryptography`` objects, which pyOpenSSL prefers (it deprecates
    # passing its own X509/PKey to a context).
    return crypto.X509.from_cryptography(cert)


def server_options(key, cert, ca_certs, *, client_certificates: str = "none",
                   alpn: list[bytes] | None = None):
    """Server TLS options.

    :param client_certificates: ``"none"``, ``"optional"`` (verified against
        ``ca_certs`` when presented: the join endpoint needs none) or
        ``"required"``.
    """
    kwargs = dict(
        privateKey=key,
        certificate=cert,
        extraCertChain=list(ca_certs),
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


def client_options(hostname: str, ca_certs, *, key=None, cert=None,
                   alpn: list[bytes] | None = None):
    """Client TLS options trusting only ``ca_certs``, with an optional
    client certificate."""
    trust = ssl.trustRootFromCertificates([ssl.Certificate(_x509(c)) for c in ca_certs])
    extra: dict = {"raiseMinimumTo": ssl.TLSVersion.TLSv1_3}
    if key is not None and cert is not None:
        # What optionsForClientTLS(clientCertificate=...) would pass, as
        # cryptography objects (its PrivateCertificate holds pyOpenSSL ones).
        extra.update(privateKey=key, certificate=cert)
    return ssl.optionsForClientTLS(
        hostname, trustRoot=trust, acceptableProtocols=alpn,
        extraCertificateOptions=extra,
    )


@implementer(IPolicyForHTTPS)
class ClusterPolicy:
    """treq/Agent policy: trust the cluster CA, present our certificate."""

    def __init__(self, ca_certs, key=None, cert=None) -> None:
        self._ca_certs = ca_certs
        self._key = key
        self._cert = cert

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return client_options(hostname.decode("ascii"), self._ca_certs,
                              key=self._key, cert=self._cert)


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
    certificate, or ``None``."""
    cert = peer_certificate(transport)
    if cert is None:
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
