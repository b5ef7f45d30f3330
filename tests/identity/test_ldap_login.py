"""LDAPLoginMethod against a real OpenLDAP slapd (tests/ldapfixture.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import formatEvent
from twisted.python.threadpool import ThreadPool

import edgeaccess.identity.ldap as ldap_module
from edgeaccess.errors import AuthenticationFailed, IdentityProviderUnreachable
from edgeaccess.identity.connectors import LDAPConnector, parse_ldap_connector
from edgeaccess.identity.ldap import ExternalIdentity, LDAPLoginMethod
from tests.ldapfixture import (
    ALICE_DN,
    EVE_DN,
    GROUPS_DN,
    PASSWORDS,
    PEOPLE_DN,
    SERVICE_DN,
    SERVICE_PASSWORD,
    ServerPKI,
    SlapdServer,
    free_port,
    make_server_pki,
    make_test_ca,
    running_under_ci,
    slapd_available,
)

if not slapd_available() and not running_under_ci():
    pytest.skip("slapd is not installed (Debian packages slapd, ldap-utils)", allow_module_level=True)

GROUPS_TO_ROLES = [
    {"group": "ops", "roles": ["access", "ops-admin"]},
    {"group": "devs", "roles": ["dev", "access"]},
    {"group": "qa", "roles": ["qa"]},
    {"group": "legacy", "roles": ["legacy-admin"]},
]


def make_connector(url: str, **spec: Any) -> LDAPConnector:
    """A connector for the test directory, with ``spec`` overriding fields."""
    doc_spec: dict[str, Any] = {
        "url": url,
        "bind_dn": SERVICE_DN,
        "bind_password": SERVICE_PASSWORD,
        "user_search": {"base_dn": PEOPLE_DN, "filter": "(&(objectClass=inetOrgPerson)(uid={username}))"},
        "group_search": {"base_dn": GROUPS_DN, "filter": "(member={user_dn})"},
        "attributes_to_traits": {"logins": ["uid"], "email": ["mail"], "names": ["cn", "sn"]},
        "groups_to_roles": GROUPS_TO_ROLES,
        "timeout": 5,
    }
    doc_spec.update(spec)
    return parse_ldap_connector(
        {"kind": "ldap_connector", "version": "v1", "metadata": {"name": "corp"}, "spec": doc_spec}
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ServerPKI:
    return make_server_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory, pki: ServerPKI) -> Iterator[SlapdServer]:
    with SlapdServer(tmp_path_factory.mktemp("slapd"), tls=pki) as server:
        yield server


@pytest.fixture
def logins() -> Iterator[list[LDAPLoginMethod]]:
    """Login methods made by a test; their thread pools are stopped after it."""
    made: list[LDAPLoginMethod] = []
    yield made
    for method in made:
        method.stop()


@pytest.fixture
def login_method(logins: list[LDAPLoginMethod]) -> Any:
    def make(url: str, **spec: Any) -> LDAPLoginMethod:
        method = LDAPLoginMethod(make_connector(url, **spec), reactor)
        logins.append(method)
        return method

    return make


@pytest.fixture
def log_events(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(ldap_module._log, "observer", events.append)
    return events


def logged_text(events: list[dict[str, Any]]) -> str:
    return "\n".join(formatEvent(e) for e in events)


async def refusal(d: Deferred[Any]) -> Exception:
    """The error a login Deferred fails with (fails the test if it succeeds)."""
    try:
        result = await d
    except Exception as e:  # noqa: BLE001 - the error is the result here
        return e
    pytest.fail(f"login unexpectedly succeeded: {result!r}")


# --- successful logins -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_login_maps_groups_to_roles_and_attributes_to_traits(
    slapd: SlapdServer, login_method: Any
) -> None:
    method = login_method(slapd.ldap_url)

    identity = await method.authenticate("alice", PASSWORDS["alice"])

    assert isinstance(identity, ExternalIdentity)
    assert identity.username == "alice"
    assert identity.user_dn == ALICE_DN
    assert sorted(identity.groups) == ["devs", "ops"]
    # Roles in the order of groups_to_roles, without duplicates.
    assert identity.roles == ("access", "ops-admin", "dev")
    assert identity.traits == {
        "logins": ["alice", "alice.ops"],
        "email": ["alice@example.com"],
        "names": ["Alice Example", "Example"],
    }
    assert identity.connector == "corp"


@pytest_twisted.ensureDeferred
async def test_user_dn_with_filter_characters_is_escaped_in_the_group_search(
    slapd: SlapdServer, login_method: Any
) -> None:
    # Eve's DN has '(', ')' and an escaped ',': unescaped, the group filter breaks.
    identity = await login_method(slapd.ldap_url).authenticate("eve", PASSWORDS["eve"])

    assert identity.user_dn.startswith("cn=Eve (QA)")
    assert identity.user_dn.endswith(EVE_DN.split(",", 2)[2])
    assert identity.groups == ("qa",)
    assert identity.roles == ("qa",)
    assert identity.traits["email"] == []


@pytest_twisted.ensureDeferred
async def test_groups_can_be_searched_by_username(slapd: SlapdServer, login_method: Any) -> None:
    method = login_method(
        slapd.ldap_url,
        group_search={"base_dn": GROUPS_DN, "filter": "(memberUid={username})"},
    )

    identity = await method.authenticate("bob", PASSWORDS["bob"])

    assert identity.groups == ("legacy",)
    assert identity.roles == ("legacy-admin",)


@pytest_twisted.ensureDeferred
async def test_bind_password_file_is_read_without_its_trailing_newline(
    slapd: SlapdServer, login_method: Any, tmp_path: Path
) -> None:
    password_file = tmp_path / "ldap.pass"
    password_file.write_text(SERVICE_PASSWORD + "\n")
    method = login_method(
        slapd.ldap_url, bind_password=None, bind_password_file=str(password_file)
    )

    identity = await method.authenticate("bob", PASSWORDS["bob"])

    assert identity.roles == ("dev", "access")


# --- refusals ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_wrong_password_is_refused_with_a_generic_message_and_a_precise_log(
    slapd: SlapdServer, login_method: Any, log_events: list[dict[str, Any]]
) -> None:
    error = await refusal(login_method(slapd.ldap_url).authenticate("alice", "not-her-password"))

    assert isinstance(error, AuthenticationFailed)
    assert str(error) == "invalid username or password"
    text = logged_text(log_events)
    assert "wrong password" in text and ALICE_DN in text
    assert "not-her-password" not in text and SERVICE_PASSWORD not in text


@pytest_twisted.ensureDeferred
async def test_unknown_user_is_refused_like_a_wrong_password(
    slapd: SlapdServer, login_method: Any, log_events: list[dict[str, Any]]
) -> None:
    error = await refusal(login_method(slapd.ldap_url).authenticate("mallory", "whatever"))

    assert isinstance(error, AuthenticationFailed)
    assert str(error) == "invalid username or password"
    assert "no such user" in logged_text(log_events)


@pytest_twisted.ensureDeferred
async def test_empty_password_is_refused_before_any_network_traffic(
    login_method: Any, log_events: list[dict[str, Any]]
) -> None:
    # A listening socket that is never accepted: any connection attempt
    # would show up in its backlog.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        method = login_method(f"ldap://127.0.0.1:{listener.getsockname()[1]}")

        error = await refusal(method.authenticate("alice", ""))

        assert isinstance(error, AuthenticationFailed)
        assert str(error) == "invalid username or password"
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert "empty password" in logged_text(log_events)


@pytest_twisted.ensureDeferred
async def test_empty_password_is_refused_by_a_running_directory_too(
    slapd: SlapdServer, login_method: Any
) -> None:
    error = await refusal(login_method(slapd.ldap_url).authenticate("alice", ""))
    assert isinstance(error, AuthenticationFailed)


@pytest.mark.parametrize("username", ["", "alice\x00", "alice\n", "a" * 257])
@pytest_twisted.ensureDeferred
async def test_malformed_usernames_are_refused_before_any_network_traffic(
    username: str, login_method: Any
) -> None:
    method = login_method(f"ldap://127.0.0.1:{free_port()}")  # nothing listens there

    error = await refusal(method.authenticate(username, "some-password"))

    assert isinstance(error, AuthenticationFailed)
    assert str(error) == "invalid username or password"


@pytest_twisted.ensureDeferred
async def test_user_in_no_mapped_group_is_refused(
    slapd: SlapdServer, login_method: Any, log_events: list[dict[str, Any]]
) -> None:
    error = await refusal(login_method(slapd.ldap_url).authenticate("carol", PASSWORDS["carol"]))

    assert isinstance(error, AuthenticationFailed)
    assert str(error) == "user carol is not in any group mapped to a role"
    assert "contractors" in logged_text(log_events)


@pytest_twisted.ensureDeferred
async def test_user_in_no_mapped_group_with_wrong_password_learns_nothing_about_groups(
    slapd: SlapdServer, login_method: Any
) -> None:
    error = await refusal(login_method(slapd.ldap_url).authenticate("carol", "wrong"))
    assert str(error) == "invalid username or password"


@pytest_twisted.ensureDeferred
async def test_username_matching_several_entries_is_refused(
    slapd: SlapdServer, login_method: Any, log_events: list[dict[str, Any]]
) -> None:
    error = await refusal(login_method(slapd.ldap_url).authenticate("twin", PASSWORDS["twin"]))

    assert isinstance(error, AuthenticationFailed)
    assert str(error) == "invalid username or password"
    assert "several directory entries" in logged_text(log_events)


@pytest.mark.parametrize(
    "username", ["*", "a*", "x)(uid=*", "alice)(uid=*", "*)(|(uid=*", "al*ce", "alice\\2a"]
)
@pytest_twisted.ensureDeferred
async def test_filter_injection_usernames_are_refused(
    username: str, slapd: SlapdServer, login_method: Any
) -> None:
    # With alice's real password: unescaped, 'a*' and 'al*ce' would log in as alice.
    error = await refusal(login_method(slapd.ldap_url).authenticate(username, PASSWORDS["alice"]))

    assert isinstance(error, AuthenticationFailed)
    assert str(error) == "invalid username or password"


# --- the directory unavailable ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stopped_directory_reports_identity_provider_unreachable(
    tmp_path: Path, login_method: Any, log_events: list[dict[str, Any]]
) -> None:
    server = SlapdServer(tmp_path / "slapd")
    server.start()
    try:
        method = login_method(server.ldap_url)
        assert (await method.authenticate("bob", PASSWORDS["bob"])).username == "bob"
    finally:
        server.stop()

    error = await refusal(method.authenticate("bob", PASSWORDS["bob"]))

    assert isinstance(error, IdentityProviderUnreachable)
    assert str(error) == "identity provider unreachable: connection refused"
    assert "Traceback" not in str(error)
    assert "refused" in logged_text(log_events)


@pytest_twisted.ensureDeferred
async def test_directory_that_never_answers_times_out(
    login_method: Any,
) -> None:
    with socket.socket() as listener:  # accepts TCP (backlog) but never speaks LDAP
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        method = login_method(f"ldap://127.0.0.1:{listener.getsockname()[1]}", timeout=1)
        started = reactor.seconds()

        error = await refusal(method.authenticate("bob", PASSWORDS["bob"]))

        elapsed = reactor.seconds() - started
    assert isinstance(error, IdentityProviderUnreachable)
    assert str(error) == "identity provider unreachable: timed out"
    assert elapsed < 4


@pytest_twisted.ensureDeferred
async def test_refused_service_account_reports_unreachable_not_bad_password(
    slapd: SlapdServer, login_method: Any
) -> None:
    method = login_method(slapd.ldap_url, bind_password="not-the-service-password")

    error = await refusal(method.authenticate("alice", PASSWORDS["alice"]))

    assert isinstance(error, IdentityProviderUnreachable)
    assert str(error) == "identity provider unreachable: service account bind refused"


@pytest_twisted.ensureDeferred
async def test_missing_user_search_base_reports_unreachable(
    slapd: SlapdServer, login_method: Any
) -> None:
    method = login_method(
        slapd.ldap_url, user_search={"base_dn": "ou=nowhere,dc=example,dc=com", "filter": "(uid={username})"}
    )

    error = await refusal(method.authenticate("alice", PASSWORDS["alice"]))

    assert isinstance(error, IdentityProviderUnreachable)
    assert "user search" in str(error)


# --- TLS ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_start_tls_refused_by_a_directory_without_tls_is_reported(
    tmp_path: Path, login_method: Any
) -> None:
    with SlapdServer(tmp_path / "slapd") as server:  # no TLS configured
        method = login_method(server.ldap_url, start_tls=True)

        error = await refusal(method.authenticate("bob", PASSWORDS["bob"]))

    assert isinstance(error, IdentityProviderUnreachable)
    assert str(error) == "identity provider unreachable: StartTLS failed"


@pytest_twisted.ensureDeferred
async def test_missing_ca_file_is_reported_as_tls_configuration_error(
    slapd: SlapdServer, login_method: Any, tmp_path: Path
) -> None:
    method = login_method(slapd.ldaps_url, ca_file=str(tmp_path / "missing-ca.pem"))

    error = await refusal(method.authenticate("bob", PASSWORDS["bob"]))

    assert isinstance(error, IdentityProviderUnreachable)
    assert str(error) == "identity provider unreachable: TLS configuration error"


@pytest_twisted.ensureDeferred
async def test_start_tls_with_the_right_ca_logs_in(
    slapd: SlapdServer, pki: ServerPKI, login_method: Any
) -> None:
    method = login_method(slapd.ldap_url, start_tls=True, ca_file=str(pki.ca_file))
    identity = await method.authenticate("alice", PASSWORDS["alice"])
    assert identity.roles == ("access", "ops-admin", "dev")


@pytest_twisted.ensureDeferred
async def test_start_tls_by_host_name_logs_in(
    slapd: SlapdServer, pki: ServerPKI, login_method: Any
) -> None:
    url = slapd.ldap_url.replace("127.0.0.1", "localhost")
    method = login_method(url, start_tls=True, ca_file=str(pki.ca_file))
    assert (await method.authenticate("bob", PASSWORDS["bob"])).username == "bob"


@pytest_twisted.ensureDeferred
async def test_start_tls_with_a_wrong_ca_is_refused(
    slapd: SlapdServer, login_method: Any, tmp_path: Path
) -> None:
    other_ca = make_test_ca(tmp_path / "other", "some other CA")
    method = login_method(slapd.ldap_url, start_tls=True, ca_file=str(other_ca.cert_file))

    error = await refusal(method.authenticate("alice", PASSWORDS["alice"]))

    assert isinstance(error, IdentityProviderUnreachable)
    assert str(error) == "identity provider unreachable: TLS certificate not trusted"


@pytest_twisted.ensureDeferred
async def test_start_tls_without_ca_file_does_not_trust_a_private_ca(
    slapd: SlapdServer, login_method: Any
) -> None:
    method = login_method(slapd.ldap_url, start_tls=True)

    error = await refusal(method.authenticate("alice", PASSWORDS["alice"]))

    assert isinstance(error, IdentityProviderUnreachable)
    assert "TLS" in str(error)


@pytest_twisted.ensureDeferred
async def test_ldaps_with_the_right_ca_logs_in(
    slapd: SlapdServer, pki: ServerPKI, login_method: Any
) -> None:
    method = login_method(slapd.ldaps_url, ca_file=str(pki.ca_file))
    identity = await method.authenticate("eve", PASSWORDS["eve"])
    assert identity.roles == ("qa",)


@pytest_twisted.ensureDeferred
async def test_ldaps_with_a_wrong_ca_is_refused(
    slapd: SlapdServer, login_method: Any, tmp_path: Path
) -> None:
    other_ca = make_test_ca(tmp_path / "other", "some other CA")
    method = login_method(slapd.ldaps_url, ca_file=str(other_ca.cert_file))

    error = await refusal(method.authenticate("eve", PASSWORDS["eve"]))

    assert isinstance(error, IdentityProviderUnreachable)
    assert str(error) == "identity provider unreachable: TLS certificate not trusted"


@pytest_twisted.ensureDeferred
async def test_certificate_for_another_host_is_refused(
    tmp_path: Path, login_method: Any
) -> None:
    pki = make_server_pki(tmp_path / "pki", names=("ldap.example.com",))
    with SlapdServer(tmp_path / "slapd", tls=pki) as server:
        method = login_method(server.ldaps_url, ca_file=str(pki.ca_file))

        error = await refusal(method.authenticate("bob", PASSWORDS["bob"]))

    assert isinstance(error, IdentityProviderUnreachable)
    assert str(error) == "identity provider unreachable: TLS certificate does not match the host"


# --- threads and the reactor -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reactor_keeps_running_while_200_logins_are_in_flight(
    slapd: SlapdServer,
) -> None:
    pool = ThreadPool(minthreads=0, maxthreads=10, name="test-ldap")
    pool.start()
    method = LDAPLoginMethod(make_connector(slapd.ldap_url), reactor, threadpool=pool)
    ticks: list[float] = []
    threads_seen: list[int] = []

    def tick() -> None:
        ticks.append(reactor.seconds())
        threads_seen.append(len(pool.threads))

    looping = LoopingCall(tick)
    looping.clock = reactor
    cases = [("alice", PASSWORDS["alice"]), ("bob", PASSWORDS["bob"]), ("eve", "wrong")] * 67
    cases = cases[:200]
    try:
        looping.start(0.01, now=True)
        started = reactor.seconds()
        timer: list[tuple[float, int]] = []
        logins = [method.authenticate(u, p) for u, p in cases]
        pending = lambda: sum(1 for d in logins if not d.called)  # noqa: E731
        reactor.callLater(0.02, lambda: timer.append((reactor.seconds() - started, pending())))
        results = await DeferredList(logins, consumeErrors=True)
        finished = reactor.seconds()
    finally:
        looping.stop()
        pool.stop()

    for (user, password), (ok, value) in zip(cases, results):
        if password == "wrong":
            assert not ok and isinstance(value.value, AuthenticationFailed)
        else:
            assert ok and value.username == user, value
    (fired_after, still_pending), = timer
    assert still_pending > 0, "logins finished too fast for the test to mean anything"
    assert fired_after < 0.5, f"callLater(0.02) fired after {fired_after:.3f}s"
    during = [t for t in ticks if started <= t <= finished]
    gaps = [b - a for a, b in zip(during, during[1:])]
    assert len(during) >= 3 and max(gaps) < 0.5, gaps
    assert max(threads_seen) <= 10


@pytest_twisted.ensureDeferred
async def test_owned_thread_pool_starts_on_first_login_and_stops(slapd: SlapdServer) -> None:
    method = LDAPLoginMethod(make_connector(slapd.ldap_url), reactor, max_threads=3)
    pool = method._threadpool
    assert not pool.started

    await method.authenticate("bob", PASSWORDS["bob"])
    assert pool.started and pool.max == 3

    method.stop()
    assert not pool.started
    assert not any(thread.is_alive() for thread in pool.threads)

    # Usable again after stop (with a new pool), and stop is idempotent.
    assert (await method.authenticate("bob", PASSWORDS["bob"])).username == "bob"
    method.stop()
    method.stop()
