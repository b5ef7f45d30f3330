"""The Klein apps (proxy web on 3080, auth API on 3025) over StubTreq: no sockets.

Mutual TLS is not simulated; instead a wrapper resource hands the request's
transport a peer certificate, as the TLS handshake would after verifying it.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from treq.testing import StubTreq
from twisted.web.resource import Resource

from authkit import CLUSTER, PASSWORD, START, add_user, make_authority, resolve
from edgeaccess.auth.api import AuthAPI
from edgeaccess.pki import keys, sshca, x509ca
from edgeaccess.proxy.web import ProxyWeb

WEB = "https://127.0.0.1:3080"
AUTH = "https://127.0.0.1:3025"


def _addresses() -> dict:
    return {"web": "127.0.0.1:3080", "ssh": "127.0.0.1:3023", "auth": "127.0.0.1:3025"}


class _WithPeerCertificate(Resource):
    """Serves ``inner`` as if the client had presented ``cert`` over TLS."""

    isLeaf = True

    def __init__(self, inner, cert) -> None:
        super().__init__()
        self._inner = inner
        self._cert = cert

    def render(self, request):
        if self._cert is not None:
            peer = crypto.X509.from_cryptography(self._cert)
            request.transport.getPeerCertificate = lambda: peer
        return self._inner.render(request)


def _certificate(authority, identity: x509ca.Identity):
    key = keys.generate_private_key()
    return authority.sign_tls(key.public_key(), identity,
                              now=datetime.fromtimestamp(START, timezone.utc),
                              ttl=timedelta(hours=1))


def _call(stub: StubTreq, method: str, url: str, body=None, raw: bytes | None = None):
    """``(status, decoded JSON)`` of one request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {b"content-type": [b"application/json"]}
    d = stub.request(method, url, data=data, headers=headers)
    stub.flush()
    responses: list = []
    d.addBoth(responses.append)
    assert responses, f"{method} {url} did not complete"
    response = responses[0]
    content: list = []
    stub.content(response).addBoth(content.append)
    stub.flush()
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"], content
    return response.code, json.loads(content[0])


@pytest.fixture
def web(auth) -> StubTreq:
    return StubTreq(ProxyWeb(auth, _addresses, "127.0.0.1").resource())


@pytest.fixture
def api(auth):
    """A function: the auth API as seen by a caller holding ``identity`` (or none)."""

    def as_caller(identity: x509ca.Identity | None, authority=None) -> StubTreq:
        cert = None if identity is None else _certificate(authority or auth.authority, identity)
        return StubTreq(_WithPeerCertificate(AuthAPI(auth).resource(), cert))

    return as_caller


def _login_body(user="alice", password=PASSWORD) -> dict:
    return {"user": user, "password": password,
            "ssh_public_key": keys.public_key_openssh(keys.generate_private_key()).decode()}


ADMIN = x509ca.Identity(kind="admin", name="admin", cluster=CLUSTER)


# --- proxy web -------------------------------------------------------------

def test_ping_names_the_cluster_and_its_ports(web):
    code, body = _call(web, "GET", f"{WEB}/v1/ping")
    assert code == 200
    assert body["cluster_name"] == CLUSTER
    assert body["proxy"]["web_addr"] == "127.0.0.1:3080"
    assert body["proxy"]["ssh_addr"] == "127.0.0.1:3023"
    assert body["version"]


def test_cluster_ca_matches_the_pin(web, auth):
    code, body = _call(web, "GET", f"{WEB}/v1/cluster/ca")
    assert code == 200
    [pem] = body["tls_ca"]
    assert x509ca.ca_pin(x509ca.load_certificate_pem(pem.encode())) == body["ca_pin"]
    assert body["ca_pin"] == auth.authority.pin


