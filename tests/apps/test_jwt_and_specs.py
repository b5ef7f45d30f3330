"""App assertions (claims, JWKS, rotation) and the node's ``--app`` values."""

from __future__ import annotations

import json
import jwt
import pytest
import pytest_twisted
from twisted.internet.task import Clock

from edgeaccess import errors
from edgeaccess.apps.jwt import AppSigningKeys
from edgeaccess.apps.spec import parse_app
from edgeaccess.backend.memory import MemoryBackend
from edgeaccess.pki import castore

#: The cluster's CA key (edgeaccess.pki.castore): it seals the assertion keys.
CA_KEY = bytes(range(32))


def verify(keys: AppSigningKeys, token: bytes, audience: str) -> dict:
    kid = jwt.get_unverified_header(token)["kid"]
    (jwk,) = [k for k in keys.jwks()["keys"] if k["kid"] == kid]
    return jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=["ES256"], audience=audience,
                      options={"verify_exp": False, "verify_iat": False, "verify_nbf": False})


@pytest_twisted.ensureDeferred
async def test_assertions_carry_the_claims_and_verify_with_the_jwks():
    clock = Clock()
    clock.advance(1_800_000_000)
    backend = MemoryBackend(clock)
    keys = AppSigningKeys(backend, "prod", clock, CA_KEY)
    await keys.load()
    token = keys.assertion(user="alice", roles=["dev"], audience="http://10.0.0.5:8080")
    claims = verify(keys, token, "http://10.0.0.5:8080")
    assert claims["sub"] == claims["username"] == "alice"
    assert claims["roles"] == ["dev"] and claims["iss"] == "prod"
    assert claims["iat"] == claims["nbf"] == 1_800_000_000
    assert claims["exp"] - claims["iat"] == 600
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    # Reused for a minute, then signed afresh.
    assert keys.assertion(user="alice", roles=["dev"], audience="http://10.0.0.5:8080") == token
    clock.advance(61)
    assert keys.assertion(user="alice", roles=["dev"], audience="http://10.0.0.5:8080") != token
    # Another proxy on the same backend loads the same key.
    other = AppSigningKeys(backend, "prod", clock, CA_KEY)
    await other.load()
    assert other.jwks() == keys.jwks()


@pytest_twisted.ensureDeferred
async def test_rotation_keeps_old_public_keys_for_a_while():
    clock = Clock()
    clock.advance(1_800_000_000)
    keys = AppSigningKeys(MemoryBackend(clock), "prod", clock, CA_KEY)
    await keys.load()
    old = keys.assertion(user="a", roles=[], audience="u")
    new_kid = await keys.rotate()
    new = keys.assertion(user="a", roles=[], audience="u")
    assert jwt.get_unverified_header(new)["kid"] == new_kid
    assert {k["kid"] for k in keys.jwks()["keys"]} == {
        jwt.get_unverified_header(old)["kid"], new_kid}
    verify(keys, old, "u")  # still verifiable
    clock.advance(16 * 60)
    await keys.load()
    assert [k["kid"] for k in keys.jwks()["keys"]] == [new_kid]


@pytest_twisted.ensureDeferred
async def test_a_rotation_through_one_proxy_is_followed_by_the_others():
    """The key lives in the backend: another proxy (or edgectl's auth API)
    rotates; this one follows at its next reload; a token signed before the
    rotation verifies against the JWKS for longer than it lives, then its kid
    leaves the JWKS."""
    from edgeaccess.apps.jwt import ASSERTION_TTL, RETIRED_KEEP

    clock = Clock()
    clock.advance(1_800_000_000)
    backend = MemoryBackend(clock)
    proxy = AppSigningKeys(backend, "prod", clock, CA_KEY)
    await proxy.load()
    before = proxy.assertion(user="a", roles=[], audience="u")
    old_kid = jwt.get_unverified_header(before)["kid"]
    rotator = AppSigningKeys(backend, "prod", clock, CA_KEY)
    await rotator.load()
    new_kid = await rotator.rotate()
    assert new_kid != old_kid
    await proxy.reload()
    after = proxy.assertion(user="a", roles=[], audience="u")
    assert jwt.get_unverified_header(after)["kid"] == new_kid
    assert {k["kid"]: k["status"] for k in proxy.describe()} == {
        old_kid: "retired", new_kid: "signing"}
    assert RETIRED_KEEP >= ASSERTION_TTL
    clock.advance(ASSERTION_TTL.total_seconds() - 1)
    await proxy.reload()
    verify(proxy, before, "u")  # still valid, still verifiable
    clock.advance((RETIRED_KEEP - ASSERTION_TTL).total_seconds() + 2)
    await proxy.reload()
    assert [k["kid"] for k in proxy.jwks()["keys"]] == [new_kid]
    # A later rotation drops the long-retired key from the backend too.
    third = await rotator.rotate()
    stored = [k["kid"] for k in json.loads(
        (await backend.get("/apps/jwt_keys")).value)["keys"]]
    assert stored == [new_kid, third]


