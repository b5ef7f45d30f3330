"""The cluster's certificate authorities in the backend, shared by every proxy.

Every proxy of a cluster started on the same backend uses one set of CAs.
They live in one backend item, ``/authorities/cluster``::

    {"version": 1, "cluster": NAME, "key_id": "sha256:...",
     "cas": {"ssh_user": {"public": LINE, "private": SEALED},
             "ssh_host": {"public": LINE, "private": SEALED},
             "tls":      {"public": CERT_PEM, "private": SEALED}}}

``SEALED`` is ``{"nonce": B64, "ciphertext": B64}``: the private key
sealed with AES-256-GCM under the cluster's *CA key* (a 32-byte secret
every proxy is given: ``--ca-key-file FILE``, else the environment
variable ``EDGE_CA_KEY``, else ``DATA_DIR/ca.key``, created by the first
start). The associated data names the cluster and the CA, so a sealed key
cannot be moved to another slot. ``key_id`` (a hash of the secret) tells a
proxy given another secret that it has the wrong one, before any
decryption.

The first start creates the set with one ``create()``: that is the lock.
Two proxies starting together on an empty database both try; exactly one
wins, the other loads the winner's set (and fails with a clear error when
its secret differs, never with a second CA set). A later kind of CA is one
more entry of :data:`CA_KINDS`: a set that lacks it gets it added with
``compare_and_swap``.

The files of a data directory written before CAs were kept in the backend
(``DATA_DIR/ca/``) are imported into an empty backend on the first start
(the upgrade path of a single proxy); they are not read afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from datetime import datetime
from pathlib import Path
from typing import Callable, Mapping

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.logger import Logger

from edgeaccess import errors
from edgeaccess.backend.interfaces import CompareFailed
from edgeaccess.pki import keys, x509ca
from edgeaccess.pki.authority import CertificateAuthority

_log = Logger()

#: The backend item holding the cluster's CA set.
AUTHORITIES_KEY = "/authorities/cluster"
#: Environment variable holding the CA key (base64 of 32 bytes).
CA_KEY_ENV = "EDGE_CA_KEY"
#: The CA key's default file, in the data directory.
DEFAULT_KEY_FILE = "ca.key"
RECORD_VERSION = 1
_KEY_BYTES = 32
_NONCE_BYTES = 12


class CAKeyError(errors.EdgeError):
    """the cluster's CA key is missing or wrong"""

    code = "ca_key"


class CASetError(errors.EdgeError):
    """the cluster's CA set in the backend cannot be used"""

    code = "ca_set"


# --- the CA key ----------------------------------------------------------------


