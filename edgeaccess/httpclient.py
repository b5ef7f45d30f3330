"""A small blocking HTTPS client for the cluster's APIs.

Used by the command-line clients ``edge`` and ``edgectl`` (the daemons use
:mod:`edgeaccess.clusterclient`). Trust is the cluster CA, learnt either
from a CA pin (the CA is fetched once, its SubjectPublicKeyInfo hash
compared with the pin, and from then on every connection must chain to it)
or from files kept after a first pinned contact; and the server must be a
proxy of that cluster named by the address dialled
(:func:`edgeaccess.pki.x509ca.check_server_certificate`).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import socket
import ssl
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography import x509

from edgeaccess import errors
from edgeaccess.pki import x509ca

DEFAULT_TIMEOUT = 15.0


def split_addr(addr: str, default_port: int) -> tuple[str, int]:
    """``"host:port"``, ``"host"``, ``"[::1]:3080"`` -> ``(host, port)``."""
    addr = addr.strip()
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif addr.count(":") == 1:
        host, port = addr.split(":")
    else:
        host, port = addr, ""
    if not host:
        raise errors.BadRequest(f"invalid address {addr!r}")
    try:
        return host, int(port) if port else default_port
    except ValueError:
        raise errors.BadRequest(f"invalid port in address {addr!r}")


def is_ip(host: str) -> bool:
    """Whether ``host`` is an IP address (not a name)."""
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def pin_of_pem(pem: str | bytes) -> str:
    if isinstance(pem, str):
        pem = pem.encode()
    cert = x509.load_pem_x509_certificate(pem)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(spki).hexdigest()


class _CheckedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection that, right after its handshake and before any
    byte of the request, checks that the server is the one expected."""

    def __init__(self, host, port, *, expected: "x509ca.ExpectedServer | None", **kwargs) -> None:
        super().__init__(host, port, **kwargs)
        self._expected = expected

    def connect(self) -> None:
        super().connect()
        if self._expected is None:
            return
        der = self.sock.getpeercert(binary_form=True)
        try:
            if der is None:
                raise x509ca.ServerMismatch("it presented no certificate")
            x509ca.check_server_certificate(x509.load_der_x509_certificate(der), self._expected)
        except x509ca.ServerMismatch as e:
            self.close()
            raise errors.CertificateInvalid(
                f"refused the server at {self.host}:{self.port}: {e}")


class Client:
    """JSON over HTTPS to one ``host:port``.

    :param ca_pem: the cluster CA certificates (PEM text); the server must
        chain to them and be a proxy of ``cluster`` whose certificate names
        the host dialled (:func:`edgeaccess.pki.x509ca.check_server_certificate`,
        the check every client of the cluster makes).
    :param cluster: the cluster expected; by default the cluster of the
        first CA certificate.
    :param insecure: accept any server certificate (``--insecure``).
    :param cert_file, key_file: our client certificate (mutual TLS).
    With neither ``ca_pem`` nor ``insecure`` the system trust store and
    host name checks apply.
    """

    def __init__(self, addr: str, *, default_port: int = 3080, ca_pem: str | None = None,
                 cluster: str | None = None, insecure: bool = False,
                 cert_file: str | None = None, key_file: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.host, self.port = split_addr(addr, default_port)
        self.timeout = timeout
        self.expected = None
        if insecure:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif ca_pem:
            ca_text = ca_pem if isinstance(ca_pem, str) else ca_pem.decode()
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            # The name is checked with the rest of the identity (one function
            # for every client), right after the handshake.
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cadata=ca_text)
            if cluster is None:
                cluster = x509ca.ca_cluster_name(
                    x509.load_pem_x509_certificate(ca_text.encode()))
            self.expected = x509ca.ExpectedServer(cluster=cluster, host=self.host)
        else:
            ctx = ssl.create_default_context()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        if cert_file and key_file:
            ctx.load_cert_chain(cert_file, key_file)
        self.context = ctx

    def request(self, method: str, path: str, body=None):
        """Send ``body`` as JSON; return the decoded JSON answer.

        Errors come back as :mod:`edgeaccess.errors` exceptions with the
        server's message; network failures as ``EdgeError`` saying so.
        """
        conn = _CheckedHTTPSConnection(self.host, self.port, expected=self.expected,
                                       timeout=self.timeout, context=self.context)
        payload = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"content-type": "application/json"} if payload is not None else {}
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except ssl.SSLCertVerificationError as e:
            raise errors.CertificateInvalid(
                f"the server at {self.host}:{self.port} presented a certificate that "
                f"does not verify ({e.verify_message}); use --ca-pin or --insecure")
        except ssl.SSLError as e:
            raise errors.EdgeError(f"TLS error talking to {self.host}:{self.port}: {e.reason}")
        except (ConnectionError, socket.timeout, OSError) as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise errors.EdgeError(f"cannot reach {self.host}:{self.port}: {reason}")
        finally:
            conn.close()
        try:
            decoded = json.loads(data) if data else None
        except ValueError:
            if response.status == 404:
                raise errors.NotFound(f"{self.host}:{self.port} has no {path}")
            raise errors.EdgeError(
                f"{self.host}:{self.port} answered {response.status} with a non-JSON body")
        if response.status >= 400:
            err = (decoded or {}).get("error") if isinstance(decoded, dict) else None
            if isinstance(err, dict):
                raise errors.error_from_code(str(err.get("code")), str(err.get("message")))
            raise errors.EdgeError(f"{self.host}:{self.port} answered {response.status}")
        return decoded

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, body):
        return self.request("POST", path, body)


def fetch_pinned_ca(addr: str, pin: str, *, default_port: int = 3080,
                    path: str = "/v1/cluster/ca", timeout: float = DEFAULT_TIMEOUT) -> str:
    """Fetch the cluster CA from ``addr`` and check it against ``pin``.

    The first request cannot verify the server (we do not know the CA yet);
    what makes it safe is that only a CA with the pinned key is accepted,
    and every later connection must chain to that CA and be a proxy of its
    cluster (:class:`Client` with ``ca_pem``).
    """
    check_pin_syntax(pin)
    answer = Client(addr, default_port=default_port, insecure=True, timeout=timeout).get(path)
    return pinned_ca_from_answer(answer, pin, addr)


def check_pin_syntax(pin) -> None:
    if not isinstance(pin, str) or not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", pin):
        raise errors.BadRequest("a CA pin looks like sha256:<64 hex digits>")


def pinned_ca_from_answer(answer, pin: str, addr: str) -> str:
    """The CA of a ``/v1/cluster/ca`` answer whose key matches ``pin``."""
    check_pin_syntax(pin)
    pems = answer.get("tls_ca") if isinstance(answer, dict) else None
    if not isinstance(pems, list) or not pems:
        raise errors.EdgeError(f"{addr} did not send its CA certificate")
    for pem in pems:
        try:
            if isinstance(pem, str) and pin_of_pem(pem) == pin.lower():
                return pem
        except ValueError:
            continue
    raise errors.CertificateInvalid(
        f"the cluster CA at {addr} does not match the pin {pin} (possible impersonation)")


def write_temp_pair(key_pem: bytes, cert_pem: bytes) -> tuple[str, str]:
    """Write a key and certificate to private temp files (for ssl contexts)."""
    directory = Path(tempfile.mkdtemp(prefix="edge-tls-"))
    key = directory / "key.pem"
    cert = directory / "cert.pem"
    key.touch(0o600)
    key.write_bytes(key_pem)
    cert.write_bytes(cert_pem)
    return str(cert), str(key)