def test_the_web_ca_is_served_for_browsers_and_named_in_the_ca_answer(auth):
    import attrs

    now = datetime.fromtimestamp(START, timezone.utc)
    web_key, web_cert = x509ca.create_web_ca(auth.authority.tls_ca_cert, now)
    with_web_ca = attrs.evolve(auth.authority, web_ca_key=web_key, web_ca_cert=web_cert)
    for authority, expected in ((auth.authority, None), (with_web_ca, web_cert)):
        saved, auth.authority = auth.authority, authority
        try:
            stub = StubTreq(ProxyWeb(auth, _addresses, "127.0.0.1").resource())
            d = stub.get(f"{WEB}/v1/cluster/web_ca.pem")
            stub.flush()
            responses: list = []
            d.addBoth(responses.append)
            response = responses[0]
            content: list = []
            stub.content(response).addBoth(content.append)
            stub.flush()
            _, answer = _call(stub, "GET", f"{WEB}/v1/cluster/ca")
        finally:
            auth.authority = saved
        if expected is None:
            assert response.code == 404 and answer["web_ca"] == []
            continue
        assert response.code == 200
        assert response.headers.getRawHeaders(b"content-type") == [b"application/x-pem-file"]
        assert x509ca.load_certificate_pem(content[0]) == expected
        assert answer["web_ca"] == [content[0].decode()]
        assert x509ca.ca_pin(x509ca.load_certificate_pem(answer["tls_ca"][0].encode())) == \
            answer["ca_pin"]  # the pin stays the cluster CA's


def test_login_returns_certificates_and_the_host_ca(web, auth):
    add_user(auth, "alice", logins=("root",))
    code, body = _call(web, "POST", f"{WEB}/v1/login", _login_body())
    assert code == 200
    assert body["username"] == "alice" and body["logins"] == ["root"]
    assert body["ssh_host_ca"] == [auth.authority.host_ca_public_line]
    assert body["ssh_addr"] == "127.0.0.1:3023"
    cert = sshca.load_certificate(body["ssh_certificate"])
    assert cert.valid_principals == [b"root"]


def test_wrong_password_maps_to_401_json(web, auth):
    add_user(auth, "alice")
    code, body = _call(web, "POST", f"{WEB}/v1/login", _login_body(password="wrong password"))
    assert code == 401
    assert body == {"error": {"code": "authentication_failed",
                              "message": "invalid username or password"}}


def test_locked_account_maps_to_403(web, auth):
    add_user(auth, "alice")
    for _ in range(5):
        assert _call(web, "POST", f"{WEB}/v1/login", _login_body(password="nope nope"))[0] == 401
    code, body = _call(web, "POST", f"{WEB}/v1/login", _login_body())
    assert code == 403
    assert body["error"]["code"] == "account_locked"


@pytest.mark.parametrize("raw, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps({"user": "alice"}).encode(), "missing field 'password'"),
    (json.dumps({"user": 7, "password": "x", "ssh_public_key": "y"}).encode(), "wrong type"),
    (json.dumps({"user": "alice", "password": "x", "ssh_public_key": "y",
                 "ttl": "forever"}).encode(), "invalid duration"),
])
def test_bad_login_bodies_are_400(web, raw, message):
    code, body = _call(web, "POST", f"{WEB}/v1/login", raw=raw)
    assert code == 400
    assert body["error"]["code"] == "bad_request"
    assert message in body["error"]["message"]


def test_password_is_never_echoed_in_errors(web, auth):
    add_user(auth, "alice")
    secret = "s3cret-that-must-not-leak"
    for raw in (json.dumps({"user": "alice", "password": secret}).encode(),
                json.dumps(_login_body(password=secret)).encode()):
        code, body = _call(web, "POST", f"{WEB}/v1/login", raw=raw)
        assert code >= 400 and secret not in json.dumps(body)


def test_node_listing_needs_a_client_certificate(web):
    code, body = _call(web, "GET", f"{WEB}/v1/nodes")
    assert code == 401
    assert body["error"]["code"] == "authentication_failed"


def test_join_relay_refuses_an_unknown_token(web):
    key = keys.generate_private_key()
    code, body = _call(web, "POST", f"{WEB}/v1/join", {
        "token": "0" * 32, "name": "web1",
        "ssh_public_key": keys.public_key_openssh(key).decode(),
        "tls_public_key": key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()})
    assert code == 401
    assert body["error"]["code"] == "token_invalid"


