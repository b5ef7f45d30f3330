"""OpenSSH user-certificate authentication for Conch servers.

Conch (Twisted 26.10) has no certificate support: ``Key.fromString``
rejects ``*-cert-v01@openssh.com`` blobs and ``SSHUserAuthServer``
parses the key before any checker runs. This module replaces the
``publickey`` method of the userauth service and gives the portal a
checker for certificates:

- :class:`CertificateUserAuthServer` accepts only ``publickey`` with a
  certificate algorithm (bare keys and passwords are refused) and turns
  the request into :class:`CertificateCredentials`;
- :class:`SSHCertificateChecker` verifies the certificate
  (:func:`verify_user_certificate`: trusted CA, type, validity, principal,
  critical options) and the session signature made with the certified key;
- :class:`CertificateRealm` asks an :class:`~edgeaccess.ssh.interfaces.IAuthorizer`
  and builds the avatar with an injected factory.

Nothing here is specific to the node: the proxy's SSH service reuses it
with its own avatar factory.
"""

from __future__ import annotations

import base64
import ipaddress
from typing import Callable, Iterable

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import ssh
from twisted.conch import error as conch_error
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import keys, userauth
from twisted.conch.ssh.common import NS, getNS
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from edgeaccess.errors import AccessDenied, CertificateInvalid, EdgeError
from edgeaccess.pki.sshca import UserIdentity, user_identity_from_certificate
from edgeaccess.ssh.interfaces import (
    IAuthorizer,
    ISessionObserver,
    NullSessionObserver,
    SessionPermissions,
)

_log = Logger()

#: Certificate algorithm (as sent in the userauth request) -> the signature
#: algorithms a session signature made with the certified key may use.
#: ``ssh-rsa-cert-v01@openssh.com`` (SHA-1 signatures) is not accepted.
CERT_SIGNATURE_ALGORITHMS: dict[bytes, frozenset[bytes]] = {
    b"ssh-ed25519-cert-v01@openssh.com": frozenset({b"ssh-ed25519"}),
    b"ecdsa-sha2-nistp256-cert-v01@openssh.com": frozenset({b"ecdsa-sha2-nistp256"}),
    b"ecdsa-sha2-nistp384-cert-v01@openssh.com": frozenset({b"ecdsa-sha2-nistp384"}),
    b"ecdsa-sha2-nistp521-cert-v01@openssh.com": frozenset({b"ecdsa-sha2-nistp521"}),
    b"rsa-sha2-256-cert-v01@openssh.com": frozenset({b"rsa-sha2-256"}),
    b"rsa-sha2-512-cert-v01@openssh.com": frozenset({b"rsa-sha2-512"}),
}

#: The critical options this server understands; any other one is refused
#: (PROTOCOL.certkeys: an unrecognised critical option must fail auth).
KNOWN_CRITICAL_OPTIONS = frozenset({"force-command", "source-address"})

_RSA_CERT_BLOB_TYPE = b"ssh-rsa-cert-v01@openssh.com"
MSG_USERAUTH_BANNER = 53


class ISSHCertificateCredentials(Interface):
    """A ``publickey`` userauth request made with an OpenSSH certificate."""

    username = Attribute("the requested login (str)")
    algorithm = Attribute("the certificate algorithm of the request (bytes)")
    blob = Attribute("the certificate blob (bytes)")
    sig_data = Attribute("the signed data, or None for a query (bytes)")
    signature = Attribute("the signature, or None for a query (bytes)")
    peer_address = Attribute("the client's IP address (str)")


@implementer(ISSHCertificateCredentials)
@attrs.frozen
class CertificateCredentials:
    """See :class:`ISSHCertificateCredentials`."""

    username: str
    algorithm: bytes
    blob: bytes
    sig_data: bytes | None
    signature: bytes | None
    peer_address: str


@attrs.frozen
class VerifiedCertificate:
    """A certificate that passed every check, as the checker's avatar id.

    :ivar force_command: the ``force-command`` critical option, which the
        session must run instead of whatever the client asks for.
    """

    certificate: ssh.SSHCertificate
    identity: UserIdentity
    login: str
    peer_address: str
    force_command: str | None


