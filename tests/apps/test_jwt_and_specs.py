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
    keys = AppSigningKeys(backend, "prod", clock)
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
    other = AppSigningKeys(backend, "prod", clock)
    await other.load()
    assert other.jwks() == keys.jwks()


@pytest_twisted.ensureDeferred
async def test_rotation_keeps_old_public_keys_for_a_while():
    clock = Clock()
    clock.advance(1_800_000_000)
    keys = AppSigningKeys(MemoryBackend(clock), "prod", clock)
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
    proxy = AppSigningKeys(backend, "prod", clock)
    await proxy.load()
    before = proxy.assertion(user="a", roles=[], audience="u")
    old_kid = jwt.get_unverified_header(before)["kid"]
    rotator = AppSigningKeys(backend, "prod", clock)
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
