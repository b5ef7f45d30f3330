"""Who a request reaches the Kubernetes API as, and what it asks for. Pure: no I/O.

The proxy decides with these functions before it opens anything, and the
agent decides again with its own copy of the roles before its credential
touches the request (a proxy is never trusted to have checked).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

import attrs

from edgeaccess.errors import AccessDenied, BadRequest
from edgeaccess.identity.rbac import AccessChecker

#: Always impersonated with the groups the roles give (as kube-apiserver adds it).
AUTHENTICATED_GROUP = "system:authenticated"
#: Path prefix that selects the Kubernetes cluster on the proxy's port.
PATH_PREFIX = "/k8s/"


@attrs.frozen
class Impersonation:
    user: str
    groups: tuple[str, ...]


def impersonation(checker: AccessChecker, username: str, cluster: str,
                  kube_labels: Mapping[str, str], *, as_user: str | None = None,
                  as_groups: Sequence[str] = ()) -> Impersonation:
    """The user and groups a request reaches the API as.

    ``Impersonate-User`` is the roles' single ``kubernetes_users`` value, else
    the user's name; ``Impersonate-Group`` every ``kubernetes_groups`` value
    plus ``system:authenticated``. ``as_user``/``as_groups`` (kubectl's
    ``--as``/``--as-group``) are honoured only for values the roles allow.

    :raises AccessDenied: the cluster is not allowed, the roles give neither
        groups nor users, or an ``--as`` value is not allowed.
    """
    if not checker.can_access_kube(kube_labels):
        raise AccessDenied(f"your roles do not allow Kubernetes cluster {cluster}")
    groups = checker.kubernetes_groups(kube_labels)
    users = checker.kubernetes_users(kube_labels)
    if not groups and not users:
        raise AccessDenied(
            f"your roles give no kubernetes_groups or kubernetes_users for Kubernetes "
            f"cluster {cluster}; ask an administrator to set them")
    if as_user:
        if as_user not in users and as_user != username:
            raise AccessDenied(f"your roles do not allow impersonating user {as_user!r} "
                               f"(allowed: {', '.join(users) or username})")
        user = as_user
    elif len(users) == 1:
        user = users[0]
    elif len(users) > 1:
        raise AccessDenied(f"your roles allow several Kubernetes users "
                           f"({', '.join(users)}): choose one with --as")
    else:
        user = username
    if as_groups:
        refused = [g for g in as_groups if g not in groups and g != AUTHENTICATED_GROUP]
        if refused:
            raise AccessDenied(f"your roles do not allow impersonating group "
                               f"{refused[0]!r} (allowed: {', '.join(groups) or 'none'})")
        groups = list(dict.fromkeys(as_groups))
    chosen = [g for g in groups if g != AUTHENTICATED_GROUP] + [AUTHENTICATED_GROUP]
    return Impersonation(user, tuple(chosen))


def split_cluster(target: bytes) -> tuple[str, bytes]:
    """``/k8s/NAME/api/v1/pods?x`` -> ``("NAME", b"/api/v1/pods?x")``.

    :raises BadRequest: the target does not start with the prefix and a name.
    """
    if not target.startswith(PATH_PREFIX.encode()):
        raise BadRequest(f"use the kubeconfig of edge kube login (paths start with "
                         f"{PATH_PREFIX}CLUSTER)")
    rest = target[len(PATH_PREFIX):]
    end = len(rest)
    for sep in (b"/", b"?"):
        found = rest.find(sep)
        if found != -1:
            end = min(end, found)
    name = rest[:end].decode("ascii", "replace")
    remainder = rest[end:] or b"/"
    if remainder.startswith(b"?"):
        remainder = b"/" + remainder
    if not name or len(name) > 253:
        raise BadRequest("no Kubernetes cluster name in the path")
    return name, remainder


@attrs.frozen
class RequestInfo:
    """What a request does, for the audit log (as kube-apiserver's RequestInfo)."""

    verb: str
    path: str
    namespace: str = ""
    resource: str = ""
    name: str = ""
    subresource: str = ""
    query: Mapping[str, list[str]] = attrs.field(factory=dict, eq=False)


def request_info(method: bytes, target: bytes) -> RequestInfo:
    """Read a request's verb, namespace, resource, name and subresource from its path."""
    parts = urlsplit(target.decode("latin-1"))
    path = parts.path
    query = parse_qs(parts.query)
    segments = [unquote(s) for s in path.strip("/").split("/") if s]
    method_text = method.decode("latin-1").upper()
    if not segments or segments[0] not in ("api", "apis"):
        return RequestInfo(verb=method_text.lower(), path=path, query=query)
    rest = segments[2:] if segments[0] == "api" else segments[3:]
    if segments[0] == "api" and len(segments) < 2 or segments[0] == "apis" and len(segments) < 3:
        return RequestInfo(verb=method_text.lower(), path=path, query=query)
    namespace = ""
    if len(rest) >= 2 and rest[0] == "namespaces" and len(rest) > 2:
        namespace = rest[1]
        rest = rest[2:]
    elif len(rest) == 2 and rest[0] == "namespaces":
        rest = ["namespaces", rest[1]]
    resource = rest[0] if rest else ""
    name = rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    watch = query.get("watch", [""])[0] in ("true", "1")
    verb = {
        "GET": "watch" if watch else ("get" if name else "list"),
        "HEAD": "get" if name else "list",
        "POST": "create", "PUT": "update", "PATCH": "patch",
        "DELETE": "delete" if name else "deletecollection",
    }.get(method_text, method_text.lower())
    return RequestInfo(verb=verb, path=path, namespace=namespace, resource=resource,
                       name=name, subresource=subresource, query=query)