def _openssh_public(key) -> bytes:
    """``type base64`` of a public key (cryptography key or OpenSSH line)."""
    if isinstance(key, (bytes, str)):
        line = key.encode("ascii") if isinstance(key, str) else key
        return b" ".join(line.split()[:2])
    if hasattr(key, "public_key") and not isinstance(key, ssh.SSHCertificate):
        try:
            key = key.public_key()
        except TypeError:
            pass
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


def parse_certificate_blob(algorithm: bytes, blob: bytes) -> ssh.SSHCertificate:
    """Parse the certificate blob of a userauth request.

    :raises CertificateInvalid: the blob is not a certificate of a supported
        algorithm, or does not match ``algorithm``.
    """
    if algorithm not in CERT_SIGNATURE_ALGORITHMS:
        raise CertificateInvalid(
            f"unsupported certificate algorithm {algorithm.decode('ascii', 'replace')}"
        )
    try:
        blob_type = getNS(blob)[0]
    except Exception:
        raise CertificateInvalid("malformed certificate")
    expected = _RSA_CERT_BLOB_TYPE if algorithm.startswith(b"rsa-sha2-") else algorithm
    if blob_type != expected:
        raise CertificateInvalid("certificate type does not match its algorithm")
    try:
        cert = ssh.load_ssh_public_identity(blob_type + b" " + base64.b64encode(blob))
    except Exception:
        raise CertificateInvalid("malformed certificate")
    if not isinstance(cert, ssh.SSHCertificate):
        raise CertificateInvalid("not a certificate")
    try:
        # cryptography parses the CA and subject keys only when asked: a
        # corrupt one must be refused here, not raise later in a check.
        cert.signature_key()
        cert.public_key()
    except Exception:
        raise CertificateInvalid("malformed certificate (its keys do not parse)")
    return cert


def _check_source_address(allowed: str, peer_address: str) -> None:
    try:
        peer = ipaddress.ip_address(peer_address.split("%")[0])
    except ValueError:
        raise AccessDenied("client address is not an IP address")
    if getattr(peer, "ipv4_mapped", None) is not None:
        peer = peer.ipv4_mapped
    for item in allowed.split(","):
        try:
            network = ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            raise CertificateInvalid("certificate has an invalid source-address")
        if peer in network:
            return
    raise AccessDenied(f"client address {peer_address} is not allowed by the certificate")


def verify_user_certificate(
    cert: ssh.SSHCertificate,
    *,
    trusted_ca_keys: Iterable,
    login: str,
    peer_address: str,
    now: float,
) -> VerifiedCertificate:
    """Check everything a user certificate must satisfy, except the session
    signature (see :class:`SSHCertificateChecker`).

    :param trusted_ca_keys: public keys (cryptography objects or OpenSSH
        lines) of the user CAs this server trusts.
    :param now: the current time in seconds since the epoch.
    :raises CertificateInvalid: bad signature, untrusted CA, wrong type,
        outside its validity period, an unknown critical option.
    :raises AccessDenied: ``login`` is not a principal, or the peer address
        is not allowed by ``source-address``.
    """
    if cert.type != ssh.SSHCertificateType.USER:
        raise CertificateInvalid("not a user certificate")
    ca_key = _openssh_public(cert.signature_key())
    if ca_key not in {_openssh_public(k) for k in trusted_ca_keys}:
        raise CertificateInvalid("certificate is not signed by a trusted user CA")
    try:
        cert.verify_cert_signature()
    except Exception:
        raise CertificateInvalid("certificate signature is invalid")
    if not cert.valid_after <= int(now):
        raise CertificateInvalid("certificate is not yet valid")
    if not int(now) < cert.valid_before:
        raise CertificateInvalid("certificate has expired")
    try:
        identity = user_identity_from_certificate(cert)
    except ValueError as e:
        raise CertificateInvalid(f"certificate is malformed: {e}")
    options = identity.critical_options
    unknown = sorted(set(options) - KNOWN_CRITICAL_OPTIONS)
    if unknown:
        raise CertificateInvalid(
            f"certificate has unsupported critical options: {', '.join(unknown)}"
        )
    if login not in identity.principals:
        raise AccessDenied(f"login {login} is not among the certificate's principals")
    if "source-address" in options:
        _check_source_address(options["source-address"], peer_address)
    return VerifiedCertificate(
        certificate=cert,
        identity=identity,
        login=login,
        peer_address=peer_address,
        force_command=options.get("force-command"),
    )