# --- auth API ----------------------------------------------------------------

def test_auth_status_needs_a_client_certificate(api):
    code, body = _call(api(None), "GET", f"{AUTH}/v1/status")
    assert code == 401


def test_the_proxy_certificate_is_never_a_caller(api, auth):
    # Server-only (EKU serverAuth, kind proxy): whoever holds the proxy's key
    # cannot use its certificate as an admin's, a user's or a node's.
    proxy = x509ca.Identity(kind="proxy", name="127.0.0.1", cluster=CLUSTER)
    for path in ("/v1/status", "/v1/users", "/v1/nodes/roles"):
        code, body = _call(api(proxy), "GET", f"{AUTH}{path}")
        assert code == 401, (path, body)


def test_a_legacy_server_usage_certificate_still_calls_as_its_kind(api, auth):
    """Admin certificates issued before the split carry both usages: still callers."""
    from tests.pkitools import issue_legacy_certificate

    _, cert = issue_legacy_certificate(
        {"ca": auth.authority.tls_ca_cert, "ca_key": auth.authority.tls_ca_key}, ADMIN)
    stub = StubTreq(_WithPeerCertificate(AuthAPI(auth).resource(), cert))
    code, body = _call(stub, "GET", f"{AUTH}/v1/status")
    assert code == 200


def test_admin_reads_the_status(api, auth):
    code, body = _call(api(ADMIN), "GET", f"{AUTH}/v1/status")
    assert code == 200
    assert body["cluster_name"] == CLUSTER and body["ca_pin"] == auth.authority.pin


def test_certificate_of_another_cluster_is_refused(api):
    other = make_authority("other")
    stranger = x509ca.Identity(kind="admin", name="admin", cluster="other")
    code, body = _call(api(stranger, other), "GET", f"{AUTH}/v1/users")
    assert code == 403
    assert body["error"]["code"] == "access_denied"


def test_user_without_admin_rules_cannot_manage_users(api):
    user = x509ca.Identity(kind="user", name="alice", cluster=CLUSTER, roles=("access",))
    code, body = _call(api(user), "POST", f"{AUTH}/v1/users",
                       {"name": "bob", "roles": ["access"]})
    assert code == 403
    assert "may not create" in body["error"]["message"]


def test_editor_user_can_manage_users(api, auth):
    editor = x509ca.Identity(kind="user", name="ed", cluster=CLUSTER, roles=("editor",))
    code, body = _call(api(editor), "POST", f"{AUTH}/v1/users",
                       {"name": "bob", "roles": ["access"], "logins": ["bob"]})
    assert code == 201 and body["name"] == "bob" and body["signup_token"]
    assert resolve(auth.get_user("bob"))["logins"] == ["bob"]


def test_admin_creates_and_lists_tokens(api):
    code, record = _call(api(ADMIN), "POST", f"{AUTH}/v1/tokens", {"type": "node", "ttl": "5m"})
    assert code == 201
    assert record["expires"] == "2027-01-15T08:05:00Z"
    code, listed = _call(api(ADMIN), "GET", f"{AUTH}/v1/tokens")
    assert [t["token"] for t in listed] == [record["token"]]


def test_duplicate_resource_is_409_and_force_replaces(api):
    doc = {"kind": "role", "version": "v1", "metadata": {"name": "dev"},
           "spec": {"allow": {"logins": ["ubuntu"]}}}
    assert _call(api(ADMIN), "POST", f"{AUTH}/v1/resources", {"resource": doc})[0] == 201
    code, body = _call(api(ADMIN), "POST", f"{AUTH}/v1/resources", {"resource": doc})
    assert code == 409 and "--force" in body["error"]["message"]
    code, _ = _call(api(ADMIN), "POST", f"{AUTH}/v1/resources", {"resource": doc, "force": True})
    assert code == 201


