"""The cluster's CAs in the backend: one set per cluster, sealed, shared by every proxy.

Runs against every embedded backend (memory, SQLite); the PostgreSQL race
of two first starts is in tests/backend/test_postgres.py.
"""

from __future__ import annotations

import base64
import json
import stat
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock

from edgeaccess.backend.memory import MemoryBackend
from edgeaccess.backend.sqlite import SQLiteBackend
from edgeaccess.pki import castore, keys, x509ca
from edgeaccess.pki.authority import CertificateAuthority
from edgeaccess.pki.castore import (
    AUTHORITIES_KEY,
    CAKeyError,
    CAKeySource,
    CASetError,
    load_or_create_authority,
)

NOW = datetime(2027, 1, 15, 8, 0, 0, tzinfo=timezone.utc)


@pytest.fixture(params=["memory", "sqlite"])
def backend_factory(request, tmp_path):
    """Makes backends of one kind; two made alike share one store (as two
    proxies share a database)."""
    opened = []
    clock = Clock()
    clock.advance(NOW.timestamp())

    def make():
        if request.param == "memory":
            if not opened:
                opened.append(MemoryBackend(clock))
            return opened[0]
        backend = SQLiteBackend(tmp_path / "backend.sqlite3", clock, reactor)
        opened.append(backend)
        return backend

    yield make
    if request.param == "sqlite":
        for backend in opened:
            pytest_twisted.blockon(backend.close())


def source(tmp_path, name="a") -> CAKeySource:
    directory = tmp_path / name
    directory.mkdir(exist_ok=True)
    return CAKeySource.from_options(None, {}, directory)


def same_cas(one: CertificateAuthority, other: CertificateAuthority) -> bool:
    return (one.fingerprints() == other.fingerprints()
            and keys.private_key_pem(one.tls_ca_key) == keys.private_key_pem(other.tls_ca_key))


@pytest_twisted.ensureDeferred
async def test_first_start_creates_later_starts_load_the_same_set(backend_factory, tmp_path):
    first_key = source(tmp_path, "a")
    first = await load_or_create_authority(backend_factory(), "example", NOW, first_key)
    key_file = tmp_path / "a" / "ca.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # A second proxy given the same key (here: the environment) loads the set.
    env = {castore.CA_KEY_ENV: key_file.read_text().strip()}
    second_key = CAKeySource.from_options(None, env, tmp_path / "b")
    second = await load_or_create_authority(backend_factory(), "example", NOW, second_key)
    assert same_cas(first, second)
    assert not (tmp_path / "b" / "ca.key").exists()
    # What the second signs, the first's CA key verifies.
    cert = second.sign_user(keys.generate_private_key().public_key(), username="alice",
                            principals=["alice"], roles=["access"], cluster="example",
                            now=NOW, ttl=timedelta(hours=1))
    cert.verify_cert_signature()
    assert keys.public_key_openssh(cert.signature_key()) == \
        keys.public_key_openssh(first.ssh_user_ca)
    assert x509ca.ca_pin(first.tls_ca_cert) == x509ca.ca_pin(second.tls_ca_cert)


@pytest_twisted.ensureDeferred
async def test_private_keys_are_sealed_in_the_backend(backend_factory, tmp_path):
    backend = backend_factory()
    authority = await load_or_create_authority(backend, "example", NOW, source(tmp_path))
    stored = (await backend.get(AUTHORITIES_KEY)).value
    for private in (keys.private_key_openssh(authority.ssh_user_ca),
                    keys.private_key_openssh(authority.ssh_host_ca),
                    keys.private_key_pem(authority.tls_ca_key)):
        body = b"".join(private.splitlines()[1:-1])
        assert body[:40] not in stored
    raw = authority.tls_ca_key.private_bytes_raw()
    assert raw not in stored and base64.b64encode(raw) not in stored
    record = json.loads(stored)
    assert sorted(record["cas"]) == ["ssh_host", "ssh_user", "tls", "web"]
    assert record["cluster"] == "example"


@pytest_twisted.ensureDeferred
async def test_a_proxy_without_the_key_gets_a_clear_error(backend_factory, tmp_path):
    await load_or_create_authority(backend_factory(), "example", NOW, source(tmp_path, "a"))
    with pytest.raises(CAKeyError, match="has no CA key.*same key"):
        await load_or_create_authority(backend_factory(), "example", NOW, source(tmp_path, "b"))
    assert not (tmp_path / "b" / "ca.key").exists(), "no second key (nor CA set) was made"


@pytest_twisted.ensureDeferred
async def test_a_proxy_with_another_key_gets_a_clear_error(backend_factory, tmp_path):
    backend = backend_factory()
    await load_or_create_authority(backend, "example", NOW, source(tmp_path, "a"))
    before = (await backend.get(AUTHORITIES_KEY)).value
    wrong = base64.b64encode(b"\x01" * 32).decode()
    other = CAKeySource.from_options(None, {castore.CA_KEY_ENV: wrong}, tmp_path / "b")
    with pytest.raises(CAKeyError, match="is not the CA key of cluster 'example'"):
        await load_or_create_authority(backend_factory(), "example", NOW, other)
    assert (await backend.get(AUTHORITIES_KEY)).value == before


