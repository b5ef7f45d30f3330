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

from edgeaccess.pki import x509ca


def _x509(cert) -> crypto.X509:
    return crypto.X509.from_cryptography(cert)


def _pkey(key) -> crypto.PKey:
    return crypto.PKey.from_cryptography_key(key)


def server_options(key, cert, ca_certs, *, client_certificates: str = "none",
                   alpn: list[bytes] | None = None):
    """Server TLS options.

    :param client_certificates: ``"none"``, ``"optional"`` (verified against
        ``ca_certs`` when presented: the join endpoint needs none) or
        ``"required"``.
    """
    kwargs = dict(
        privateKey=_pkey(key),
        certificate=_x509(cert),
        extraCertChain=[_x509(c) for c in ca_certs],
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
    client_cert = None
    if key is not None and cert is not None:
        client_cert = ssl.PrivateCertificate.fromCertificateAndKeyPair(
            ssl.Certificate(_x509(cert)), ssl.KeyPair(_pkey(key))
        )
    return ssl.optionsForClientTLS(
        hostname, trustRoot=trust, clientCertificate=client_cert,
        acceptableProtocols=alpn,
        extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_3},
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
