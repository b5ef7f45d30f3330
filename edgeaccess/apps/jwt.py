"""The ``Edge-Jwt-Assertion`` header: the identity an app receives with each request.

A JWT (ES256, with the signing key's ``kid``) signed by the cluster that
runs the app, with the claims ``sub`` and ``username`` (the user),
``roles``, ``iss`` (the cluster), ``aud`` (the app's URI), ``iat``, ``nbf``
and ``exp`` (at most 10 minutes later). Apps verify it with the public keys
the proxy serves at ``/.well-known/jwks.json``.

The keys live in the backend (``/apps/jwt_keys``), so every proxy of a
cluster signs with the same key; :meth:`AppSigningKeys.rotate` adds a new
signing key and keeps the old public keys in the JWKS until tokens signed
with them have expired. The private keys are sealed there as the CAs are
(:func:`edgeaccess.pki.castore.seal`: AES-256-GCM under the cluster's CA
key, bound to the cluster and ``app-jwt:<kid>``)::

    {"version": 2, "key_id": "sha256:...",
     "keys": [{"kid": KID, "sealed": {"nonce": B64, "ciphertext": B64},
               "retired": null | ISO-TIME}]}

A record written unsealed by an older edgeaccess (``{"keys": [{"kid",
"private_key": PEM, "retired"}]}``) is sealed on the first start that reads
it; one sealed with another CA key is refused (:class:`CAKeyError`).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from twisted.logger import Logger

from edgeaccess import errors
from edgeaccess.backend.interfaces import CompareFailed
from edgeaccess.pki import castore
from edgeaccess.pki.castore import CAKeyError, CASetError

_log = Logger()

KEYS_KEY = "/apps/jwt_keys"
#: Lifetime of one assertion (SPEC: ``exp`` within 10 minutes).
ASSERTION_TTL = timedelta(minutes=10)
#: An assertion is re-signed once it is this old (so each is used for at most a minute).
REFRESH_AFTER = 60.0
#: How long a retired key stays in the JWKS (covers every token it signed).
RETIRED_KEEP = ASSERTION_TTL + timedelta(minutes=5)

HEADER = b"Edge-Jwt-Assertion"


#: The record's version with sealed keys (an unsealed one has none).
RECORD_VERSION = 2


def _sealed_name(kid: str) -> str:
    """What a key's seal is bound to (with the cluster): it cannot be moved."""
    return f"app-jwt:{kid}"


def _der(key) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _sealed_entry(ca_key: bytes, cluster: str, kid: str, private: bytes, retired) -> dict:
    return {"kid": kid, "sealed": castore.seal(ca_key, cluster, _sealed_name(kid), private),
            "retired": retired}


def _encode(ca_key: bytes, keys: list[dict]) -> bytes:
    return json.dumps({"version": RECORD_VERSION, "key_id": castore.key_id(ca_key),
                       "keys": keys}).encode()