@pytest_twisted.ensureDeferred
async def test_an_altered_sealed_key_is_refused(backend_factory, tmp_path):
    backend = backend_factory()
    key_source = source(tmp_path)
    await load_or_create_authority(backend, "example", NOW, key_source)
    record = json.loads((await backend.get(AUTHORITIES_KEY)).value)
    sealed = base64.b64decode(record["cas"]["tls"]["private"]["ciphertext"])
    record["cas"]["tls"]["private"]["ciphertext"] = base64.b64encode(
        bytes([sealed[0] ^ 1]) + sealed[1:]).decode()
    await backend.put(AUTHORITIES_KEY, json.dumps(record).encode())
    with pytest.raises(CASetError, match="tls CA .* does not decrypt"):
        await load_or_create_authority(backend, "example", NOW, key_source)


@pytest_twisted.ensureDeferred
async def test_a_sealed_key_moved_to_another_slot_is_refused(backend_factory, tmp_path):
    backend = backend_factory()
    key_source = source(tmp_path)
    await load_or_create_authority(backend, "example", NOW, key_source)
    record = json.loads((await backend.get(AUTHORITIES_KEY)).value)
    record["cas"]["ssh_user"]["private"] = record["cas"]["ssh_host"]["private"]
    record["cas"]["ssh_user"]["public"] = record["cas"]["ssh_host"]["public"]
    await backend.put(AUTHORITIES_KEY, json.dumps(record).encode())
    with pytest.raises(CASetError, match="ssh_user CA"):
        await load_or_create_authority(backend, "example", NOW, key_source)


@pytest_twisted.ensureDeferred
async def test_another_clusters_set_is_refused(backend_factory, tmp_path):
    backend = backend_factory()
    key_source = source(tmp_path)
    await load_or_create_authority(backend, "example", NOW, key_source)
    with pytest.raises(CASetError, match="CAs of cluster 'example', not 'other'"):
        await load_or_create_authority(backend, "other", NOW, key_source)


class _RacingBackend:
    """Lets two first starts both find no CA set before either creates one:
    ``get`` of the CA set waits until both have asked."""

    def __init__(self, backend, racers: int = 2) -> None:
        self.backend = backend
        self._waiting: list[defer.Deferred] = []
        self._racers = racers
        self.creates = 0

    def get(self, key):
        if key != AUTHORITIES_KEY or self._racers == 0:
            return self.backend.get(key)
        answer = defer.Deferred()
        self._waiting.append(answer)
        if len(self._waiting) == self._racers:
            self._racers = 0
            waiting, self._waiting = self._waiting, []
            answers = [self.backend.get(key) for _ in waiting]  # all before any create
            for found, waiter in zip(answers, waiting):
                found.chainDeferred(waiter)
        return answer

    def create(self, key, value, expires=None):
        self.creates += 1
        return self.backend.create(key, value, expires)

    def __getattr__(self, name):
        return getattr(self.backend, name)


@pytest_twisted.ensureDeferred
async def test_two_first_starts_at_once_make_exactly_one_set(backend_factory, tmp_path):
    shared = base64.b64encode(b"\x07" * 32).decode()
    racing = _RacingBackend(backend_factory())
    sources = [CAKeySource.from_options(None, {castore.CA_KEY_ENV: shared}, tmp_path / n)
               for n in ("a", "b")]
    first, second = await defer.gatherResults([
        defer.Deferred.fromCoroutine(load_or_create_authority(racing, "example", NOW, s))
        for s in sources])
    assert racing.creates == 2, "both tried to create: the race happened"
    assert same_cas(first, second)


@pytest_twisted.ensureDeferred
async def test_a_race_lost_with_another_key_fails_without_a_second_set(backend_factory, tmp_path):
    racing = _RacingBackend(backend_factory())
    results = await defer.DeferredList([
        defer.Deferred.fromCoroutine(load_or_create_authority(racing, "example", NOW,
                                                              source(tmp_path, n)))
        for n in ("a", "b")], consumeErrors=True)
    outcomes = sorted(ok for ok, _ in results)
    assert outcomes == [False, True]
    loser = next(value for ok, value in results if not ok)
    assert loser.check(CAKeyError) and "has no CA key" in str(loser.value)
    # The loser removed the key it made for the set it did not store.
    assert sum((tmp_path / n / "ca.key").exists() for n in ("a", "b")) == 1


@pytest_twisted.ensureDeferred
async def test_an_old_data_directory_is_imported(backend_factory, tmp_path):
    old = CertificateAuthority.load_or_create(tmp_path / "data" / "ca", "example", NOW)
    legacy = castore.read_legacy_authority(tmp_path / "data" / "ca", "example")
    key_source = source(tmp_path, "data")
    backend = backend_factory()
    imported = await load_or_create_authority(backend, "example", NOW, key_source,
                                              legacy=legacy)
    assert same_cas(old, imported)
    # Next start: loaded from the backend, the files are not needed.
    again = await load_or_create_authority(backend, "example", NOW, key_source)
    assert same_cas(old, again)