def verify_session_signature(
    cert: ssh.SSHCertificate, algorithm: bytes, signature: bytes, data: bytes
) -> None:
    """Check that ``signature`` over ``data`` was made with the certified key.

    :raises CertificateInvalid: wrong algorithm or bad signature.
    """
    try:
        sig_type = getNS(signature)[0]
    except Exception:
        raise CertificateInvalid("malformed session signature")
    if sig_type not in CERT_SIGNATURE_ALGORITHMS.get(algorithm, ()):
        raise CertificateInvalid("session signature algorithm does not match the key")
    try:
        valid = keys.Key(cert.public_key()).verify(signature, data)
    except Exception:
        valid = False
    if not valid:
        raise CertificateInvalid("session signature does not match the certified key")


@implementer(ICredentialsChecker)
class SSHCertificateChecker:
    """Checks :class:`ISSHCertificateCredentials`; the avatar id is a
    :class:`VerifiedCertificate`.

    A request without a signature (OpenSSH asks first whether a key would
    do) fails with ``ValidPublicKey`` when the certificate is acceptable.

    :param trusted_user_ca_keys: called on every check for the current
        list of trusted user CA public keys (CA rotation, trusted clusters).
    :param clock: the time source for validity checks.
    """

    credentialInterfaces = (ISSHCertificateCredentials,)

    def __init__(
        self, trusted_user_ca_keys: Callable[[], Iterable], clock: IReactorTime
    ) -> None:
        self._trusted = trusted_user_ca_keys
        self._clock = clock

    def requestAvatarId(self, credentials) -> Deferred[VerifiedCertificate]:
        """Verify ``credentials``; see the class docstring."""
        return maybeDeferred(self._check, credentials)

    def _check(self, credentials) -> VerifiedCertificate:
        cert = parse_certificate_blob(credentials.algorithm, credentials.blob)
        verified = verify_user_certificate(
            cert,
            trusted_ca_keys=self._trusted(),
            login=credentials.username,
            peer_address=credentials.peer_address,
            now=self._clock.seconds(),
        )
        if credentials.signature is None:
            raise conch_error.ValidPublicKey()
        verify_session_signature(
            cert, credentials.algorithm, credentials.signature, credentials.sig_data
        )
        return verified


@implementer(IRealm)
class CertificateRealm:
    """Asks the authorizer, then builds the avatar.

    :param avatar_factory: ``(VerifiedCertificate, SessionPermissions) ->``
        an ``IConchUser`` with a ``logout()`` method; it may raise
        :class:`AccessDenied` (e.g. a login unknown on this machine).
    """

    def __init__(
        self,
        authorizer: IAuthorizer,
        avatar_factory: Callable[[VerifiedCertificate, SessionPermissions], object],
    ) -> None:
        self._authorizer = authorizer
        self._avatar_factory = avatar_factory

    def requestAvatar(self, avatar_id, mind, *interfaces):
        """Return a Deferred firing with ``(IConchUser, avatar, logout)``."""
        if IConchUser not in interfaces or not isinstance(
            avatar_id, VerifiedCertificate
        ):
            return fail(NotImplementedError("only certificate-based Conch users"))
        d = self._authorizer.authorize(
            avatar_id.identity, avatar_id.login, avatar_id.peer_address
        )

        def build(permissions: SessionPermissions):
            avatar = self._avatar_factory(avatar_id, permissions)
            return IConchUser, avatar, avatar.logout

        return d.addCallback(build)


