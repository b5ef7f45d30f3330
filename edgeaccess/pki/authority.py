"""The cluster's certificate authorities.

The proxy keeps them in the backend, shared by every proxy of the cluster
(``edgeaccess.pki.castore``). :meth:`CertificateAuthority.load_or_create`
is the older layout, files under ``DATA_DIR/ca`` (private keys mode
0600): still read, to import a data directory written before. Only the
auth service holds these keys.

Beside the three CAs of the contract sits the *web CA* (ECDSA P-256): it
signs only the web port's certificate, so that browsers, which verify no
Ed25519 signature, can verify it (see
:func:`edgeaccess.pki.x509ca.create_web_ca`). A set from before it gets
one at its next start.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import attrs
from cryptography import x509
from twisted.logger import Logger

from edgeaccess.pki import keys, sshca, x509ca

_log = Logger()


@attrs.define
class CertificateAuthority:
    """The three CAs of one cluster (SSH user, SSH host and X.509), and the
    web CA (``None`` in authorities built without one: the web port then
    uses the X.509 CA)."""

    cluster_name: str
    ssh_user_ca: object
    ssh_host_ca: object
    tls_ca_key: object
    tls_ca_cert: x509.Certificate
    web_ca_key: object = None
    web_ca_cert: x509.Certificate | None = None
    _web_ca_link: x509.Certificate | None = attrs.field(default=None, init=False, repr=False)

    # --- loading -----------------------------------------------------------

    @classmethod
    def pending(cls, cluster_name: str) -> "CertificateAuthority":
        """A CA set to be filled in at start (:meth:`adopt`) from the backend.

        Built before the reactor runs, so the services holding it are
        composed at once; nothing signs before the proxy's start-up has
        loaded the CAs (its listeners wait for that).
        """
        return cls(cluster_name, None, None, None, None)

    @property
    def loaded(self) -> bool:
        return self.tls_ca_cert is not None

    def adopt(self, other: "CertificateAuthority") -> None:
        """Take the keys of ``other`` (the set loaded from the backend)."""
        if other.cluster_name != self.cluster_name:
            raise ValueError(f"CAs of cluster {other.cluster_name!r}, not {self.cluster_name!r}")
        self.ssh_user_ca = other.ssh_user_ca
        self.ssh_host_ca = other.ssh_host_ca
        self.tls_ca_key = other.tls_ca_key
        self.tls_ca_cert = other.tls_ca_cert
        self.web_ca_key = other.web_ca_key
        self.web_ca_cert = other.web_ca_cert
        self._web_ca_link = None

    @classmethod
    def load_or_create(cls, directory: Path, cluster_name: str, now: datetime):
        """Load the CAs from ``directory``, creating them on first use.

        Refuses to start when the directory holds another cluster's CAs.
        """
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        name_file = directory / "cluster_name"
        if name_file.exists():
            existing = name_file.read_text().strip()
            if existing != cluster_name:
                raise ValueError(
                    f"{directory} holds the CAs of cluster {existing!r}, "
                    f"not {cluster_name!r}"
                )
            ca = cls(
                cluster_name=cluster_name,
                ssh_user_ca=keys.load_private_key((directory / "ssh_user_ca").read_bytes()),
                ssh_host_ca=keys.load_private_key((directory / "ssh_host_ca").read_bytes()),
                tls_ca_key=keys.load_private_key((directory / "tls_ca.key").read_bytes()),
                tls_ca_cert=x509ca.load_certificate_pem(
                    (directory / "tls_ca.crt").read_bytes()
                ),
            )
            ca.web_ca_key, ca.web_ca_cert = _load_or_create_web_ca(directory, ca.tls_ca_cert, now)
            _log.info("loaded certificate authorities of cluster {cluster}", cluster=cluster_name)
            return ca
        user_ca = keys.generate_private_key()
        host_ca = keys.generate_private_key()
        tls_key, tls_cert = x509ca.create_ca(cluster_name, now)
        keys.write_secret(directory / "ssh_user_ca", keys.private_key_openssh(user_ca))
        keys.write_public(directory / "ssh_user_ca.pub", keys.public_key_openssh(user_ca) + b"\n")
        keys.write_secret(directory / "ssh_host_ca", keys.private_key_openssh(host_ca))
        keys.write_public(directory / "ssh_host_ca.pub", keys.public_key_openssh(host_ca) + b"\n")
        keys.write_secret(directory / "tls_ca.key", keys.private_key_pem(tls_key))
        keys.write_public(directory / "tls_ca.crt", x509ca.certificate_pem(tls_cert))
        web_key, web_cert = _load_or_create_web_ca(directory, tls_cert, now)
        # Written last: its presence means the set is complete.
        keys.write_public(name_file, cluster_name.encode() + b"\n")
        _log.info("created certificate authorities of cluster {cluster}", cluster=cluster_name)
        return cls(cluster_name, user_ca, host_ca, tls_key, tls_cert, web_key, web_cert)

    # --- public parts ------------------------------------------------------

    @property
    def pin(self) -> str:
        return x509ca.ca_pin(self.tls_ca_cert)

    @property
    def user_ca_public_line(self) -> str:
        return keys.public_key_openssh(self.ssh_user_ca).decode()

    @property
    def host_ca_public_line(self) -> str:
        return keys.public_key_openssh(self.ssh_host_ca).decode()

    @property
    def tls_ca_pem(self) -> str:
        return x509ca.certificate_pem(self.tls_ca_cert).decode()

    @property
    def web_ca_pem(self) -> str | None:
        """The web CA certificate operators install in browsers."""
        return None if self.web_ca_cert is None else x509ca.certificate_pem(
            self.web_ca_cert).decode()

    @property
    def web_ca_link(self) -> x509.Certificate | None:
        """The web CA certified by the X.509 CA (:func:`x509ca.link_web_ca`)."""
        if self.web_ca_cert is None:
            return None
        if self._web_ca_link is None:
            self._web_ca_link = x509ca.link_web_ca(self.tls_ca_key, self.tls_ca_cert,
                                                   self.web_ca_cert)
        return self._web_ca_link

    def fingerprints(self) -> dict[str, str]:
        found = {
            "ssh_user_ca": keys.ssh_fingerprint(self.ssh_user_ca.public_key()),
            "ssh_host_ca": keys.ssh_fingerprint(self.ssh_host_ca.public_key()),
            "tls_ca": x509ca.fingerprint(self.tls_ca_cert),
        }
        if self.web_ca_cert is not None:
            found["web_ca"] = x509ca.fingerprint(self.web_ca_cert)
        return found

    # --- signing -----------------------------------------------------------

    def sign_tls(self, public_key, identity: x509ca.Identity, *, now, ttl,
                 dns_names=(), ip_addresses=()) -> x509.Certificate:
        return x509ca.issue_identity_certificate(
            self.tls_ca_key, self.tls_ca_cert, public_key, identity,
            now=now, ttl=ttl, dns_names=dns_names, ip_addresses=ip_addresses,
        )

    def sign_web(self, public_key, identity: x509ca.Identity, *, now, ttl,
                 dns_names=(), ip_addresses=()) -> tuple[x509.Certificate, list]:
        """The web port's certificate and the chain to send after it: signed
        by the web CA, followed by its link to the X.509 CA (without a web
        CA: by the X.509 CA, as every other port's)."""
        if self.web_ca_cert is None:
            return self.sign_tls(public_key, identity, now=now, ttl=ttl, dns_names=dns_names,
                                 ip_addresses=ip_addresses), [self.tls_ca_cert]
        cert = x509ca.issue_identity_certificate(
            self.web_ca_key, self.web_ca_cert, public_key, identity,
            now=now, ttl=ttl, dns_names=dns_names, ip_addresses=ip_addresses,
        )
        return cert, [self.web_ca_link]

    def sign_host(self, public_key, *, host_id: str, principals, now: datetime,
                  ttl: timedelta):
        return sshca.issue_host_certificate(
            self.ssh_host_ca, public_key, host_id=host_id, principals=principals,
            now=now, ttl=ttl,
        )

    def sign_user(self, public_key, **kwargs):
        return sshca.issue_user_certificate(self.ssh_user_ca, public_key, **kwargs)


def _load_or_create_web_ca(directory: Path, tls_ca_cert: x509.Certificate, now: datetime):
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key_file, cert_file = directory / "web_ca.key", directory / "web_ca.crt"
    if cert_file.exists():
        key = load_pem_private_key(key_file.read_bytes(), password=None)
        cert = x509ca.load_certificate_pem(cert_file.read_bytes())
        if cert.subject != tls_ca_cert.subject:
            raise ValueError(f"{cert_file} is not the web CA of {directory}'s X.509 CA")
        return key, cert
    key, cert = x509ca.create_web_ca(tls_ca_cert, now)
    keys.write_secret(key_file, keys.private_key_pem(key))
    # Written after the key: its presence means the pair is complete.
    keys.write_public(cert_file, x509ca.certificate_pem(cert))
    _log.info("created the web CA ({fingerprint})", fingerprint=x509ca.fingerprint(cert))
    return key, cert
