"""AuthServer business logic over a MemoryBackend and a fake clock (no sockets)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import ssh
from twisted.logger import capturedLogs

from authkit import CLUSTER, PASSWORD, START, add_user, resolve
from edgeaccess import errors
from edgeaccess.auth import service as auth_service
from edgeaccess.pki import keys, sshca, x509ca

NOW = datetime.fromtimestamp(START, timezone.utc)


def _ssh_public(key=None) -> str:
    key = key or keys.generate_private_key()
    return keys.public_key_openssh(key).decode()


def _pem_public(key) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _login(auth, user="alice", password=PASSWORD, **kwargs):
    return resolve(auth.login(username=user, password=password,
                              ssh_public_key=_ssh_public(), **kwargs))


def _role_doc(name: str, spec: dict) -> dict:
    return {"kind": "role", "version": "v1", "metadata": {"name": name}, "spec": spec}


def _join(auth, name="web1", uuid="6f1c3c5e-8a51-4d6e-9a8e-1b2c3d4e5f60", token=None):
    token = token or resolve(auth.create_token("node"))["token"]
    ssh_key = keys.generate_private_key()
    tls_key = keys.generate_private_key()
    result = resolve(auth.join_node(token=token, name=name, uuid=uuid,
                                    ssh_public_key=_ssh_public(ssh_key),
                                    tls_public_key=_pem_public(tls_key)))
    return result, ssh_key


# --- login -----------------------------------------------------------------

def test_login_certificate_principals_are_the_users_logins(auth, authority):
    add_user(auth, "alice", logins=("root", "alice"))
    user_key = keys.generate_private_key()
    certs = resolve(auth.login(username="alice", password=PASSWORD,
                               ssh_public_key=_ssh_public(user_key)))

    cert = sshca.load_certificate(certs.ssh_certificate)
    cert.verify_cert_signature()
    assert keys.public_key_openssh(cert.signature_key()) == \
        keys.public_key_openssh(authority.ssh_user_ca)
    assert keys.public_key_openssh(cert.public_key()) == keys.public_key_openssh(user_key)
    assert cert.type == ssh.SSHCertificateType.USER
    assert sorted(p.decode() for p in cert.valid_principals) == ["alice", "root"]
    assert cert.key_id == b"alice"
    assert b"permit-pty" in cert.extensions
    assert json.loads(cert.extensions[sshca.EXT_ROLES.encode()]) == ["access"]
    assert cert.extensions[sshca.EXT_CLUSTER.encode()] == CLUSTER.encode()
    # the preset access role grants port and agent forwarding
    assert b"permit-port-forwarding" in cert.extensions
    assert b"permit-agent-forwarding" in cert.extensions
    assert cert.valid_after == int(START) - 60
    assert cert.valid_before == int(START) + 12 * 3600
    assert certs.valid_before == NOW + timedelta(hours=12)
    assert sorted(certs.logins) == ["alice", "root"] and certs.roles == ("access",)


def test_login_tls_certificate_carries_the_user_identity(auth, authority):
    add_user(auth, "alice", logins=("root",))
    tls_key = keys.generate_private_key()
    certs = resolve(auth.login(username="alice", password=PASSWORD,
                               ssh_public_key=_ssh_public(), tls_public_key=_pem_public(tls_key)))

    cert = x509ca.load_certificate_pem(certs.tls_certificate.encode())
    cert.verify_directly_issued_by(authority.tls_ca_cert)
    assert cert.public_key() == tls_key.public_key()
    identity = x509ca.identity_from_certificate(cert)
    assert (identity.kind, identity.name, identity.cluster) == ("user", "alice", CLUSTER)
    assert identity.roles == ("access",) and identity.logins == ("root",)
    assert cert.not_valid_after_utc == NOW + timedelta(hours=12)


def test_role_without_forwarding_gives_no_forwarding_extensions(auth):
    resolve(auth.upsert_resource(_role_doc("plain", {"allow": {
        "logins": ["ops"], "node_labels": {"*": "*"}}})))
    add_user(auth, "bob", roles=("plain",), logins=())
    cert = sshca.load_certificate(_login(auth, "bob").ssh_certificate)
    assert [p.decode() for p in cert.valid_principals] == ["ops"]
    assert b"permit-pty" in cert.extensions
    assert b"permit-port-forwarding" not in cert.extensions
    assert b"permit-agent-forwarding" not in cert.extensions


@pytest.mark.parametrize("requested, expected", [
    (None, timedelta(hours=1)),            # default 12 h, capped by the role
    (timedelta(hours=8), timedelta(hours=1)),
    (timedelta(minutes=20), timedelta(minutes=20)),
])
def test_certificate_ttl_is_capped_by_the_roles_max_session_ttl(auth, requested, expected):
    resolve(auth.upsert_resource(_role_doc("short", {
        "options": {"max_session_ttl": "1h"},
        "allow": {"logins": ["{{internal.logins}}"], "node_labels": {"*": "*"}}})))
    add_user(auth, "carol", roles=("short", "access"), logins=("carol",))
    certs = _login(auth, "carol", ttl=requested)
    cert = sshca.load_certificate(certs.ssh_certificate)
    assert cert.valid_before == int(START + expected.total_seconds())
    assert certs.valid_before == NOW + expected


def test_too_short_ttl_is_refused(auth):
    add_user(auth, "alice")
    with pytest.raises(errors.BadRequest, match="too short"):
        _login(auth, ttl=timedelta(seconds=10))


def test_login_with_a_malformed_public_key_is_a_bad_request(auth):
    add_user(auth, "alice")
    with pytest.raises(errors.BadRequest, match="ssh_public_key"):
        resolve(auth.login(username="alice", password=PASSWORD,
                           ssh_public_key="ssh-ed25519 not-base64"))


def test_wrong_password_is_refused(auth, audit):
    add_user(auth, "alice")
    with pytest.raises(errors.AuthenticationFailed) as refused:
        _login(auth, password="wrong password")
    assert str(refused.value) == "invalid username or password"
    assert audit.named("user.login")[-1]["success"] is False


def test_unknown_user_is_refused_with_the_same_message(auth):
    add_user(auth, "alice")
    with pytest.raises(errors.AuthenticationFailed) as wrong_password:
        _login(auth, "alice", password="wrong password")
    with pytest.raises(errors.AuthenticationFailed) as unknown:
        _login(auth, "mallory", password="wrong password")
    assert type(unknown.value) is type(wrong_password.value)
    assert str(unknown.value) == str(wrong_password.value)
    # and it still ran bcrypt, so both take as long
    assert "check_password" in auth._threadpool.calls[-1:]


def test_user_without_password_cannot_log_in(auth):
    add_user(auth, "dave", password=None)
    with pytest.raises(errors.AuthenticationFailed):
        _login(auth, "dave", password="anything at all")


def test_five_failures_lock_the_account_even_for_the_right_password(auth, clock, audit):
    add_user(auth, "alice")
    with capturedLogs() as logged:
        for _ in range(5):
            with pytest.raises(errors.AuthenticationFailed) as refused:
                _login(auth, password="wrong password")
            assert not isinstance(refused.value, errors.AccountLocked)
            clock.advance(1)
    assert any("account now locked" in e["log_format"].format(**e) for e in logged)
    assert len(audit.named("user.locked")) == 1

    with pytest.raises(errors.AccountLocked, match="locked"):
        _login(auth)
    listed = {u["name"]: u for u in resolve(auth.list_users())}
    assert listed["alice"]["locked"] is True

    clock.advance(29 * 60)
    with pytest.raises(errors.AccountLocked):
        _login(auth)
    clock.advance(60)
    assert _login(auth).username == "alice"
    assert {u["name"]: u for u in resolve(auth.list_users())}["alice"]["locked"] is False


def test_a_successful_login_resets_the_failure_count(auth):
    add_user(auth, "alice")
    for _ in range(4):
        with pytest.raises(errors.AuthenticationFailed):
            _login(auth, password="wrong password")
    _login(auth)
    for _ in range(4):
        with pytest.raises(errors.AuthenticationFailed) as refused:
            _login(auth, password="wrong password")
        assert not isinstance(refused.value, errors.AccountLocked)
    assert _login(auth).username == "alice"


def test_lockout_of_one_user_leaves_others_alone(auth):
    add_user(auth, "alice")
    add_user(auth, "bob")
    for _ in range(5):
        with pytest.raises(errors.AuthenticationFailed):
            _login(auth, "alice", password="wrong password")
    assert _login(auth, "bob").username == "bob"


# --- signup and users ------------------------------------------------------

def test_signup_token_sets_the_password_once(auth):
    token = resolve(auth.create_user("erin", ["access"], ["erin"]))
    assert resolve(auth.signup_user(token)) == "erin"
    assert resolve(auth.complete_signup(token, PASSWORD)) == "erin"
    assert _login(auth, "erin").username == "erin"
    with pytest.raises(errors.TokenInvalid):
        resolve(auth.complete_signup(token, "another password"))


def test_signup_token_expires(auth, clock):
    token = resolve(auth.create_user("erin", ["access"], []))
    clock.advance(auth_service.SIGNUP_TTL.total_seconds() + 1)
    with pytest.raises(errors.TokenInvalid):
        resolve(auth.complete_signup(token, PASSWORD))


def test_create_user_with_an_unknown_role_is_refused(auth):
    with pytest.raises(errors.BadRequest, match="unknown role.*nosuchrole"):
        resolve(auth.create_user("frank", ["access", "nosuchrole"], []))
    with pytest.raises(errors.NotFound):
        resolve(auth.get_user("frank"))


def test_create_user_needs_a_role_and_valid_logins(auth):
    with pytest.raises(errors.BadRequest, match="at least one role"):
        resolve(auth.create_user("frank", [], []))
    with pytest.raises(errors.BadRequest, match="invalid login"):
        resolve(auth.create_user("frank", ["access"], ["Not A Login"]))


def test_create_user_twice_is_refused(auth):
    add_user(auth, "alice")
    with pytest.raises(errors.AlreadyExists):
        resolve(auth.create_user("alice", ["access"], []))


def test_deleted_user_cannot_log_in(auth):
    add_user(auth, "alice")
    resolve(auth.delete_user("alice"))
    assert [u["name"] for u in resolve(auth.list_users())] == []
    with pytest.raises(errors.AuthenticationFailed):
        _login(auth)
    with pytest.raises(errors.NotFound):
        resolve(auth.delete_user("alice"))


def test_user_listing_never_shows_the_password_hash(auth):
    add_user(auth, "alice")
    listed = resolve(auth.list_users())
    assert listed[0]["has_password"] is True
    assert "password_hash" not in json.dumps(listed)


# --- join tokens -----------------------------------------------------------

def test_created_token_checks_until_it_expires(auth, clock):
    record = resolve(auth.create_token("node", timedelta(minutes=10)))
    assert record["type"] == "node"
    assert record["expires"] == "2027-01-15T08:10:00Z"
    assert resolve(auth.check_token(record["token"], "node"))["token"] == record["token"]
    clock.advance(10 * 60)
    with pytest.raises(errors.TokenInvalid, match="expired"):
        resolve(auth.check_token(record["token"], "node"))


def test_unknown_token_is_refused(auth):
    with pytest.raises(errors.TokenInvalid):
        resolve(auth.check_token("0" * 32, "node"))


@pytest.mark.parametrize("token", ["../users/alice", "", "x" * 65, 42])
def test_malformed_token_is_refused(auth, token):
    with pytest.raises(errors.TokenInvalid):
        resolve(auth.check_token(token, "node"))


def test_token_of_another_type_is_refused(auth):
    record = resolve(auth.create_token("trusted_cluster"))
    with pytest.raises(errors.TokenInvalid, match="not a node token"):
        resolve(auth.check_token(record["token"], "node"))


@pytest.mark.parametrize("kind, ttl", [
    ("admin", None), ("node", timedelta(0)), ("node", timedelta(days=8)),
])
def test_bad_token_requests_are_refused(auth, kind, ttl):
    with pytest.raises(errors.BadRequest):
        resolve(auth.create_token(kind, ttl))


def test_deleted_token_no_longer_checks(auth):
    record = resolve(auth.create_token("node"))
    assert [t["token"] for t in resolve(auth.list_tokens())] == [record["token"]]
    resolve(auth.delete_token(record["token"]))
    with pytest.raises(errors.TokenInvalid):
        resolve(auth.check_token(record["token"], "node"))
    with pytest.raises(errors.NotFound):
        resolve(auth.delete_token(record["token"]))


# --- nodes -----------------------------------------------------------------

def test_join_signs_a_host_certificate_with_the_node_principals(auth, authority, audit):
    node_uuid = "6f1c3c5e-8a51-4d6e-9a8e-1b2c3d4e5f60"
    result, ssh_key = _join(auth, "web1", node_uuid)
    cert = sshca.load_certificate(result["ssh_host_certificate"])
    cert.verify_cert_signature()
    assert keys.public_key_openssh(cert.signature_key()) == \
        keys.public_key_openssh(authority.ssh_host_ca)
    assert keys.public_key_openssh(cert.public_key()) == keys.public_key_openssh(ssh_key)
    assert cert.type == ssh.SSHCertificateType.HOST
    assert [p.decode() for p in cert.valid_principals] == [
        "web1", f"web1.{CLUSTER}", node_uuid, f"{node_uuid}.{CLUSTER}"]
    assert cert.valid_after == int(START) - 60
    assert cert.valid_before == int(START + auth_service.NODE_CERT_TTL.total_seconds())

    identity = x509ca.identity_from_certificate(
        x509ca.load_certificate_pem(result["tls_certificate"].encode()))
    assert (identity.kind, identity.name, identity.uuid, identity.cluster) == \
        ("node", "web1", node_uuid, CLUSTER)
    assert result["ssh_user_ca"] == [authority.user_ca_public_line]
    assert result["tls_ca"] == authority.tls_ca_pem
    assert audit.named("node.join")[-1]["success"] is True


def test_join_with_an_expired_token_is_refused(auth, clock, audit):
    token = resolve(auth.create_token("node", timedelta(minutes=1)))["token"]
    clock.advance(61)
    with pytest.raises(errors.TokenInvalid):
        _join(auth, token=token)
    assert audit.named("node.join")[-1]["success"] is False


def test_join_with_an_unknown_token_is_refused(auth):
    with pytest.raises(errors.TokenInvalid):
        _join(auth, token="f" * 32)


def test_join_with_a_bad_uuid_is_refused(auth):
    with pytest.raises(errors.BadRequest, match="uuid"):
        _join(auth, uuid="not-a-uuid")


def _node_identity(name="web1", uuid="6f1c3c5e-8a51-4d6e-9a8e-1b2c3d4e5f60"):
    return x509ca.Identity(kind="node", name=name, cluster=CLUSTER, uuid=uuid)


def test_heartbeat_registers_the_node(auth):
    node = _node_identity()
    stored = resolve(auth.heartbeat(node, {"name": "web1", "address": "10.0.0.5:3022",
                                           "labels": {"env": "dev"}}))
    assert stored["last_heartbeat"] == "2027-01-15T08:00:00Z"
    [listed] = resolve(auth.list_nodes())
    assert (listed["name"], listed["uuid"], listed["address"], listed["labels"]) == \
        ("web1", node.uuid, "10.0.0.5:3022", {"env": "dev"})
    assert listed["id"] == node.uuid
    assert resolve(auth.find_node("web1"))["uuid"] == node.uuid
    assert resolve(auth.find_node(node.uuid))["name"] == "web1"


def test_node_listening_everywhere_is_dialled_where_it_came_from(auth):
    stored = resolve(auth.heartbeat(_node_identity(), {"name": "web1", "address": "0.0.0.0:3022"},
                                    remote_addr="192.0.2.7"))
    assert stored["address"] == "192.0.2.7:3022"


@pytest.mark.parametrize("record", [
    {"name": "db1"},
    {"name": "web1", "uuid": "00000000-0000-4000-8000-000000000000"},
])
def test_a_node_can_only_register_as_itself(auth, record):
    with pytest.raises(errors.AccessDenied, match="itself"):
        resolve(auth.heartbeat(_node_identity(), record))
    assert resolve(auth.list_nodes()) == []


def test_only_nodes_send_heartbeats(auth):
    user = x509ca.Identity(kind="user", name="web1", cluster=CLUSTER)
    with pytest.raises(errors.AccessDenied):
        resolve(auth.heartbeat(user, {"name": "web1"}))


@pytest.mark.parametrize("record", [
    {"name": "web1", "labels": {"env": 1}},
    {"name": "web1", "labels": ["env"]},
    {"name": "web1", "address": "host-without-port"},
])
def test_malformed_heartbeats_are_refused(auth, record):
    with pytest.raises(errors.BadRequest):
        resolve(auth.heartbeat(_node_identity(), record))


def test_stale_nodes_disappear_after_node_ttl(auth, clock):
    resolve(auth.heartbeat(_node_identity(), {"name": "web1", "address": "10.0.0.5:3022"}))
    clock.advance(auth_service.NODE_TTL.total_seconds() - 1)
    resolve(auth.heartbeat(_node_identity("db1", "00000000-0000-4000-8000-000000000001"),
                           {"name": "db1"}))
    assert [n["name"] for n in resolve(auth.list_nodes())] == ["db1", "web1"]
    clock.advance(1)
    assert [n["name"] for n in resolve(auth.list_nodes())] == ["db1"]
    assert resolve(auth.find_node("web1")) is None


def test_renewal_keeps_the_nodes_name_and_uuid(auth):
    node = _node_identity()
    result = auth.renew_node(node, _ssh_public(), _pem_public(keys.generate_private_key()))
    cert = sshca.load_certificate(result["ssh_host_certificate"])
    assert cert.key_id == node.uuid.encode()
    assert (result["name"], result["uuid"]) == ("web1", node.uuid)
    with pytest.raises(errors.AccessDenied):
        auth.renew_node(x509ca.Identity(kind="user", name="web1", cluster=CLUSTER),
                        _ssh_public(), _pem_public(keys.generate_private_key()))


# --- resources -------------------------------------------------------------

def test_bootstrap_creates_the_preset_roles_once(auth):
    resolve(auth.bootstrap())
    names = sorted(d["metadata"]["name"] for d in resolve(auth.get_resources("role")))
    assert names == ["access", "auditor", "editor"]


def test_role_upsert_get_and_delete(auth, audit):
    doc = _role_doc("dev", {"allow": {"logins": ["ubuntu"], "node_labels": {"env": "dev"}}})
    resolve(auth.upsert_resource(doc))
    [stored] = resolve(auth.get_resources("role", "dev"))
    assert stored["metadata"]["name"] == "dev"
    assert stored["spec"]["allow"]["logins"] == ["ubuntu"]
    assert audit.named("role.created") == [{"name": "dev"}]

    resolve(auth.delete_resource("role", "dev"))
    with pytest.raises(errors.NotFound, match="role dev not found"):
        resolve(auth.get_resources("role", "dev"))
    with pytest.raises(errors.NotFound):
        resolve(auth.delete_resource("role", "dev"))


def test_duplicate_role_needs_force(auth):
    resolve(auth.upsert_resource(_role_doc("dev", {"allow": {"logins": ["ubuntu"]}})))
    replacement = _role_doc("dev", {"allow": {"logins": ["debian"]}})
    with pytest.raises(errors.AlreadyExists, match="--force"):
        resolve(auth.upsert_resource(replacement))
    assert resolve(auth.get_resources("role", "dev"))[0]["spec"]["allow"]["logins"] == ["ubuntu"]
    resolve(auth.upsert_resource(replacement, force=True))
    assert resolve(auth.get_resources("role", "dev"))[0]["spec"]["allow"]["logins"] == ["debian"]


@pytest.mark.parametrize("doc, message", [
    ({"kind": "gadget", "version": "v1", "metadata": {"name": "x"}}, "unknown resource kind"),
    ({"kind": "role", "version": "v1", "metadata": {}}, "metadata.name"),
    ({"kind": "role", "version": "v1"}, "metadata"),
])
def test_invalid_resources_are_refused(auth, doc, message):
    with pytest.raises(errors.BadResource, match=message):
        resolve(auth.upsert_resource(doc))


def test_unknown_kinds_are_refused_when_reading_or_deleting(auth):
    with pytest.raises(errors.BadRequest, match="unknown resource kind"):
        resolve(auth.get_resources("gadget"))
    with pytest.raises(errors.BadRequest, match="unknown resource kind"):
        resolve(auth.delete_resource("gadget", "x"))


def test_a_new_role_applies_to_the_next_login(auth):
    resolve(auth.upsert_resource(_role_doc("ops", {"allow": {"logins": ["ops"]}})))
    add_user(auth, "alice", roles=("ops",), logins=())
    assert _login(auth).logins == ("ops",)
    resolve(auth.upsert_resource(_role_doc("ops", {"allow": {"logins": ["ops", "deploy"]}}),
                                 force=True))
    assert sorted(_login(auth).logins) == ["deploy", "ops"]


def test_status_has_the_ca_pin(auth, authority):
    status = auth.status()
    assert status["cluster_name"] == CLUSTER
    assert status["ca_pin"] == x509ca.ca_pin(authority.tls_ca_cert)


def test_a_locked_user_gets_no_certificate_until_the_lock_goes(auth, audit):
    add_user(auth, "alice")
    lock = resolve(auth.create_lock({"user": "alice"}, message="incident 7",
                                    created_by="admin:admin"))
    with pytest.raises(errors.AccessDenied, match="incident 7"):
        _login(auth)
    refused = [e for e in audit.named("user.login") if e.get("lock_id") == lock["id"]]
    assert refused and refused[0]["success"] is False
    assert audit.named("lock.created")[0]["target"] == {"user": "alice"}
    resolve(auth.delete_lock(lock["id"], deleted_by="admin:admin"))
    assert _login(auth).username == "alice"
    assert audit.named("lock.deleted")[0]["lock_id"] == lock["id"]


def test_locks_are_validated_listed_and_expire(auth, clock):
    with pytest.raises(errors.BadRequest):
        resolve(auth.create_lock({"team": "x"}))
    with pytest.raises(errors.BadRequest):
        resolve(auth.create_lock({"user": "a"}, ttl=timedelta(0)))
    short = resolve(auth.create_lock({"node": "web1"}, ttl=timedelta(seconds=10)))
    forever = resolve(auth.create_lock({"user": "bob"}))
    assert {l["id"] for l in resolve(auth.list_locks())} == {short["id"], forever["id"]}
    clock.advance(10)
    assert [l["id"] for l in resolve(auth.list_locks())] == [forever["id"]]
    with pytest.raises(errors.NotFound):
        resolve(auth.delete_lock(short["id"]))
    with pytest.raises(errors.NotFound):
        resolve(auth.delete_lock("../../users/alice"))
