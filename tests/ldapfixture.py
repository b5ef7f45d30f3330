"""A real OpenLDAP ``slapd`` for tests, on 127.0.0.1 with ephemeral ports.

Usage::

    pki = make_server_pki(tmp_path / "pki")
    with SlapdServer(tmp_path / "slapd", tls=pki) as slapd:
        slapd.ldap_url   # ldap://127.0.0.1:PORT (StartTLS capable when tls given)
        slapd.ldaps_url  # ldaps://127.0.0.1:PORT (only when tls given)

The server gets its own ``slapd.conf`` (mdb backend) and is loaded with
``slapadd`` from an LDIF (by default ``tests/data/ldap/directory.ldif``, whose
accounts are described by the constants below) before it starts.  ``start``
waits until slapd answers a bind, with a deadline; ``stop`` kills it.  Test
certificates are generated with ``cryptography`` at test time.

Requires the Debian packages ``slapd`` and ``ldap-utils``; :func:`slapd_available`
tells whether they are installed.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import attrs
import ldap3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeaccess.devcluster import stop_process

DATA_DIR = Path(__file__).parent / "data" / "ldap"
DEFAULT_LDIF = DATA_DIR / "directory.ldif"

SUFFIX = "dc=example,dc=com"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PASSWORD = "root-secret"

# Accounts of DEFAULT_LDIF.
SERVICE_DN = f"cn=edge,ou=services,{SUFFIX}"
SERVICE_PASSWORD = "service-secret"
PEOPLE_DN = f"ou=people,{SUFFIX}"
GROUPS_DN = f"ou=groups,{SUFFIX}"
PASSWORDS = {
    "alice": "alice-password",
    "bob": "bob-password",
    "carol": "carol-password",
    "eve": "eve-password",
    "twin": "twin-password",
}
ALICE_DN = f"uid=alice,{PEOPLE_DN}"
EVE_DN = f"cn=Eve (QA)\\, Berlin,ou=berlin,{PEOPLE_DN}"

_SCHEMA_DIRS = (Path("/etc/ldap/schema"), Path("/etc/openldap/schema"))
_MODULE_DIRS = (Path("/usr/lib/ldap"), Path("/usr/lib/openldap"), Path("/usr/lib64/openldap"))
_SLAPD_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/libexec")


def _find_program(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in _SLAPD_DIRS:
        candidate = Path(directory) / name
        if candidate.exists():
            return str(candidate)
    return None


def slapd_available() -> bool:
    """True when slapd, slapadd and the schema files are installed."""
    return (
        _find_program("slapd") is not None
        and _find_program("slapadd") is not None
        and any((d / "inetorgperson.schema").exists() for d in _SCHEMA_DIRS)
    )


def free_port() -> int:
    """An ephemeral TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- test certificates -----------------------------------------------------


@attrs.frozen
class TestCA:
    """A throw-away certificate authority."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_file: Path


@attrs.frozen
class ServerPKI:
    """Files for a TLS-enabled slapd: its CA, certificate and key."""

    ca: TestCA
    cert_file: Path
    key_file: Path

    @property
    def ca_file(self) -> Path:
        """PEM file of the CA that signed the server certificate."""
        return self.ca.cert_file


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def make_test_ca(directory: Path, name: str = "edgeaccess test CA") -> TestCA:
    """Generate a CA key and self-signed certificate; write ``ca.pem``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file = directory / "ca.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return TestCA(cert=cert, key=key, cert_file=cert_file)