@pytest_twisted.ensureDeferred
async def test_a_connection_s_assertion_source_reuses_refreshes_and_follows_a_rotation():
    clock = Clock()
    clock.advance(1_800_000_000)
    keys = AppSigningKeys(MemoryBackend(clock), "prod", clock, CA_KEY)
    await keys.load()
    source = keys.assertions_for(user="a", roles=["dev"], audience="u", session="s")
    token = source()
    assert source() == token == keys.assertion(user="a", roles=["dev"], audience="u",
                                               session="s")
    clock.advance(61)
    fresh = source()
    assert fresh != token and verify(keys, fresh, "u")["iat"] == 1_800_000_061
    new_kid = await keys.rotate()
    assert jwt.get_unverified_header(source())["kid"] == new_kid


def _legacy_record() -> tuple[bytes, str]:
    """``/apps/jwt_keys`` as edgeaccess wrote it before sealing: PEM in the clear."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode("ascii")
    return json.dumps({"keys": [{"kid": "0123456789abcdef", "private_key": pem,
                                 "retired": None}]}).encode(), pem


@pytest_twisted.ensureDeferred
async def test_the_private_keys_are_sealed_at_rest_with_the_ca_key():
    clock = Clock()
    clock.advance(1_800_000_000)
    backend = MemoryBackend(clock)
    keys = AppSigningKeys(backend, "prod", clock, CA_KEY)
    await keys.load()
    await keys.rotate()  # two keys, both sealed
    stored = (await backend.get("/apps/jwt_keys")).value
    assert b"PRIVATE" not in stored and b"BEGIN" not in stored and b"private_key" not in stored
    record = json.loads(stored)
    assert record["version"] == 2 and record["key_id"] == castore.key_id(CA_KEY)
    assert [set(k) for k in record["keys"]] == [{"kid", "sealed", "retired"}] * 2
    for key in record["keys"]:  # bound to the cluster and the kid
        plain = castore.unseal(CA_KEY, "prod", f"app-jwt:{key['kid']}", key["sealed"])
        assert plain.startswith(b"0\x81")  # a PKCS#8 DER EC key
        with pytest.raises(castore.CASetError):
            castore.unseal(CA_KEY, "other", f"app-jwt:{key['kid']}", key["sealed"])
    token = keys.assertion(user="a", roles=[], audience="u")
    other = AppSigningKeys(backend, "prod", clock, lambda: CA_KEY)  # a second proxy
    await other.load()
    assert other.jwks() == keys.jwks()
    verify(other, token, "u")


@pytest_twisted.ensureDeferred
async def test_keys_sealed_with_another_ca_key_are_refused_clearly():
    clock = Clock()
    backend = MemoryBackend(clock)
    await AppSigningKeys(backend, "prod", clock, CA_KEY).load()
    other_key = b"\x01" * 32
    stranger = AppSigningKeys(backend, "prod", clock, other_key)
    with pytest.raises(castore.CAKeyError) as refused:
        await stranger.load()
    message = str(refused.value)
    assert castore.key_id(CA_KEY) in message and castore.key_id(other_key) in message
    assert "same CA key" in message
    assert not stranger.loaded
    with pytest.raises(castore.CAKeyError):
        await stranger.rotate()
    # No key at all (the proxy's CAs are not loaded yet): refused too.
    with pytest.raises(castore.CAKeyError):
        await AppSigningKeys(backend, "prod", clock, lambda: None).load()


@pytest_twisted.ensureDeferred
async def test_an_altered_or_moved_sealed_key_is_refused():
    clock = Clock()
    backend = MemoryBackend(clock)
    keys = AppSigningKeys(backend, "prod", clock, CA_KEY)
    await keys.load()
    await keys.rotate()
    item = await backend.get("/apps/jwt_keys")
    record = json.loads(item.value)
    first, second = record["keys"]
    first["sealed"], second["sealed"] = second["sealed"], first["sealed"]  # moved
    await backend.put("/apps/jwt_keys", json.dumps(record).encode())
    with pytest.raises(castore.CASetError, match="does not unseal"):
        await AppSigningKeys(backend, "prod", clock, CA_KEY).load()


@pytest_twisted.ensureDeferred
async def test_an_unsealed_record_is_sealed_on_first_start_and_signs_as_before():
    from twisted.logger import globalLogPublisher

    clock = Clock()
    clock.advance(1_800_000_000)
    backend = MemoryBackend(clock)
    legacy, pem = _legacy_record()
    await backend.create("/apps/jwt_keys", legacy)
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        keys = AppSigningKeys(backend, "prod", clock, CA_KEY)
        await keys.load()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    stored = (await backend.get("/apps/jwt_keys")).value
    assert pem.encode() not in stored and b"PRIVATE" not in stored
    record = json.loads(stored)
    assert record["version"] == 2 and [k["kid"] for k in record["keys"]] == [
        "0123456789abcdef"]
    assert any("were stored unsealed" in e.get("log_format", "") for e in logged)
    # The same key as before: a token verifies with the public key of the old PEM.
    from cryptography.hazmat.primitives import serialization

    token = keys.assertion(user="a", roles=[], audience="u")
    public = serialization.load_pem_private_key(pem.encode(), None).public_key()
    assert jwt.decode(token, public, algorithms=["ES256"], audience="u",
                      options={"verify_exp": False, "verify_iat": False,
                               "verify_nbf": False})["sub"] == "a"
    assert jwt.get_unverified_header(token)["kid"] == "0123456789abcdef"


@pytest_twisted.ensureDeferred
async def test_a_rotation_of_an_unsealed_record_seals_it_too():
    clock = Clock()
    clock.advance(1_800_000_000)
    backend = MemoryBackend(clock)
    legacy, pem = _legacy_record()
    await backend.create("/apps/jwt_keys", legacy)
    # edgectl's rotate endpoint loads first; rotate() on its own seals too.
    keys = AppSigningKeys(backend, "prod", clock, CA_KEY)
    new_kid = await keys.rotate()
    record = json.loads((await backend.get("/apps/jwt_keys")).value)
    assert record["version"] == 2
    assert [(k["kid"], k["retired"] is None) for k in record["keys"]] == [
        ("0123456789abcdef", False), (new_kid, True)]
    assert all("sealed" in k and "private_key" not in k for k in record["keys"])


def test_app_values_are_parsed_and_checked():
    app = parse_app("name=grafana,uri=https://10.0.0.5:3000/,labels=team:web;env:prod,"
                    "rewrite_host=grafana.internal,ca=/etc/ca.pem")
    assert (app.name, app.uri, app.host, app.port) == ("grafana", "https://10.0.0.5:3000",
                                                       "10.0.0.5", 3000)
    assert app.labels == {"team": "web", "env": "prod"}
    assert app.rewrite_host == "grafana.internal" and app.ca_file == "/etc/ca.pem"
    assert parse_app("name=a,uri=http://h").port == 80
    for bad in ("name=A,uri=http://h", "name=a.b,uri=http://h", "name=a,uri=ftp://h",
                "name=a", "uri=http://h", "name=a,uri=http://h,labels=nocolon",
                "name=a,uri=http://h,color=red", "name=a,uri=http://u:p@h",
                "name=a,uri=http://h:99999", "name=a,name=b,uri=http://h"):
        with pytest.raises(errors.BadRequest):
            parse_app(bad)