def test_unknown_resource_kind_is_400(api):
    doc = {"kind": "gadget", "version": "v1", "metadata": {"name": "x"}}
    code, body = _call(api(ADMIN), "POST", f"{AUTH}/v1/resources", {"resource": doc})
    assert code == 400
    assert "unknown resource kind" in body["error"]["message"]


def test_node_heartbeat_then_admin_lists_it(api):
    node = x509ca.Identity(kind="node", name="web1", cluster=CLUSTER,
                           uuid="6f1c3c5e-8a51-4d6e-9a8e-1b2c3d4e5f60")
    code, _ = _call(api(node), "POST", f"{AUTH}/v1/nodes/heartbeat",
                    {"name": "web1", "address": "127.0.0.1:3022", "labels": {"env": "dev"}})
    assert code == 200
    code, nodes = _call(api(ADMIN), "GET", f"{AUTH}/v1/nodes")
    assert [(n["name"], n["id"], n["labels"]) for n in nodes] == [
        ("web1", node.uuid, {"env": "dev"})]


def test_heartbeat_from_a_user_certificate_is_refused(api):
    user = x509ca.Identity(kind="user", name="web1", cluster=CLUSTER)
    code, body = _call(api(user), "POST", f"{AUTH}/v1/nodes/heartbeat", {"name": "web1"})
    assert code == 403


def test_locks_over_the_auth_api_for_editors_only(api, auth):
    admin = api(ADMIN)
    code, lock = _call(admin, "POST", f"{AUTH}/v1/locks",
                       {"target": {"user": "alice"}, "ttl": "1h", "message": "incident"})
    assert code == 201 and lock["target"] == {"user": "alice"} and lock["expires"]
    assert lock["created_by"] == "admin:admin"
    code, listed = _call(admin, "GET", f"{AUTH}/v1/locks")
    assert code == 200 and [l["id"] for l in listed] == [lock["id"]]
    code, body = _call(admin, "POST", f"{AUTH}/v1/locks", {"target": {"user": "a", "node": "b"}})
    assert code == 400 and body["error"]["code"] == "bad_request"
    user = api(x509ca.Identity(kind="user", name="bob", cluster=CLUSTER, roles=("access",)))
    code, body = _call(user, "POST", f"{AUTH}/v1/locks", {"target": {"user": "alice"}})
    assert code == 403
    node = api(x509ca.Identity(kind="node", name="n1", cluster=CLUSTER, uuid="u1"))
    code, _ = _call(node, "DELETE", f"{AUTH}/v1/locks/{lock['id']}")
    assert code == 403
    code, _ = _call(admin, "DELETE", f"{AUTH}/v1/locks/{lock['id']}")
    assert code == 200
    code, body = _call(admin, "DELETE", f"{AUTH}/v1/locks/{lock['id']}")
    assert code == 404


def test_app_jwt_key_rotation_is_for_cert_authority_admins_and_audited(api, auth):
    """``edgectl apps rotate-jwt-key`` and ``jwt-keys`` over the auth API."""
    editor = x509ca.Identity(kind="user", name="ed", cluster=CLUSTER, roles=("editor",))
    code, body = _call(api(editor), "POST", f"{AUTH}/v1/apps/jwt_keys/rotate", {})
    assert code == 403, body
    code, before = _call(api(ADMIN), "GET", f"{AUTH}/v1/apps/jwt_keys")
    assert code == 200 and [k["status"] for k in before] == ["signing"]
    code, body = _call(api(ADMIN), "POST", f"{AUTH}/v1/apps/jwt_keys/rotate", {})
    assert code == 200, body
    assert {k["kid"]: k["status"] for k in body["keys"]} == {
        before[0]["kid"]: "retired", body["kid"]: "signing"}
    assert all("private" not in json.dumps(k) for k in body["keys"])
    code, after = _call(api(ADMIN), "GET", f"{AUTH}/v1/apps/jwt_keys")
    assert [k["kid"] for k in after] == [before[0]["kid"], body["kid"]]
    (event,) = auth.audit.named("app.jwt_key.rotated")
    assert event["kid"] == body["kid"] and event["user"] == "admin:admin"