def test_an_old_data_directory_of_another_cluster_is_refused(tmp_path):
    CertificateAuthority.load_or_create(tmp_path / "ca", "example", NOW)
    with pytest.raises(CASetError, match="'example', not 'other'"):
        castore.read_legacy_authority(tmp_path / "ca", "other")
    assert castore.read_legacy_authority(tmp_path / "nothing", "example") is None


@pytest_twisted.ensureDeferred
async def test_a_new_kind_of_ca_is_added_to_an_existing_set(backend_factory, tmp_path,
                                                            monkeypatch):
    backend = backend_factory()
    key_source = source(tmp_path)
    await load_or_create_authority(backend, "example", NOW, key_source)
    kinds = dict(castore.CA_KINDS)
    kinds["extra"] = castore.CA_KINDS["ssh_user"]
    monkeypatch.setattr(castore, "CA_KINDS", kinds)
    await load_or_create_authority(backend, "example", NOW, key_source)
    record = json.loads((await backend.get(AUTHORITIES_KEY)).value)
    assert sorted(record["cas"]) == ["extra", "ssh_host", "ssh_user", "tls", "web"]
    again = await load_or_create_authority(backend, "example", NOW, key_source)
    assert again.loaded


@pytest.mark.parametrize("text", ["", "short", base64.b64encode(b"x" * 31).decode(),
                                  "!" * 44])
def test_a_malformed_key_is_refused(text, tmp_path):
    with pytest.raises(CAKeyError, match="is not a CA key"):
        CAKeySource.from_options(None, {castore.CA_KEY_ENV: text or "x"}, tmp_path)


def test_the_key_file_option_wins_and_must_exist(tmp_path):
    path = tmp_path / "k"
    path.write_bytes(castore.format_ca_key(b"\x02" * 32))
    env = {castore.CA_KEY_ENV: base64.b64encode(b"\x03" * 32).decode()}
    assert CAKeySource.from_options(str(path), env, tmp_path).key == b"\x02" * 32
    assert CAKeySource.from_options(None, env, tmp_path).key == b"\x03" * 32
    with pytest.raises(CAKeyError, match="cannot read the CA key file"):
        CAKeySource.from_options(str(tmp_path / "missing"), {}, tmp_path)


@pytest_twisted.ensureDeferred
async def test_the_web_ca_is_shared_and_linked_to_the_x509_ca(backend_factory, tmp_path):
    key_source = source(tmp_path)
    first = await load_or_create_authority(backend_factory(), "example", NOW, key_source)
    second = await load_or_create_authority(backend_factory(), "example", NOW, key_source)
    assert first.web_ca_cert is not None
    assert first.web_ca_cert == second.web_ca_cert
    assert first.web_ca_cert.subject == first.tls_ca_cert.subject
    assert first.web_ca_link == second.web_ca_link  # derived alike on every proxy
    assert "web_ca" in first.fingerprints()


@pytest_twisted.ensureDeferred
async def test_a_set_without_a_web_ca_gets_one(backend_factory, tmp_path):
    backend = backend_factory()
    key_source = source(tmp_path)
    before = await load_or_create_authority(backend, "example", NOW, key_source)
    record = json.loads((await backend.get(AUTHORITIES_KEY)).value)
    del record["cas"]["web"]
    await backend.put(AUTHORITIES_KEY, json.dumps(record, sort_keys=True).encode())
    after = await load_or_create_authority(backend, "example", NOW, key_source)
    assert after.web_ca_cert is not None and after.web_ca_cert != before.web_ca_cert
    assert after.pin == before.pin
    again = await load_or_create_authority(backend, "example", NOW, key_source)
    assert again.web_ca_cert == after.web_ca_cert


@pytest_twisted.ensureDeferred
async def test_an_old_data_directorys_web_ca_is_kept(backend_factory, tmp_path):
    old = CertificateAuthority.load_or_create(tmp_path / "data" / "ca", "example", NOW)
    assert old.web_ca_cert is not None
    legacy = castore.read_legacy_authority(tmp_path / "data" / "ca", "example")
    imported = await load_or_create_authority(backend_factory(), "example", NOW,
                                              source(tmp_path, "data"), legacy=legacy)
    assert imported.web_ca_cert == old.web_ca_cert


@pytest_twisted.ensureDeferred
async def test_other_ca_files_beside_a_set_in_the_backend_are_ignored_with_a_warning(
        backend_factory, tmp_path):
    from twisted.logger import globalLogPublisher

    backend = backend_factory()
    key_source = source(tmp_path, "a")
    shared = await load_or_create_authority(backend, "example", NOW, key_source)
    CertificateAuthority.load_or_create(tmp_path / "b" / "ca", "example", NOW)
    legacy = castore.read_legacy_authority(tmp_path / "b" / "ca", "example")
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        loaded = await load_or_create_authority(backend, "example", NOW, key_source,
                                                legacy=legacy)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert loaded.pin == shared.pin != legacy.pin
    assert any("are not the CAs in the backend" in str(e.get("log_format")) for e in seen)
