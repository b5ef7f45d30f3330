"""The ``Edge-Jwt-Assertion`` header: the identity an app receives with each request.

A JWT (ES256, with the signing key's ``kid``) signed by the cluster that
runs the app, with the claims ``sub`` and ``username`` (the user),
``roles``, ``iss`` (the cluster), ``aud`` (the app's URI), ``iat``, ``nbf``
and ``exp`` (at most 10 minutes later). Apps verify it with the public keys
the proxy serves at ``/.well-known/jwks.json``.

The keys live in the backend (``/apps/jwt_keys``), so every proxy of a
cluster signs with the same key; :meth:`AppSigningKeys.rotate` adds a new
signing key and keeps the old public keys in the JWKS until tokens signed
with them have expired.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timedelta, timezone

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from twisted.logger import Logger

from edgeaccess import errors
from edgeaccess.backend.interfaces import CompareFailed

_log = Logger()

KEYS_KEY = "/apps/jwt_keys"
#: Lifetime of one assertion (SPEC: ``exp`` within 10 minutes).
ASSERTION_TTL = timedelta(minutes=10)
#: An assertion is re-signed once it is this old (so each is used for at most a minute).
REFRESH_AFTER = 60.0
#: How long a retired key stays in the JWKS (covers every token it signed).
RETIRED_KEEP = ASSERTION_TTL + timedelta(minutes=5)

HEADER = b"Edge-Jwt-Assertion"


def _new_key() -> dict:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode("ascii")
    return {"kid": secrets.token_hex(8), "private_key": pem, "retired": None}


class AppSigningKeys:
    """The cluster's app-assertion keys, loaded from and kept in the backend.

    :param backend: an ``IBackend``.
    :param cluster: the cluster name (``iss``).
    :param clock: ``IReactorTime``.
    """

    def __init__(self, backend, cluster: str, clock) -> None:
        self.backend = backend
        self.cluster = cluster
        self.clock = clock
        self._keys: list[dict] = []
        self._signing = None
        self._jwks: dict | None = None
        self._cache: dict[tuple, tuple[float, bytes]] = {}

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), timezone.utc)

    async def load(self) -> None:
        """Load the keys, creating the first one on a new cluster."""
        try:
            item = await self.backend.get(KEYS_KEY)
        except errors.NotFound:
            try:
                await self.backend.create(KEYS_KEY, json.dumps({"keys": [_new_key()]}).encode())
                _log.info("created the app assertion signing key")
            except errors.AlreadyExists:
                pass  # another proxy of the cluster was first
            item = await self.backend.get(KEYS_KEY)
        self._use(json.loads(item.value)["keys"])

    async def reload(self) -> None:
        """Read the keys again (every few seconds): a rotation made through any
        proxy is followed here, and a retired key leaves the JWKS once its grace
        is over."""
        item = await self.backend.get(KEYS_KEY)
        self._use(json.loads(item.value)["keys"])

    def _use(self, keys: list[dict]) -> None:
        now = self._now()
        kept = [k for k in keys if k["retired"] is None
                or datetime.fromisoformat(k["retired"]) + RETIRED_KEEP > now]
        active = [k for k in kept if k["retired"] is None]
        if not active:
            raise errors.EdgeError("no active app assertion key")
        if [k["kid"] for k in kept] == [k["kid"] for k in self._keys] and \
                self._signing is not None and self._signing[0] == active[-1]["kid"]:
            return  # nothing changed: keep the parsed key and the token cache
        if self._signing is not None and self._signing[0] != active[-1]["kid"]:
            _log.info("app assertions are now signed with key {kid}", kid=active[-1]["kid"])
        self._keys = kept
        self._signing = (active[-1]["kid"], serialization.load_pem_private_key(
            active[-1]["private_key"].encode("ascii"), None))
        self._jwks = None
        self._cache.clear()

    async def rotate(self) -> str:
        """Start signing with a new key; the old one is retired (kept in the
        JWKS for :data:`RETIRED_KEEP`, longer than any token it signed lives).
        Keys retired longer ago than that are dropped from the backend.
        Returns the new ``kid``."""
        while True:
            item = await self.backend.get(KEYS_KEY)
            keys = json.loads(item.value)["keys"]
            now = self._now()
            keys = [k for k in keys if k["retired"] is None
                    or datetime.fromisoformat(k["retired"]) + RETIRED_KEEP > now]
            for key in keys:
                if key["retired"] is None:
                    key["retired"] = now.isoformat()
            new = _new_key()
            keys.append(new)
            value = json.dumps({"keys": keys}).encode()
            try:
                await self.backend.compare_and_swap(KEYS_KEY, item.value, value)
            except CompareFailed:
                continue  # rotated elsewhere meanwhile: rotate what is there now
            break
        self._use(keys)
        _log.info("app assertion key rotated: now signing with {kid}", kid=new["kid"])
        return new["kid"]

    def describe(self) -> list[dict]:
        """The keys in the JWKS: ``kid``, ``status`` (signing or retired) and
        when a retired one leaves the JWKS (no private parts)."""
        signing = self._signing[0] if self._signing else None
        found = []
        for key in self._keys:
            entry = {"kid": key["kid"], "status": "signing" if key["kid"] == signing else
                     ("retired" if key["retired"] else "active"), "retired": key["retired"],
                     "dropped_after": None}
            if key["retired"]:
                entry["dropped_after"] = (datetime.fromisoformat(key["retired"])
                                          + RETIRED_KEEP).isoformat()
            found.append(entry)
        return found

    @property
    def loaded(self) -> bool:
        return self._signing is not None

    def jwks(self) -> dict:
        """The public keys, as a JSON Web Key Set."""
        if self._jwks is not None:
            return self._jwks
        found = []
        for key in self._keys:
            private = serialization.load_pem_private_key(key["private_key"].encode("ascii"), None)
            jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
            jwk.update({"kid": key["kid"], "alg": "ES256", "use": "sig"})
            found.append(jwk)
        self._jwks = {"keys": found}
        return self._jwks

    def assertion(self, *, user: str, roles, audience: str, session: str = "") -> bytes:
        """A signed assertion for ``user`` to the app at ``audience``.

        The same token is reused for a minute (signing is the costly part
        of a small request); it is then still valid for nine more minutes.
        """
        if self._signing is None:
            raise errors.EdgeError("the app assertion key is not loaded yet")
        now = self.clock.seconds()
        key = (user, tuple(roles), audience, session)
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < REFRESH_AFTER:
            return cached[1]
        kid, private = self._signing
        issued = int(now)
        claims = {"sub": user, "username": user, "roles": list(roles), "iss": self.cluster,
                  "aud": audience, "iat": issued, "nbf": issued,
                  "exp": issued + int(ASSERTION_TTL.total_seconds())}
        token = pyjwt.encode(claims, private, algorithm="ES256", headers={"kid": kid})
        value = token.encode("ascii")
        if len(self._cache) > 10000:
            self._cache.clear()
        self._cache[key] = (now, value)
        return value