def parse_ca_key(text: str | bytes, where: str) -> bytes:
    """The 32-byte CA key written as base64 (one line) in ``where``."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    try:
        key = base64.b64decode(text.strip(), altchars=b"-_", validate=True)
    except ValueError:
        key = b""
    if len(key) != _KEY_BYTES:
        raise CAKeyError(f"{where} is not a CA key (expected base64 of {_KEY_BYTES} random "
                         f"bytes, e.g. from: head -c 32 /dev/urandom | base64)")
    return key


def format_ca_key(key: bytes) -> bytes:
    return base64.b64encode(key) + b"\n"


def key_id(key: bytes) -> str:
    """A public name of the CA key (safe to store and log)."""
    return "sha256:" + hashlib.sha256(b"edgeaccess ca key id\0" + key).hexdigest()[:32]


@attrs.define
class CAKeySource:
    """Where this proxy's CA key comes from, read before the reactor runs.

    :ivar key: the key, or ``None`` when there is none yet.
    :ivar where: what to name in messages (a file, the environment).
    :ivar new_file: the file to create the key in on a first start (the
        data directory's default; ``None`` when the operator named the key).
    """

    key: bytes | None
    where: str
    new_file: Path | None = None

    @classmethod
    def from_options(cls, key_file: str | None, environ: Mapping[str, str],
                     data_dir: Path) -> "CAKeySource":
        """``--ca-key-file``, else ``$EDGE_CA_KEY``, else ``DATA_DIR/ca.key``."""
        if key_file:
            path = Path(key_file)
            try:
                text = path.read_text()
            except OSError as error:
                raise CAKeyError(f"cannot read the CA key file {path}: {error.strerror}")
            return cls(parse_ca_key(text, f"the CA key file {path}"), f"the CA key file {path}")
        if environ.get(CA_KEY_ENV):
            return cls(parse_ca_key(environ[CA_KEY_ENV], f"${CA_KEY_ENV}"), f"${CA_KEY_ENV}")
        path = data_dir / DEFAULT_KEY_FILE
        if path.exists():
            return cls(parse_ca_key(path.read_bytes(), f"the CA key file {path}"),
                       f"the CA key file {path}")
        return cls(None, f"the CA key file {path}", new_file=path)


# --- sealing -------------------------------------------------------------------


def _associated_data(cluster: str, name: str) -> bytes:
    return f"edgeaccess ca {cluster} {name}".encode()


def seal(key: bytes, cluster: str, name: str, plaintext: bytes) -> dict:
    nonce = os.urandom(_NONCE_BYTES)
    sealed = AESGCM(key).encrypt(nonce, plaintext, _associated_data(cluster, name))
    return {"nonce": base64.b64encode(nonce).decode(),
            "ciphertext": base64.b64encode(sealed).decode()}


def unseal(key: bytes, cluster: str, name: str, sealed: dict) -> bytes:
    try:
        nonce = base64.b64decode(sealed["nonce"], validate=True)
        ciphertext = base64.b64decode(sealed["ciphertext"], validate=True)
        return AESGCM(key).decrypt(nonce, ciphertext, _associated_data(cluster, name))
    except InvalidTag:
        raise CASetError(f"the {name} CA in the backend does not decrypt with the CA key "
                         f"(altered, or sealed for another cluster)")
    except (KeyError, TypeError, ValueError):
        raise CASetError(f"the {name} CA in the backend is malformed")


# --- kinds of CA -----------------------------------------------------------------


@attrs.frozen
class CAKind:
    """How one named CA is made and stored.

    :ivar generate: ``(cluster, now, entries) -> (private_key, public_text)``;
        ``entries`` are the CAs made or loaded so far, ``name -> (private_key,
        public_text)`` (the web CA is made from the X.509 CA).
    :ivar private_bytes: the private key's stored (then sealed) form.
    :ivar load: ``(private_bytes, public_text) -> (private_key, public_object)``.
    """

    generate: Callable[[str, datetime, Mapping], tuple[object, str]]
    private_bytes: Callable[[object], bytes]
    load: Callable[[bytes, str], tuple[object, object]]


def _ssh_generate(cluster: str, now: datetime, entries: Mapping) -> tuple[object, str]:
    key = keys.generate_private_key()
    return key, keys.public_key_openssh(key).decode()


def _ssh_load(private: bytes, public: str) -> tuple[object, object]:
    key = keys.load_private_key(private)
    if keys.public_key_openssh(key).decode() != public.strip():
        raise CASetError("an SSH CA's private key does not match its public key")
    return key, public


def _tls_generate(cluster: str, now: datetime, entries: Mapping) -> tuple[object, str]:
    key, cert = x509ca.create_ca(cluster, now)
    return key, x509ca.certificate_pem(cert).decode()


def _tls_load(private: bytes, public: str) -> tuple[object, object]:
    key = keys.load_private_key(private)
    cert = x509ca.load_certificate_pem(public.encode())
    if keys.public_key_openssh(cert.public_key()) != keys.public_key_openssh(key):
        raise CASetError("the X.509 CA's private key does not match its certificate")
    return key, cert


def _web_generate(cluster: str, now: datetime, entries: Mapping) -> tuple[object, str]:
    tls_cert = x509ca.load_certificate_pem(entries["tls"][1].encode())
    key, cert = x509ca.create_web_ca(tls_cert, now)
    return key, x509ca.certificate_pem(cert).decode()


#: Every CA of a cluster, by name, in the order they are made (the web CA
#: after the X.509 CA it is made from). One more CA is one more entry here
#: (and a field of CertificateAuthority): sets without it get it on the next
#: start.
CA_KINDS: dict[str, CAKind] = {
    "ssh_user": CAKind(_ssh_generate, keys.private_key_openssh, _ssh_load),
    "ssh_host": CAKind(_ssh_generate, keys.private_key_openssh, _ssh_load),
    "tls": CAKind(_tls_generate, keys.private_key_pem, _tls_load),
    "web": CAKind(_web_generate, keys.private_key_pem, _tls_load),
}


def _authority_from(cluster: str, loaded: Mapping[str, tuple[object, object]]) -> CertificateAuthority:
    authority = CertificateAuthority(
        cluster_name=cluster,
        ssh_user_ca=loaded["ssh_user"][0],
        ssh_host_ca=loaded["ssh_host"][0],
        tls_ca_key=loaded["tls"][0],
        tls_ca_cert=loaded["tls"][1],
    )
    if "web" in loaded:
        authority.web_ca_key, authority.web_ca_cert = loaded["web"]
        if authority.web_ca_cert.subject != authority.tls_ca_cert.subject:
            raise CASetError("the web CA in the backend is not the web CA of its X.509 CA")
    return authority


def _entries_of(authority: CertificateAuthority) -> dict[str, tuple[object, str]]:
    """``name -> (private_key, public_text)`` of an authority read from files."""
    entries = {
        "ssh_user": (authority.ssh_user_ca, authority.user_ca_public_line),
        "ssh_host": (authority.ssh_host_ca, authority.host_ca_public_line),
        "tls": (authority.tls_ca_key, authority.tls_ca_pem),
    }
    if authority.web_ca_cert is not None:
        entries["web"] = (authority.web_ca_key, authority.web_ca_pem)
    return entries


def _complete(cluster: str, now: datetime, entries: dict) -> dict:
    """``entries`` with every kind of CA it lacks made, in order."""
    made = {}
    for name, kind in CA_KINDS.items():
        if name not in entries and name not in made:
            made[name] = kind.generate(cluster, now, {**entries, **made})
    return made


# --- the record ------------------------------------------------------------------


def _encode(cluster: str, key: bytes, entries: Mapping[str, tuple[object, str]]) -> bytes:
    cas = {name: {"public": public,
                  "private": seal(key, cluster, name, CA_KINDS[name].private_bytes(private))}
           for name, (private, public) in sorted(entries.items())}
    record = {"version": RECORD_VERSION, "cluster": cluster, "key_id": key_id(key), "cas": cas}
    return json.dumps(record, sort_keys=True).encode()


def _decode(value: bytes, cluster: str) -> dict:
    try:
        record = json.loads(value)
        if not isinstance(record, dict) or not isinstance(record.get("cas"), dict):
            raise ValueError("not a CA set")
    except ValueError:
        raise CASetError(f"{AUTHORITIES_KEY} in the backend is not a CA set")
    if record.get("version") != RECORD_VERSION:
        raise CASetError(f"the CA set in the backend has version {record.get('version')!r}; "
                         f"this edgeaccess reads version {RECORD_VERSION}")
    if record.get("cluster") != cluster:
        raise CASetError(f"the backend holds the CAs of cluster {record.get('cluster')!r}, "
                         f"not {cluster!r} (each cluster needs its own database)")
    return record


def _check_key(record: dict, source: CAKeySource) -> bytes:
    stored = record.get("key_id")
    if source.key is None:
        raise CAKeyError(
            f"the backend holds the CAs of cluster {record['cluster']!r}, sealed with CA key "
            f"{stored}, and this proxy has no CA key ({source.where} does not exist): give it "
            f"the same key as the other proxies (copy their DATA_DIR/{DEFAULT_KEY_FILE}, or "
            f"use --ca-key-file or ${CA_KEY_ENV})")
    if key_id(source.key) != stored:
        raise CAKeyError(
            f"{source.where} is not the CA key of cluster {record['cluster']!r}: its CAs are "
            f"sealed with key {stored}, this one is {key_id(source.key)} (give every proxy "
            f"the same key)")
    return source.key


def _open(record: dict, key: bytes) -> dict[str, tuple[object, object]]:
    cluster = record["cluster"]
    loaded = {}
    for name, entry in record["cas"].items():
        kind = CA_KINDS.get(name)
        if kind is None:
            continue  # written by a newer edgeaccess: kept as it is
        if not isinstance(entry, dict) or not isinstance(entry.get("public"), str):
            raise CASetError(f"the {name} CA in the backend is malformed")
        private = unseal(key, cluster, name, entry.get("private") or {})
        try:
            loaded[name] = kind.load(private, entry["public"])
        except (ValueError, TypeError) as error:
            raise CASetError(f"the {name} CA in the backend cannot be read: {error}")
    return loaded


def open_authority(value: bytes, cluster: str, key: bytes) -> CertificateAuthority:
    """The CAs in a stored CA set ``value`` (pure: tools and tests that read
    a backend themselves, e.g. :meth:`edgeaccess.devcluster.ProxyProcess.authority`)."""
    record = _decode(value, cluster)
    return _authority_from(cluster, _open(record, _check_key(record, CAKeySource(key, "the key"))))


def write_public_copies(directory: Path, authority: CertificateAuthority) -> None:
    """Public copies of the CAs for tools (``curl --cacert DIR/tls_ca.crt``,
    ``@cert-authority`` lines): rewritten at each start, never read back."""
    keys.write_public(directory / "tls_ca.crt", authority.tls_ca_pem.encode())
    keys.write_public(directory / "ssh_user_ca.pub", authority.user_ca_public_line.encode() + b"\n")
    keys.write_public(directory / "ssh_host_ca.pub", authority.host_ca_public_line.encode() + b"\n")
    if authority.web_ca_pem is not None:
        keys.write_public(directory / "web_ca.crt", authority.web_ca_pem.encode())


# --- load or create ----------------------------------------------------------------


async def load_or_create_authority(
    backend,
    cluster: str,
    now: datetime,
    key_source: CAKeySource,
    *,
    legacy: CertificateAuthority | None = None,
    write_key: Callable[[Path, bytes], object] | None = None,
) -> CertificateAuthority:
    """The cluster's CAs from ``backend``; the first start creates them.

    :param legacy: CAs read from an old data directory's files: imported
        (instead of generating new ones) when the backend holds none.
    :param write_key: ``(path, data)``, returning a Deferred or None:
        writes a new CA key file (0600, fsync'd) before the set that needs
        it is stored. Defaults to writing at once (tests).
    :raises CAKeyError: no key, or not the key the set was sealed with.
    :raises CASetError: the backend holds something unusable (another
        cluster's CAs, a malformed or altered set).
    """
    for _attempt in range(10):
        try:
            item = await backend.get(AUTHORITIES_KEY)
        except errors.NotFound:
            item = None
        if item is not None:
            record = _decode(item.value, cluster)
            key = _check_key(record, key_source)
            loaded = _open(record, key)
            missing = [name for name in CA_KINDS if name not in loaded]
            if missing:
                have = {name: (private, record["cas"][name]["public"])
                        for name, (private, _public) in loaded.items()}
                entries = _complete(cluster, now, have)
                if not await _add_cas(backend, item.value, record, key, entries):
                    continue  # another proxy changed the set: read it again
                loaded.update({name: CA_KINDS[name].load(CA_KINDS[name].private_bytes(p), pub)
                               for name, (p, pub) in entries.items()})
                _log.info("added the {names} CA(s) of cluster {cluster} to the backend",
                          names=",".join(missing), cluster=cluster)
            _log.info("loaded certificate authorities of cluster {cluster} from the backend "
                      "(CA key {key_id})", cluster=cluster, key_id=record["key_id"])
            authority = _authority_from(cluster, loaded)
            if legacy is not None and legacy.pin != authority.pin:
                # e.g. a proxy that ran alone, now started on a shared database
                # another proxy set up first: its own CAs are not the cluster's.
                _log.warn("the CA files in the data directory are not the CAs in the "
                          "backend ({files} vs {backend}): ignored; nodes and users that "
                          "trust them must join and log in again", files=legacy.pin,
                          backend=authority.pin)
            return authority

        # No set yet: this start creates it (or imports the old files).
        if legacy is not None:
            if legacy.cluster_name != cluster:
                raise CASetError(f"the data directory holds the CAs of cluster "
                                 f"{legacy.cluster_name!r}, not {cluster!r}")
            entries = _entries_of(legacy)
        else:
            entries = {}
        entries.update(_complete(cluster, now, entries))
        key, created_file = key_source.key, None
        if key is None:
            key = secrets.token_bytes(_KEY_BYTES)
            created_file = key_source.new_file
            # The key is on disk before anything sealed with it is stored:
            # a set whose key was lost would be no use to anyone.
            result = (write_key or _write_key_now)(created_file, format_ca_key(key))
            if result is not None:
                await result
        try:
            await backend.create(AUTHORITIES_KEY, _encode(cluster, key, entries))
        except errors.AlreadyExists:
            # Another proxy's first start won: load its set instead.
            _log.info("another proxy created the CAs of cluster {cluster} first; loading them",
                      cluster=cluster)
            if created_file is not None:
                _remove_quietly(created_file)
            continue
        if created_file is not None:
            key_source.key = key
            _log.info("created the CA key {path} ({key_id}): give every other proxy of the "
                      "cluster the same key", path=str(created_file), key_id=key_id(key))
        what = "imported the certificate authorities from the data directory" if legacy \
            else "created certificate authorities"
        _log.info("{what} of cluster {cluster} into the backend (CA key {key_id})",
                  what=what, cluster=cluster, key_id=key_id(key))
        loaded = {name: CA_KINDS[name].load(CA_KINDS[name].private_bytes(p), pub)
                  for name, (p, pub) in entries.items()}
        return _authority_from(cluster, loaded)
    raise CASetError("the CA set in the backend kept changing while this proxy started")


async def _add_cas(backend, current: bytes, record: dict, key: bytes,
                   entries: Mapping[str, tuple[object, str]]) -> bool:
    cluster = record["cluster"]
    updated = dict(record)
    updated["cas"] = dict(record["cas"])
    for name, (private, public) in entries.items():
        updated["cas"][name] = {"public": public, "private": seal(
            key, cluster, name, CA_KINDS[name].private_bytes(private))}
    try:
        await backend.compare_and_swap(AUTHORITIES_KEY, current,
                                       json.dumps(updated, sort_keys=True).encode())
    except (CompareFailed, errors.NotFound):
        return False
    return True


def _write_key_now(path: Path, data: bytes) -> None:
    keys.write_secret(path, data)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def read_legacy_authority(directory: Path, cluster: str) -> CertificateAuthority | None:
    """The CAs an old data directory keeps as files (``DATA_DIR/ca``), if any.

    Reads only (before the reactor runs); ``None`` when there is no
    complete set.
    """
    if not (directory / "cluster_name").exists():
        return None
    existing = (directory / "cluster_name").read_text().strip()
    if existing != cluster:
        raise CASetError(f"{directory} holds the CAs of cluster {existing!r}, not {cluster!r}")
    authority = CertificateAuthority(
        cluster_name=cluster,
        ssh_user_ca=keys.load_private_key((directory / "ssh_user_ca").read_bytes()),
        ssh_host_ca=keys.load_private_key((directory / "ssh_host_ca").read_bytes()),
        tls_ca_key=keys.load_private_key((directory / "tls_ca.key").read_bytes()),
        tls_ca_cert=x509ca.load_certificate_pem((directory / "tls_ca.crt").read_bytes()),
    )
    if (directory / "web_ca.crt").exists() and (directory / "web_ca.key").exists():
        # A data dir that already had a web CA keeps it (browsers trust it).
        authority.web_ca_key = keys.load_private_key((directory / "web_ca.key").read_bytes())
        authority.web_ca_cert = x509ca.load_certificate_pem((directory / "web_ca.crt").read_bytes())
    return authority
