"""App sessions end for every reason, on a fake clock, each audited once with
its reason: expiry (a timer, no request needed), logout, the web session's
end, a lock, a role change; and a session another proxy started."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest_twisted
from twisted.internet.task import Clock

from edgeaccess.apps import sessions as app_sessions
from edgeaccess.apps.sessions import AppGateway, AppSessions
from edgeaccess.backend.memory import MemoryBackend
from edgeaccess.identity import roles as role_docs
from edgeaccess.tunnel.protocol import App

START = 1_800_000_000


class FakeAuth:
    """The two things a gateway asks the auth service for: roles and locks."""

    cluster_name = "prod"

    def __init__(self) -> None:
        self.roles = {"web": {"kind": "role", "version": "v1", "metadata": {"name": "web"},
                              "spec": {"allow": {"app_labels": {"team": "web"}}}}}
        self.locks: list[dict] = []

    async def get_roles(self, names):
        return [role_docs.parse_role(self.roles[n]) for n in names if n in self.roles]

    async def list_locks(self):
        return list(self.locks)


class FakeIndex:
    def __init__(self) -> None:
        self.apps = {"demo": (object(), App(name="demo", uri="http://10.0.0.5",
                                            labels={"team": "web"}))}

    def find(self, name):
        return self.apps.get(name)

    def all(self):
        return list(self.apps.values())


class FakeConnection:
    def __init__(self) -> None:
        self.closed: list[str] = []

    def close_for(self, reason: str) -> None:
        self.closed.append(reason)


class FakeWebSessions:
    def __init__(self) -> None:
        self.listeners: dict[str, list] = {}

    def on_end(self, session_id, callback):
        self.listeners.setdefault(session_id, []).append(callback)
        return lambda: self.listeners.get(session_id, []).remove(callback)

    def end(self, session_id, reason):
        for callback in list(self.listeners.pop(session_id, [])):
            callback(reason)


class WebSession:
    def __init__(self, clock, ttl: float) -> None:
        self.id = "w" * 32
        self.user = "carol"
        self.roles = ["web"]
        self.traits: dict = {}
        self.expires = datetime.fromtimestamp(clock.seconds() + ttl, timezone.utc)


def world(backend=None, clock=None, web_sessions=None):
    clock = clock or Clock()
    if clock.seconds() < START:
        clock.advance(START)
    backend = backend or MemoryBackend(clock)
    events: list[tuple[str, dict]] = []
    sessions = AppSessions(backend, clock, lambda kind, **f: events.append((kind, f)),
                           web_sessions=web_sessions)
    auth = FakeAuth()
    gateway = AppGateway(auth=auth, index=FakeIndex(), sessions=sessions, keys=None,
                         public_host="edge.example", web_addr=lambda: "edge.example:443",
                         clock=clock, endpoint_for=lambda *a, **k: None,
                         web_sessions=web_sessions)
    return clock, backend, sessions, gateway, auth, events


def ends(events):
    return [(f["user"], f["reason"]) for kind, f in events if kind == "app.session.end"]


async def start(sessions, clock, user="alice", ttl=3600.0):
    return await sessions.create(
        user=user, roles=["web"], traits={}, app="demo", cluster="prod",
        expires=datetime.fromtimestamp(clock.seconds() + ttl, timezone.utc),
        remote_addr="192.0.2.7")


@pytest_twisted.ensureDeferred
async def test_expiry_ends_the_session_on_a_timer_without_any_request():
    clock, backend, sessions, _gateway, _auth, events = world()
    record = await start(sessions, clock, ttl=30)
    connection = FakeConnection()
    sessions.attach(record["id"], connection)
    clock.advance(29)
    assert ends(events) == []
    clock.advance(1.5)
    assert ends(events) == [("alice", "expired")]
    assert connection.closed == ["expired"]
    assert await sessions.get(record["id"]) is None


@pytest_twisted.ensureDeferred
async def test_logout_ends_once_however_often_it_is_asked():
    clock, backend, sessions, _gateway, _auth, events = world()
    record = await start(sessions, clock)
    assert await sessions.end(record, "logout") is True
    assert await sessions.end(record, "logout") is False
    clock.advance(7200)  # the expiry timer is gone with it
    assert ends(events) == [("alice", "logout")]


@pytest_twisted.ensureDeferred
async def test_the_web_sessions_end_ends_the_browsers_app_session():
    web = FakeWebSessions()
    clock, backend, sessions, _gateway, _auth, events = world(web_sessions=web)
    _token, record = await sessions.create_web(web_session=WebSession(clock, 3600),
                                               app="demo", cluster="prod",
                                               remote_addr="192.0.2.7")
    connection = FakeConnection()
    sessions.attach(record["id"], connection)
    web.end("w" * 32, "logged out")
    assert ends(events) == [("carol", "web session ended (logged out)")]
    assert connection.closed == ["web session ended (logged out)"]
    (end,) = [f for kind, f in events if kind == "app.session.end"]
    assert end["method"] == "web"


@pytest_twisted.ensureDeferred
async def test_a_lock_and_a_role_change_end_sessions_within_the_sweep():
    clock, backend, sessions, gateway, auth, events = world()
    alice = await start(sessions, clock, user="alice")
    bob = await start(sessions, clock, user="bob")
    connection = FakeConnection()
    sessions.attach(alice["id"], connection)
    await gateway.sweep()
    assert ends(events) == []
    auth.locks.append({"id": "l1", "target": {"user": "alice"}, "message": "incident 7"})
    clock.advance(1)
    await gateway.sweep()
    assert ends(events) == [("alice", "locked: incident 7")]
    assert connection.closed == ["locked: incident 7"]
    # bob has no connection here: the next full scan finds him.
    auth.roles["web"]["spec"]["allow"]["app_labels"] = {"team": "ops"}
    clock.advance(app_sessions.RECHECK + 0.1)
    await gateway.sweep()
    assert ends(events) == [("alice", "locked: incident 7")]
    clock.advance(app_sessions.SCAN_INTERVAL)
    await gateway.sweep()
    assert ends(events)[1] == ("bob", "roles changed: they no longer allow app demo")
    assert await sessions.get(bob["id"]) is None


@pytest_twisted.ensureDeferred
async def test_a_session_of_a_proxy_that_is_gone_is_ended_once_by_another():
    clock, backend, first, _g, _a, first_events = world()
    record = await start(first, clock, ttl=20)
    first.stop()  # that proxy stopped: its timer is gone
    _clock, _backend, second, gateway, _auth, events = world(backend=backend, clock=clock)
    await gateway.sweep()  # the scan finds it and arms its own timer
    clock.advance(21)
    assert ends(events) == [("alice", "expired")]
    # A third proxy scanning later finds nothing left to end.
    _c, _b, third, gateway3, _a3, events3 = world(backend=backend, clock=clock)
    await gateway3.sweep()
    assert ends(events3) == [] and ends(first_events) == []
    assert record["id"] not in [r["id"] for r in await third.all()]


@pytest_twisted.ensureDeferred
async def test_the_record_outlives_expiry_only_by_the_grace():
    clock, backend, sessions, _g, _a, _events = world()
    record = await start(sessions, clock, ttl=10)
    sessions.stop()
    item = await backend.get(app_sessions.SESSIONS_PREFIX + record["id"])
    assert item.expires == datetime.fromtimestamp(START + 10, timezone.utc) + \
        app_sessions.EXPIRY_GRACE
    assert app_sessions.EXPIRY_GRACE <= timedelta(minutes=10)


@pytest_twisted.ensureDeferred
async def test_a_browser_session_of_a_proxy_that_is_gone_ends_with_its_web_session():
    from edgeaccess.web.sessions import PREFIX

    clock, backend, first, _g, _a, _events = world(web_sessions=FakeWebSessions())
    await backend.put(PREFIX + "w" * 32, b"{}")
    _token, record = await first.create_web(web_session=WebSession(clock, 3600), app="demo",
                                            cluster="prod", remote_addr="192.0.2.7")
    first.stop()
    _c, _b, second, gateway, _auth, events = world(backend=backend, clock=clock,
                                                   web_sessions=FakeWebSessions())
    await gateway.sweep()
    assert ends(events) == []  # the web session is still there
    await backend.delete(PREFIX + "w" * 32)  # logged out through another proxy
    clock.advance(app_sessions.SCAN_INTERVAL)
    await gateway.sweep()
    assert ends(events) == [("carol", "web session ended (logged out or expired)")]


@pytest_twisted.ensureDeferred
async def test_a_browser_connection_to_a_leaf_app_is_relayed_with_its_sessions_identity():
    """No app of that name here, a session for the leaf's: each request is checked
    against the root's session, then relayed (Host kept, no assertion, the
    proxy's cookies removed) after one forwarded-identity line; a request
    with another session goes to a new connection."""
    import json

    from twisted.internet import defer
    from twisted.internet.testing import StringTransport

    from edgeaccess.apps.proxy import AppProxyProtocol
    from tests.apps.test_app_proxy_protocol import FakeEndpoint

    web = FakeWebSessions()
    clock, backend, sessions, gateway, _auth, _events = world(web_sessions=web)
    routes = []
    endpoint = FakeEndpoint()

    def endpoint_for(tunnel, kind, target, source=None):
        routes.append((tunnel, kind, target))
        return endpoint

    gateway.endpoint_for = endpoint_for
    gateway.leaf_tunnel = lambda name: "leaf-tunnel" if name == "leaf" else None
    gateway.leaf_names = lambda: ["leaf"]
    tokens = []
    for n in range(2):
        session = WebSession(clock, 3600)
        session.id = str(n) * 32
        token, _record = await sessions.create_web(web_session=session, app="leafapp",
                                                   cluster="leaf", remote_addr="192.0.2.7")
        tokens.append(token)
    holder = []
    protocol = AppProxyProtocol(lambda p, preamble: defer.succeed(holder[0]), clock)
    holder.append(gateway._browser_access(protocol, "leafapp", "192.0.2.7", None))
    client = StringTransport()
    protocol.makeConnection(client)
    protocol.dataReceived(b"GET /page HTTP/1.1\r\nHost: leafapp.edge.example\r\n"
                          b"Cookie: a=1; __Host-edge-app=" + tokens[0].encode() +
                          b"\r\nEdge-Jwt-Assertion: forged\r\n\r\n")
    assert routes == [("leaf-tunnel", "cluster", "app:leafapp")]
    preamble, _, request = endpoint.transport.value().partition(b"\n")
    forwarded = json.loads(preamble)
    assert (forwarded["user"], forwarded["cluster"], forwarded["client_ip"]) == (
        "carol", "prod", "192.0.2.7")
    assert forwarded["hosts"] == ["leafapp.edge.example", "leafapp.edge.example:443"]
    assert request.startswith(b"GET /page HTTP/1.1\r\n")
    assert b"\r\nHost: leafapp.edge.example\r\n" in request  # the leaf checks it
    assert b"__Host-edge" not in request and b"forged" not in request
    assert b"Cookie: a=1\r\n" in request
    endpoint.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert client.value().endswith(b"ok")
    protocol.dataReceived(b"GET /other HTTP/1.1\r\nHost: leafapp.edge.example\r\n"
                          b"Cookie: __Host-edge-app=" + tokens[1].encode() + b"\r\n\r\n")
    answer = client.value().split(b"ok", 1)[1]
    assert answer.startswith(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /other\r\n")
    assert client.disconnecting
    assert endpoint.transport.value().count(b"GET ") == 1