def make_server_pki(
    directory: Path, names: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> ServerPKI:
    """Generate a CA and a server certificate for ``names`` (IPs or DNS names)."""
    ca = make_test_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    cert_file = directory / "server.pem"
    key_file = directory / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return ServerPKI(ca=ca, cert_file=cert_file, key_file=key_file)


# --- slapd -----------------------------------------------------------------


class SlapdError(RuntimeError):
    """slapd could not be prepared or started."""


class SlapdServer:
    """A private slapd process serving one mdb database on 127.0.0.1.

    :param workdir: an empty (or missing) directory for config, data and logs.
    :param ldif: loaded with slapadd before the first start.
    :param tls: when given, ``ldap_url`` accepts StartTLS and ``ldaps_url``
        serves TLS from the first byte.
    """

    def __init__(
        self,
        workdir: Path,
        ldif: Path = DEFAULT_LDIF,
        tls: ServerPKI | None = None,
        suffix: str = SUFFIX,
        root_dn: str = ROOT_DN,
        root_password: str = ROOT_PASSWORD,
    ) -> None:
        self.workdir = Path(workdir)
        self.ldif = Path(ldif)
        self.tls = tls
        self.suffix = suffix
        self.root_dn = root_dn
        self.root_password = root_password
        self.port: int | None = None
        self.ldaps_port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._loaded = False

    @property
    def ldap_url(self) -> str:
        """``ldap://127.0.0.1:PORT`` of the running server."""
        if self.port is None:
            raise SlapdError("slapd is not started")
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        """``ldaps://127.0.0.1:PORT`` of the running server (TLS only)."""
        if self.ldaps_port is None:
            raise SlapdError("slapd has no ldaps listener (start it with tls)")
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    @property
    def config_file(self) -> Path:
        """The generated slapd.conf."""
        return self.workdir / "slapd.conf"

    def _write_config(self) -> None:
        schema_dir = next((d for d in _SCHEMA_DIRS if d.exists()), _SCHEMA_DIRS[0])
        module_dir = next((d for d in _MODULE_DIRS if (d / "back_mdb.so").exists()), None)
        data_dir = self.workdir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"include {schema_dir}/core.schema",
            f"include {schema_dir}/cosine.schema",
            f"include {schema_dir}/inetorgperson.schema",
            f"include {schema_dir}/nis.schema",
            f"pidfile {self.workdir}/slapd.pid",
            f"argsfile {self.workdir}/slapd.args",
        ]
        if module_dir is not None:  # else back_mdb is built in
            lines += [f"modulepath {module_dir}", "moduleload back_mdb"]
        if self.tls is not None:
            lines += [
                f"TLSCACertificateFile {self.tls.ca_file}",
                f"TLSCertificateFile {self.tls.cert_file}",
                f"TLSCertificateKeyFile {self.tls.key_file}",
            ]
        lines += [
            "database mdb",
            "maxsize 16777216",
            f'suffix "{self.suffix}"',
            f'rootdn "{self.root_dn}"',
            f"rootpw {self.root_password}",
            f"directory {data_dir}",
            # Passwords are only usable to bind; nothing is readable without
            # a bind, so the login code must use its service account.
            "access to attrs=userPassword",
            "    by anonymous auth",
            "    by * none",
            "access to *",
            "    by users read",
            "    by * none",
        ]
        self.config_file.write_text("\n".join(lines) + "\n")

    def _load(self) -> None:
        slapadd = _find_program("slapadd")
        if slapadd is None:
            raise SlapdError("slapadd is not installed (Debian package slapd)")
        result = subprocess.run(
            [slapadd, "-q", "-f", str(self.config_file), "-l", str(self.ldif)],
            capture_output=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise SlapdError(
                f"slapadd failed ({result.returncode}): {result.stderr.decode(errors='replace')}"
            )
        self._loaded = True

    def start(self, timeout: float = 20.0) -> None:
        """Configure, load and start slapd; return once it answers a bind.

        :raises SlapdError: when slapd exits or does not answer in time.
        """
        slapd = _find_program("slapd")
        if slapd is None:
            raise SlapdError("slapd is not installed (Debian package slapd)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self._loaded:
            self._write_config()
            self._load()
        deadline = time.monotonic() + timeout
        last_error = ""
        # A port found free can be taken before slapd binds it: try again.
        for _attempt in range(3):
            self.port = free_port()
            self.ldaps_port = free_port() if self.tls is not None else None
            urls = f"ldap://127.0.0.1:{self.port}/"
            if self.ldaps_port is not None:
                urls += f" ldaps://127.0.0.1:{self.ldaps_port}/"
            log = open(self.workdir / "slapd.log", "ab")
            try:
                # -d keeps slapd in the foreground (and writes its log to stderr).
                self._process = subprocess.Popen(
                    [slapd, "-f", str(self.config_file), "-h", urls, "-d", "stats"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            finally:
                log.close()
            last_error = self._wait_until_answering(deadline)
            if not last_error:
                return
            self.stop()
            if time.monotonic() >= deadline:
                break
        self.port = self.ldaps_port = None
        raise SlapdError(f"slapd did not start: {last_error}; log: {self.log_tail()}")

    def _wait_until_answering(self, deadline: float) -> str:
        """Poll with a root bind until it succeeds; return '' or the last error."""
        last_error = "no answer"
        delay = 0.01
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                return f"slapd exited with status {self._process.returncode}"
            try:
                server = ldap3.Server("127.0.0.1", port=self.port, get_info=ldap3.NONE, connect_timeout=1)
                conn = ldap3.Connection(
                    server, self.root_dn, self.root_password, receive_timeout=2
                )
                try:
                    if conn.bind():
                        return ""
                    last_error = f"bind refused: {conn.result}"
                finally:
                    conn.unbind()
            except ldap3.core.exceptions.LDAPException as e:
                last_error = str(e)
            time.sleep(delay)  # poll interval while waiting on the condition
            delay = min(delay * 2, 0.2)
        return f"timed out ({last_error})"

    def log_tail(self, size: int = 2000) -> str:
        """The end of slapd's log, for error messages."""
        try:
            return (self.workdir / "slapd.log").read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Kill slapd (TERM, then KILL after 5 s) and reap it."""
        process, self._process = self._process, None
        stop_process(process, timeout=5)

    @property
    def pid(self) -> int | None:
        """Process id of the running slapd, if any."""
        return self._process.pid if self._process is not None else None

    def __enter__(self) -> "SlapdServer":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def running_under_ci() -> bool:
    """True on CI, where a missing slapd is a failure rather than a skip."""
    return os.environ.get("CI") == "true"
