"""The ``trusted_cluster`` resource (created on the leaf) and role mapping.

::

    kind: trusted_cluster
    version: v1
    metadata: {name: root}            # the root cluster's name
    spec:
      enabled: true
      token: TOKEN                    # from `edgectl tokens add --type trusted_cluster` on the root
      ca_pin: sha256:HEX              # the root's pin
      web_proxy_addr: root.example.com:3080
      tunnel_addr: root.example.com:3024
      role_map: [{remote: access, local: [access]}]
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from edgeaccess.errors import BadResource
from edgeaccess.identity.resources import check_header, validate_resource_name

_SPEC_FIELDS = {"enabled", "token", "ca_pin", "web_proxy_addr", "tunnel_addr", "role_map"}


@attrs.frozen
class RoleMapping:
    """Users holding root role ``remote`` get the leaf roles ``local``
    (``remote: '*'`` matches every root role)."""

    remote: str
    local: tuple[str, ...]


@attrs.frozen
class TrustedCluster:
    name: str
    enabled: bool
    token: str
    ca_pin: str
    web_proxy_addr: str
    tunnel_addr: str
    role_map: tuple[RoleMapping, ...]


def _fail(field: str, problem: str) -> BadResource:
    return BadResource(f"trusted_cluster {field}: {problem}")


def _addr(value: Any, field: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9._\-\[\]:]{1,255}", value):
        raise _fail(field, "must be HOST:PORT")
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _fail(field, "must be HOST:PORT")
    return value


def parse_role_map(value: Any, field: str = "spec.role_map") -> tuple[RoleMapping, ...]:
    if not isinstance(value, list) or not value:
        raise _fail(field, "must be a non-empty list of {remote, local} mappings")
    mappings = []
    for n, entry in enumerate(value):
        where = f"{field}[{n}]"
        if not isinstance(entry, Mapping) or set(entry) - {"remote", "local"}:
            raise _fail(where, "must be a mapping with remote and local")
        remote = entry.get("remote")
        local = entry.get("local")
        if isinstance(local, str):
            local = [local]
        if not isinstance(remote, str) or not (remote == "*" or _is_name(remote)):
            raise _fail(f"{where}.remote", "must be a role name or '*'")
        if not isinstance(local, list) or not local or not all(
                isinstance(r, str) and _is_name(r) for r in local):
            raise _fail(f"{where}.local", "must be a list of role names")
        mappings.append(RoleMapping(remote, tuple(local)))
    return tuple(mappings)


def _is_name(text: str) -> bool:
    return bool(re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}", text))


def parse_trusted_cluster(doc: dict[str, Any]) -> TrustedCluster:
    name = check_header(doc, "trusted_cluster", ("v1",))
    spec = doc.get("spec")
    if not isinstance(spec, Mapping):
        raise _fail("spec", "must be a mapping")
    unknown = sorted(set(spec) - _SPEC_FIELDS)
    if unknown:
        raise _fail("spec", f"unknown field(s) {', '.join(map(str, unknown))}")
    enabled = spec.get("enabled", True)
    if not isinstance(enabled, bool):
        raise _fail("spec.enabled", "must be true or false")
    token = spec.get("token")
    if not isinstance(token, str) or not re.fullmatch(r"[A-Za-z0-9]{8,128}", token):
        raise _fail("spec.token", "must be the token from `edgectl tokens add "
                    "--type trusted_cluster` on the root")
    pin = spec.get("ca_pin")
    if not isinstance(pin, str) or not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", pin):
        raise _fail("spec.ca_pin", "must be sha256:<64 hex digits> (the root's `edgectl status`)")
    return TrustedCluster(
        name=validate_resource_name(name, "trusted_cluster"),
        enabled=enabled,
        token=token,
        ca_pin=pin.lower(),
        web_proxy_addr=_addr(spec.get("web_proxy_addr"), "spec.web_proxy_addr"),
        tunnel_addr=_addr(spec.get("tunnel_addr"), "spec.tunnel_addr"),
        role_map=parse_role_map(spec.get("role_map")),
    )


def trusted_cluster_to_dict(tc: TrustedCluster) -> dict[str, Any]:
    return {
        "kind": "trusted_cluster",
        "version": "v1",
        "metadata": {"name": tc.name},
        "spec": {
            "enabled": tc.enabled,
            "token": tc.token,
            "ca_pin": tc.ca_pin,
            "web_proxy_addr": tc.web_proxy_addr,
            "tunnel_addr": tc.tunnel_addr,
            "role_map": [{"remote": m.remote, "local": list(m.local)} for m in tc.role_map],
        },
    }


def map_roles(role_map: Iterable, remote_roles: Iterable[str]) -> list[str]:
    """The leaf roles a root user with ``remote_roles`` gets (may be empty).

    ``role_map`` holds :class:`RoleMapping` objects or their dict form.
    """
    remote_roles = list(remote_roles)
    local: list[str] = []
    for mapping in role_map:
        if isinstance(mapping, Mapping):
            remote, targets = mapping.get("remote"), mapping.get("local") or []
        else:
            remote, targets = mapping.remote, mapping.local
        # '*' matches every root role the user holds: none matches nothing.
        if remote in remote_roles or (remote == "*" and remote_roles):
            for role in targets:
                if role not in local:
                    local.append(role)
    return local
