"""Host keys and host certificates for a Conch server factory.

Conch uses ``factory.publicKeys[alg]`` only through ``.blob()`` and
``factory.privateKeys[alg]`` only through ``.sign(data, signatureType=...)``
and ``.supportedSignatureAlgorithms()``, so a host certificate needs no
transport change: :class:`HostCertificateKey` returns the certificate blob
and signs with the host key, under the certificate algorithm name.
"""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives.serialization import ssh
from twisted.conch.ssh import keys
from twisted.logger import Logger

_log = Logger()

#: Certificate algorithm -> the signature algorithm of its key.
_CERT_TO_SIGNATURE = {
    b"ssh-ed25519-cert-v01@openssh.com": b"ssh-ed25519",
    b"ecdsa-sha2-nistp256-cert-v01@openssh.com": b"ecdsa-sha2-nistp256",
    b"ecdsa-sha2-nistp384-cert-v01@openssh.com": b"ecdsa-sha2-nistp384",
    b"ecdsa-sha2-nistp521-cert-v01@openssh.com": b"ecdsa-sha2-nistp521",
}


def _conch_key(private_key) -> keys.Key:
    if isinstance(private_key, keys.Key):
        return private_key
    return keys.Key(private_key)


class HostCertificateKey:
    """A host certificate usable as both ``publicKeys`` and ``privateKeys``
    entry of a Conch ``SSHFactory``.

    :param private_key: the host's private key (cryptography or Conch).
    :param certificate: its host certificate, signed by the host CA.
    :raises ValueError: the certificate is not a host certificate of that key,
        or of an unsupported algorithm (RSA host certificates are not).
    """

    def __init__(self, private_key, certificate: ssh.SSHCertificate) -> None:
        self._key = _conch_key(private_key)
        line = certificate.public_bytes().split()
        self._algorithm = line[0]
        self._blob = base64.b64decode(line[1])
        if self._algorithm not in _CERT_TO_SIGNATURE:
            raise ValueError(
                f"unsupported host certificate type {self._algorithm.decode()}"
            )
        if certificate.type != ssh.SSHCertificateType.HOST:
            raise ValueError("not a host certificate")
        if keys.Key(certificate.public_key()).blob() != self._key.public().blob():
            raise ValueError("the host certificate is not for this host key")

    def blob(self) -> bytes:
        """The certificate blob, sent as the server's host key."""
        return self._blob

    def sshType(self) -> bytes:
        """The certificate algorithm name."""
        return self._algorithm

    def supportedSignatureAlgorithms(self) -> list[bytes]:
        """The host key algorithm this entry offers: the certificate's."""
        return [self._algorithm]

    def sign(self, data: bytes, signatureType: bytes | None = None) -> bytes:
        """Sign the key exchange hash with the host key (the signature
        format of a certificate key is that of its plain key)."""
        return self._key.sign(data, signatureType=_CERT_TO_SIGNATURE[self._algorithm])


def host_keys(
    private_key, certificate: ssh.SSHCertificate | None = None
) -> tuple[dict[bytes, object], dict[bytes, object]]:
    """The ``(publicKeys, privateKeys)`` of a Conch ``SSHFactory``.

    The certificate (when given) comes first so that it is what Conch
    prefers; the plain host key is offered too, for clients that pin it.
    """
    key = _conch_key(private_key)
    public: dict[bytes, object] = {}
    private: dict[bytes, object] = {}
    if certificate is not None:
        cert_key = HostCertificateKey(key, certificate)
        public[cert_key.sshType()] = cert_key
        private[cert_key.sshType()] = cert_key
    public[key.sshType()] = key.public()
    private[key.sshType()] = key
    return public, private