class CertificateUserAuthServer(userauth.SSHUserAuthServer):
    """``ssh-userauth`` accepting OpenSSH user certificates only.

    Reads from its factory: ``portal`` (as Conch does), and optionally
    ``clock`` (login timeout, session TTL) and ``observer``
    (:class:`ISessionObserver`). Refusals of a certificate are logged in one
    line, told to the observer, and shown to the client in a userauth banner.
    """

    interfaceToMethod = {ISSHCertificateCredentials: b"publickey"}
    #: OpenSSH's LoginGraceTime and MaxAuthTries (Conch: 10 hours and 20).
    loginTimeout = 120
    attemptsBeforeDisconnect = 6

    def serviceStarted(self) -> None:
        factory = self.transport.factory
        clock = getattr(factory, "clock", None)
        if clock is not None:
            self.clock = clock
        self._observer: ISessionObserver = (
            getattr(factory, "observer", None) or NullSessionObserver()
        )
        super().serviceStarted()

    def _peer_address(self) -> str:
        try:
            return str(self.transport.transport.getPeer().host)
        except AttributeError:
            return ""

    def _refuse(self, username: str | None, reason: str, banner: bool) -> Failure:
        login = self.user.decode("utf-8", "replace") if self.user else ""
        peer = self._peer_address()
        _log.warn(
            "refused SSH login: user={user} login={login} peer={peer}: {reason}",
            user=username or "-",
            login=login,
            peer=peer,
            reason=reason,
        )
        self._observer.auth_refused(username, login, peer, reason)
        if banner:
            message = f"edgeaccess: access denied: {reason}\r\n".encode("utf-8")
            self.transport.sendPacket(MSG_USERAUTH_BANNER, NS(message) + NS(b""))
        return Failure(UnauthorizedLogin(reason))

    def auth_publickey(self, packet: bytes) -> Deferred:
        """Certificate authentication; see the class docstring."""
        has_sig = packet[0:1] != b"\x00"
        try:
            algorithm, blob, rest = getNS(packet[1:], 2)
            signature = getNS(rest)[0] if has_sig else None
        except Exception:
            return fail(self._refuse(None, "malformed publickey request", False))
        if algorithm not in CERT_SIGNATURE_ALGORITHMS:
            return fail(
                self._refuse(
                    None,
                    f"{algorithm.decode('ascii', 'replace')} is not a certificate "
                    "algorithm: only OpenSSH user certificates are accepted",
                    False,
                )
            )
        sig_data = None
        if has_sig:
            sig_data = (
                NS(self.transport.sessionID)
                + bytes((userauth.MSG_USERAUTH_REQUEST,))
                + NS(self.user)
                + NS(self.nextService)
                + NS(b"publickey")
                + b"\x01"
                + NS(algorithm)
                + NS(blob)
            )
        credentials = CertificateCredentials(
            username=self.user.decode("utf-8", "replace"),
            algorithm=algorithm,
            blob=blob,
            sig_data=sig_data,
            signature=signature,
            peer_address=self._peer_address(),
        )
        d = self.portal.login(credentials, None, IConchUser)
        if not has_sig:
            d.addErrback(self._ebCheckKey, packet[1:])

        def refused(failure: Failure):
            if failure.check(EdgeError):
                return self._refuse(
                    _username_of(blob, algorithm), str(failure.value), True
                )
            if failure.check(
                conch_error.IgnoreAuthentication, conch_error.ValidPublicKey
            ):
                return failure
            _log.failure("certificate authentication failed", failure=failure)
            return self._refuse(_username_of(blob, algorithm), "internal error", False)

        return d.addErrback(refused)

    def _cbFinishedAuth(self, result) -> None:
        interface, avatar, logout = result
        ttl = getattr(getattr(avatar, "permissions", None), "session_ttl", None)
        if ttl is not None:
            expiry = self.clock.callLater(
                ttl.total_seconds(), self.transport.loseConnection
            )

            def logout_and_cancel() -> None:
                if expiry.active():
                    expiry.cancel()
                logout()

            result = (interface, avatar, logout_and_cancel)
        super()._cbFinishedAuth(result)


def _username_of(blob: bytes, algorithm: bytes) -> str | None:
    try:
        return parse_certificate_blob(algorithm, blob).key_id.decode("utf-8", "replace")
    except Exception:
        return None