class AppSigningKeys:
    """The cluster's app-assertion keys, loaded from and kept in the backend.

    :param backend: an ``IBackend``.
    :param cluster: the cluster name (``iss``).
    :param clock: ``IReactorTime``.
    :param ca_key: the cluster's CA key (32 bytes), or a callable returning
        it (None while the proxy has not loaded its CAs yet): the private
        keys are sealed with it in the backend.
    """

    def __init__(self, backend, cluster: str, clock, ca_key) -> None:
        self.backend = backend
        self.cluster = cluster
        self.clock = clock
        self._ca_key = ca_key
        self._keys: list[dict] = []
        #: kid -> the unsealed private key (of every key in the JWKS)
        self._private: dict[str, ec.EllipticCurvePrivateKey] = {}
        self._signing = None
        self._jwks: dict | None = None
        self._cache: dict[tuple, tuple[float, bytes]] = {}

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), timezone.utc)

    def _sealing_key(self) -> bytes:
        key = self._ca_key() if callable(self._ca_key) else self._ca_key
        if not key:
            raise CAKeyError("the app assertion keys are sealed with the cluster's CA key, "
                             "and it is not loaded")
        return key

    def _new_key(self, ca_key: bytes) -> dict:
        return _sealed_entry(ca_key, self.cluster, secrets.token_hex(8),
                             _der(ec.generate_private_key(ec.SECP256R1())), None)

    async def load(self) -> None:
        """Load the keys, creating the first one on a new cluster (and sealing
        the keys of a record an older edgeaccess stored unsealed)."""
        ca_key = self._sealing_key()
        try:
            item = await self.backend.get(KEYS_KEY)
        except errors.NotFound:
            try:
                await self.backend.create(KEYS_KEY, _encode(ca_key, [self._new_key(ca_key)]))
                _log.info("created the app assertion signing key (sealed with CA key "
                          "{key_id})", key_id=castore.key_id(ca_key))
            except errors.AlreadyExists:
                pass  # another proxy of the cluster was first
            item = None
        self._use(await self._read(item))

    async def reload(self) -> None:
        """Read the keys again (every few seconds): a rotation made through any
        proxy is followed here, and a retired key leaves the JWKS once its grace
        is over."""
        self._use(await self._read())

    async def _read(self, item=None) -> list[dict]:
        """The stored keys (still sealed), after sealing an unsealed record."""
        ca_key = self._sealing_key()
        for _attempt in range(10):
            if item is None:
                item = await self.backend.get(KEYS_KEY)
            keys = self._decode(item.value, ca_key)
            if keys is not None:
                return keys
            # Written unsealed (by an edgeaccess before sealing): seal it now.
            sealed = self._seal_unsealed(item.value, ca_key)
            try:
                await self.backend.compare_and_swap(KEYS_KEY, item.value, sealed)
            except CompareFailed:
                item = None  # changed meanwhile (another proxy sealed it): read again
                continue
            _log.warn("the app assertion keys in the backend ({key}) were stored unsealed "
                      "(by an older edgeaccess): sealed them with CA key {key_id}",
                      key=KEYS_KEY, key_id=castore.key_id(ca_key))
            return json.loads(sealed)["keys"]
        raise CASetError(f"{KEYS_KEY} in the backend kept changing while it was read")

    def _decode(self, value: bytes, ca_key: bytes) -> list[dict] | None:
        """The keys of a sealed record (None: an unsealed one)."""
        try:
            record = json.loads(value)
            keys = record["keys"]
            if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
                raise ValueError("keys")
        except (ValueError, KeyError, TypeError):
            raise CASetError(f"{KEYS_KEY} in the backend is not a set of app assertion keys")
        if "version" not in record:
            return None
        if record["version"] != RECORD_VERSION:
            raise CASetError(f"the app assertion keys in the backend have version "
                             f"{record['version']!r}; this edgeaccess reads {RECORD_VERSION}")
        stored, ours = record.get("key_id"), castore.key_id(ca_key)
        if stored != ours:
            raise CAKeyError(f"the app assertion keys in the backend ({KEYS_KEY}) are sealed "
                             f"with CA key {stored}, not with this proxy's CA key {ours} "
                             f"(give every proxy of cluster {self.cluster!r} the same CA key)")
        return keys

    def _seal_unsealed(self, value: bytes, ca_key: bytes) -> bytes:
        sealed = []
        for key in json.loads(value)["keys"]:
            try:
                private = serialization.load_pem_private_key(
                    key["private_key"].encode("ascii"), None)
            except (KeyError, TypeError, ValueError, AttributeError):
                raise CASetError(f"the unsealed app assertion key {key.get('kid')!r} in the "
                                 f"backend cannot be read")
            sealed.append(_sealed_entry(ca_key, self.cluster, key["kid"], _der(private),
                                        key.get("retired")))
        return _encode(ca_key, sealed)

    def _unseal(self, entry: dict):
        kid = entry["kid"]
        try:
            private = serialization.load_der_private_key(castore.unseal(
                self._sealing_key(), self.cluster, _sealed_name(kid), entry.get("sealed") or {}),
                None)
        except CASetError:
            raise CASetError(f"the app assertion key {kid} in the backend does not unseal with "
                             f"the CA key (altered, malformed, or sealed for another cluster)")
        except ValueError as error:
            raise CASetError(f"the app assertion key {kid} in the backend cannot be read: "
                             f"{error}")
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise CASetError(f"the app assertion key {kid} in the backend is no EC key")
        return private

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
        private = {k["kid"]: self._private.get(k["kid"]) or self._unseal(k) for k in kept}
        if self._signing is not None and self._signing[0] != active[-1]["kid"]:
            _log.info("app assertions are now signed with key {kid}", kid=active[-1]["kid"])
        self._keys = kept
        self._private = private
        self._signing = (active[-1]["kid"], private[active[-1]["kid"]])
        self._jwks = None
        self._cache.clear()

    async def rotate(self) -> str:
        """Start signing with a new key; the old one is retired (kept in the
        JWKS for :data:`RETIRED_KEEP`, longer than any token it signed lives).
        Keys retired longer ago than that are dropped from the backend.
        Returns the new ``kid``."""
        ca_key = self._sealing_key()
        while True:
            item = await self.backend.get(KEYS_KEY)
            keys = self._decode(item.value, ca_key)
            if keys is None:
                await self._read(item)  # unsealed: seal it first, then rotate that
                continue
            now = self._now()
            keys = [k for k in keys if k["retired"] is None
                    or datetime.fromisoformat(k["retired"]) + RETIRED_KEEP > now]
            for key in keys:
                if key["retired"] is None:
                    key["retired"] = now.isoformat()
            new = self._new_key(ca_key)
            keys.append(new)
            value = _encode(ca_key, keys)
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
            jwk = ECAlgorithm.to_jwk(self._private[key["kid"]].public_key(), as_dict=True)
            jwk.update({"kid": key["kid"], "alg": "ES256", "use": "sig"})
            found.append(jwk)
        self._jwks = {"keys": found}
        return self._jwks

    def assertion(self, *, user: str, roles, audience: str, session: str = "") -> bytes:
        """A signed assertion for ``user`` to the app at ``audience``.

        The same token is reused for a minute (signing is the costly part
        of a small request); it is then still valid for nine more minutes.
        """
        return self._signed((user, tuple(roles), audience, session))

    def assertions_for(self, *, user: str, roles, audience: str,
                       session: str = "") -> "Callable[[], bytes]":
        """``() -> bytes``: :meth:`assertion` for these arguments, called per
        request (the cache key made once)."""
        key = (user, tuple(roles), audience, session)
        cache = self._cache
        clock = self.clock

        def assertion() -> bytes:
            cached = cache.get(key)
            if cached is not None and clock.seconds() - cached[0] < REFRESH_AFTER:
                return cached[1]
            return self._signed(key)

        return assertion

    def _signed(self, key: tuple) -> bytes:
        if self._signing is None:
            raise errors.EdgeError("the app assertion key is not loaded yet")
        now = self.clock.seconds()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < REFRESH_AFTER:
            return cached[1]
        user, roles, audience, session = key
        kid, private = self._signing
        issued = int(now)
        claims = {"sub": user, "username": user, "roles": list(roles), "iss": self.cluster,
                  "aud": audience, "iat": issued, "nbf": issued,
                  "exp": issued + int(ASSERTION_TTL.total_seconds())}
        token = pyjwt.encode(claims, private, algorithm="ES256", headers={"kid": kid})
        value = token.encode("ascii")
        if len(self._cache) > 10000:
            self._cache.clear()  # (the same dict: assertions_for holds it)
        self._cache[key] = (now, value)
        return value
