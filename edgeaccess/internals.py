"""The few places where edgeaccess must reach into private parts of its libraries.

Each piece says what it relies on, checks at import time that it is still
there (``*_SUPPORTED``), and has a fallback the callers use when it is not:
they refuse the feature with a clear message rather than run on guesses.
"""

from __future__ import annotations

from twisted.conch.ssh import _kex
from twisted.conch.ssh.common import NS, getNS
from twisted.conch.ssh.transport import (
    DISCONNECT_HOST_KEY_NOT_VERIFIABLE,
    DISCONNECT_KEY_EXCHANGE_FAILED,
    SSHClientTransport,
)
from twisted.logger import Logger

_log = Logger()

# --- Conch client: servers that present an OpenSSH host certificate -------------------
#
# Conch's client verifies the key exchange signature with
# ``keys.Key.fromString(host_key_blob)``, which rejects certificate blobs
# (``ssh-ed25519-cert-v01@openssh.com``): a Conch client cannot talk to a
# server that proves itself with a host certificate, i.e. to our nodes. The
# only place to change that is the client's ECDH reply handler,
# ``SSHClientTransport._ssh_KEX_ECDH_REPLY``, and the private helpers it
# uses (Twisted 24.7 - 26.10): ``_generateECSharedSecret``,
# ``_encodeECPublicKey``, ``ecPriv``/``ecPub`` and ``_keySetup``.

_ECDH_NEEDS = ("_ssh_KEX_ECDH_REPLY", "_generateECSharedSecret", "_encodeECPublicKey",
               "_keySetup")

#: Whether :class:`HostCertificateClientMixin` can work with this Twisted.
HOST_CERTIFICATE_CLIENT_SUPPORTED = all(hasattr(SSHClientTransport, name)
                                        for name in _ECDH_NEEDS) and hasattr(
    _kex, "getHashProcessor")


class HostCertificateClientMixin:
    """For a subclass of ``SSHClientTransport`` whose ``verifyHostKey(blob,
    fingerprint)`` fires with the Conch ``Key`` that signs for ``blob``
    (the public key inside a host certificate it has checked), or fails.

    Only ECDH key exchanges (curve25519) go through here: set
    ``supportedKeyExchanges`` accordingly.
    """

    def _ssh_KEX_ECDH_REPLY(self, packet):  # noqa: N802  (Conch's name)
        host_blob, server_public, signature, _ = getNS(packet, 3)
        d = self.verifyHostKey(host_blob, b"")

        def verified(signing_key):
            shared = self._generateECSharedSecret(self.ecPriv, server_public)
            h = _kex.getHashProcessor(self.kexAlg)()
            for part in (self.ourVersionString, self.otherVersionString,
                         self.ourKexInitPayload, self.otherKexInitPayload, host_blob,
                         self._encodeECPublicKey(self.ecPub), server_public):
                h.update(NS(part))
            h.update(shared)
            exchange_hash = h.digest()
            if not signing_key.verify(signature, exchange_hash):
                self.sendDisconnect(DISCONNECT_KEY_EXCHANGE_FAILED, b"bad signature")
                return
            self._keySetup(shared, exchange_hash)

        def refused(failure):
            _log.info("host key refused: {reason}", reason=failure.getErrorMessage())
            self.sendDisconnect(DISCONNECT_HOST_KEY_NOT_VERIFIABLE,
                                b"host certificate not trusted")

        d.addCallbacks(verified, refused)
        return d


def _self_check() -> None:
    if not HOST_CERTIFICATE_CLIENT_SUPPORTED:
        _log.warn("this Twisted lacks the Conch client internals edgeaccess.internals "
                  "needs ({names}): web terminals are refused",
                  names=", ".join(_ECDH_NEEDS))


_self_check()
