"""A Kubernetes API server stand-in for the end-to-end tests.

Why a stand-in: no kube-apiserver can be installed on these machines (Debian
ships none, its Go is too old to build one, no PyPI or npm package carries
one), so the tests drive the real ``kubectl`` against this server instead,
as Teleport's own tests use a mock API server. It is a stand-in for the
API's *wire behaviour* that kubectl 1.32 relies on, nothing more:

- TLS with its own CA; callers authenticate with a client certificate (CN =
  user, O = groups) or a bearer token; only callers allowed to impersonate
  may send ``Impersonate-User``/``Impersonate-Group`` (else a real 403);
  every request is logged as JSON lines (who authenticated, whom they
  impersonated, verb, path) to ``requests.jsonl``;
- ``/version`` (minor "32", for the kubectl dispatcher), aggregated discovery
  v2 and legacy discovery, a minimal OpenAPI v3 for ``api/v1``;
- pods and configmaps: list/get (``Table`` answers when asked), watch
  (``?watch=true``, one JSON event per line), create (POST), update, JSON and
  strategic-merge PATCH (a merge patch here) and server-side apply;
  ``pods/log`` with ``follow=true``;
- exec and attach over WebSocket (``v5.channel.k8s.io``/``v4``) and over
  SPDY/3.1 (see :mod:`tests.kube_spdy`), running the command as a real local
  process (in a PTY for ``tty=true``; resizes are applied and logged);
  port-forward over the ``SPDY/3.1+portforward.k8s.io`` WebSocket and plain
  SPDY, to ports on 127.0.0.1;
- a small RBAC table (:data:`RULES`) with real ``Forbidden`` ``Status`` bodies.

Run as a script: ``python tests/kube_standin.py CONFIG.json`` prints ``PORT N``.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import json
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

#: Who may do what: subject (``user:NAME`` or ``group:NAME``) -> [(verbs, resources)].
RULES = {
    "group:viewers": [({"get", "list", "watch"}, {"pods", "pods/log", "configmaps",
                                                   "namespaces"})],
    "group:editors": [({"*"}, {"*"})],
    "user:cluster-admin": [({"*"}, {"*"})],
    "group:system:masters": [({"*"}, {"*"})],
}
#: Callers (by authenticated user name) allowed to impersonate.
IMPERSONATORS = {"edge-agent"}

MINOR = "32"


# --- PKI ---------------------------------------------------------------------------


def make_pki(directory: Path) -> dict:
    """A CA, a server certificate for 127.0.0.1, and client certificates
    ``edge-agent`` (may impersonate) and ``no-rights`` (may not)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc) - timedelta(minutes=5)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def pem_key(k) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM,
                               serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "standin-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def issue(cn, orgs=(), server=False):
        k = key()
        name = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        name += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
        builder = (x509.CertificateBuilder().subject_name(x509.Name(name)).issuer_name(ca_name)
                   .public_key(k.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(now + timedelta(days=2)))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                 x509.DNSName("localhost")]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return pem_key(k), cert.public_bytes(serialization.Encoding.PEM)

    files = {"ca": ca.public_bytes(serialization.Encoding.PEM)}
    files["server_key"], files["server_cert"] = issue("standin", server=True)
    files["agent_key"], files["agent_cert"] = issue("edge-agent")
    files["norights_key"], files["norights_cert"] = issue("no-rights")
    files["admin_key"], files["admin_cert"] = issue("standin-admin", ["system:masters"])
    paths = {}
    for label, data in files.items():
        path = directory / f"{label}.pem"
        path.write_bytes(data)
        paths[label] = str(path)
    return paths


def write_kubeconfig(path: Path, port: int, pki: dict, *, user: str = "agent",
                     token: str | None = None, exec_command: list[str] | None = None) -> Path:
    """A kubeconfig for the stand-in: with the agent's certificate, a token, or an exec plugin."""
    import yaml

    ca = base64.b64encode(Path(pki["ca"]).read_bytes()).decode()
    if exec_command:
        creds = {"exec": {"apiVersion": "client.authentication.k8s.io/v1",
                          "command": exec_command[0], "args": exec_command[1:],
                          "interactiveMode": "Never"}}
    elif token:
        creds = {"token": token}
    else:
        prefix = {"agent": "agent", "admin": "admin"}.get(user, "norights")
        creds = {"client-certificate": pki[f"{prefix}_cert"],
                 "client-key": pki[f"{prefix}_key"]}
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": "standin",
           "clusters": [{"name": "standin", "cluster": {
               "server": f"https://127.0.0.1:{port}", "certificate-authority-data": ca}}],
           "users": [{"name": "u", "user": creds}],
           "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "u"}}]}
    path.write_text(yaml.safe_dump(doc))
    return path


# --- objects --------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Store:
    """Pods and configmaps with resource versions and watchers."""

    def __init__(self) -> None:
        self.rv = 100
        self.objects: dict[str, dict[tuple[str, str], dict]] = {"pods": {}, "configmaps": {}}
        self.watchers: list = []
        for name in ("web-1", "web-2"):
            self.put("pods", {"apiVersion": "v1", "kind": "Pod",
                              "metadata": {"name": name, "namespace": "default"},
                              "spec": {"containers": [{"name": "main", "image": "busybox"}]}},
                     notify=False)

    def put(self, resource: str, obj: dict, notify: bool = True, kind: str = "ADDED") -> dict:
        self.rv += 1
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        meta.setdefault("uid", f"uid-{meta['name']}-{self.rv}")
        meta.setdefault("creationTimestamp", _now())
        meta["resourceVersion"] = str(self.rv)
        if resource == "pods":
            obj.setdefault("status", {"phase": "Running", "containerStatuses": [
                {"name": "main", "ready": True, "restartCount": 0}]})
        key = (meta["namespace"], meta["name"])
        if key in self.objects[resource]:
            kind = "MODIFIED"
        self.objects[resource][key] = obj
        if notify:
            for watcher in list(self.watchers):
                watcher(resource, kind, obj)
        return obj


_TABLE_COLUMNS = {
    "pods": [("Name", "string"), ("Ready", "string"), ("Status", "string"),
             ("Restarts", "string"), ("Age", "string")],
    "configmaps": [("Name", "string"), ("Data", "string"), ("Age", "string")],
}


def table(resource: str, objects: list[dict], rv: str, with_columns: bool = True) -> dict:
    rows = []
    for obj in objects:
        name = obj["metadata"]["name"]
        if resource == "pods":
            cells = [name, "1/1", obj.get("status", {}).get("phase", "Running"), "0", "1m"]
        else:
            cells = [name, str(len(obj.get("data") or {})), "1m"]
        rows.append({"cells": cells, "object": {"kind": "PartialObjectMetadata",
                                                "apiVersion": "meta.k8s.io/v1",
                                                "metadata": obj["metadata"]}})
    out = {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
           "metadata": {"resourceVersion": rv}, "rows": rows}
    if with_columns:
        out["columnDefinitions"] = [
            {"name": n, "type": t, "format": "name" if n == "Name" else "", "description": "",
             "priority": 0} for n, t in _TABLE_COLUMNS[resource]]
    return out


# --- discovery and OpenAPI ------------------------------------------------------------

_RESOURCES = [
    ("pods", "Pod", True, ["create", "delete", "get", "list", "patch", "update", "watch"],
     ["po"], ["log", "exec", "attach", "portforward"]),
    ("configmaps", "ConfigMap", True,
     ["create", "delete", "get", "list", "patch", "update", "watch"], ["cm"], []),
    ("namespaces", "Namespace", False, ["get", "list"], ["ns"], []),
]


def discovery_v2_core() -> dict:
    resources = []
    for name, kind, namespaced, verbs, short, subs in _RESOURCES:
        resources.append({
            "resource": name, "responseKind": {"group": "", "version": "v1", "kind": kind},
            "scope": "Namespaced" if namespaced else "Cluster", "singularResource": kind.lower(),
            "verbs": verbs, "shortNames": short,
            "subresources": [{"subresource": s, "responseKind": {"group": "", "version": "v1",
                                                                "kind": "Status"},
                              "verbs": ["get", "create"]} for s in subs]})
    return {"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2",
            "metadata": {}, "items": [{"metadata": {"creationTimestamp": None},
                                       "versions": [{"version": "v1", "resources": resources,
                                                     "freshness": "Current"}]}]}


def api_resource_list() -> dict:
    resources = []
    for name, kind, namespaced, verbs, short, subs in _RESOURCES:
        resources.append({"name": name, "singularName": kind.lower(), "namespaced": namespaced,
                          "kind": kind, "verbs": verbs, "shortNames": short})
        for sub in subs:
            resources.append({"name": f"{name}/{sub}", "singularName": "", "namespaced": True,
                              "kind": "Status", "verbs": ["get", "create"]})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1",
            "resources": resources}


def openapi_v3_index(port: int) -> dict:
    return {"paths": {"api/v1": {"serverRelativeURL": "/openapi/v3/api/v1?hash=STANDIN1"}}}


def openapi_v3_core() -> dict:
    def schema(kind: str, extra: dict) -> dict:
        return {"type": "object", "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"},
            "metadata": {"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1."
                                 "ObjectMeta"}, **extra},
            "x-kubernetes-group-version-kind": [{"group": "", "kind": kind, "version": "v1"}]}

    params = [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
              {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
              {"name": "dryRun", "in": "query", "schema": {"type": "string"}}]
    paths = {}
    for res, kind in (("pods", "Pod"), ("configmaps", "ConfigMap")):
        ref = {"$ref": f"#/components/schemas/io.k8s.api.core.v1.{kind}"}
        op = {"parameters": params, "responses": {"200": {"content": {
            "application/json": {"schema": ref}}}},
              "x-kubernetes-group-version-kind": {"group": "", "kind": kind, "version": "v1"}}
        paths[f"/api/v1/namespaces/{{namespace}}/{res}"] = {"post": op}
        paths[f"/api/v1/namespaces/{{namespace}}/{res}/{{name}}"] = {"patch": op, "put": op}
    string_map = {"type": "object", "additionalProperties": {"type": "string"}}
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.4"},
            "paths": paths, "components": {"schemas": {
                "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta": {
                    "type": "object", "properties": {
                        "name": {"type": "string"}, "namespace": {"type": "string"},
                        "labels": string_map, "annotations": string_map,
                        "resourceVersion": {"type": "string"}, "uid": {"type": "string"},
                        "creationTimestamp": {"type": "string"},
                        "managedFields": {"type": "array", "items": {"type": "object"}}}},
                "io.k8s.api.core.v1.ConfigMap": schema("ConfigMap", {"data": string_map}),
                "io.k8s.api.core.v1.Pod": schema("Pod", {
                    "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}),
            }}}


# --- the server -----------------------------------------------------------------------


def status(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    out = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code}
    if details:
        out["details"] = details
    return out


def managed(manager: str, operation: str, obj: dict) -> dict:
    """A managedFields entry as kube-apiserver writes it (kubectl reads them)."""
    fields = {"f:data": {f"f:{k}": {} for k in obj.get("data") or {}}} if obj.get("data") \
        else {"f:metadata": {}}
    return {"manager": manager, "operation": operation, "apiVersion": "v1", "time": _now(),
            "fieldsType": "FieldsV1", "fieldsV1": fields}


def merge_patch(target, patch):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class Caller:
    def __init__(self, user: str, groups: list[str]) -> None:
        self.user = user
        self.groups = groups


def allowed(caller: Caller, verb: str, resource: str) -> bool:
    subjects = [f"user:{caller.user}"] + [f"group:{g}" for g in caller.groups]
    for subject in subjects:
        for verbs, resources in RULES.get(subject, []):
            if (verb in verbs or "*" in verbs) and (resource in resources or "*" in resources):
                return True
    return False


def build_site(config: dict, reactor):
    """The stand-in's ``Site`` (and its state, for tests running it in-process)."""
    from twisted.web import resource, server

    from tests import kube_spdy, kube_ws

    store = Store()
    log_path = Path(config["dir"]) / "requests.jsonl"
    log_file = open(log_path, "a", buffering=1)
    token = config.get("token")

    def log(entry: dict) -> None:
        log_file.write(json.dumps(entry) + "\n")

    def authenticate(request) -> Caller | None:
        auth = request.getHeader(b"authorization")
        if auth:
            if token and auth == f"Bearer {token}".encode():
                return Caller("edge-agent", ["system:authenticated"])
            return None
        cert = request.channel.transport.getPeerCertificate() \
            if hasattr(request.channel.transport, "getPeerCertificate") else None
        if cert is None:
            return None
        from cryptography.x509.oid import NameOID

        subject = cert.to_cryptography().subject
        groups = [a.value for a in subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
        names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return Caller(names[0].value if names else "", groups + ["system:authenticated"])

    class Root(resource.Resource):
        isLeaf = True

        def render(self, request):
            try:
                return self._render(request)
            except Exception as e:  # the stand-in answers, whatever happens
                import traceback

                traceback.print_exc()
                return reply(request, 500, status(500, "InternalError", repr(e)))

        def _render(self, request):
            caller = authenticate(request)
            path = request.path.decode()
            query = parse_qs(urlsplit(request.uri.decode()).query)
            entry = {"time": time.time(), "method": request.method.decode(), "path": path,
                     "query": {k: v for k, v in query.items()}}
            if caller is None:
                entry["authenticated"] = None
                log(entry)
                return reply(request, 401, status(401, "Unauthorized", "Unauthorized"))
            entry["authenticated"] = caller.user
            imp_user = request.getHeader(b"impersonate-user")
            imp_groups = request.requestHeaders.getRawHeaders(b"impersonate-group") or []
            if imp_user or imp_groups:
                if caller.user not in IMPERSONATORS:
                    log({**entry, "refused": "impersonation"})
                    return reply(request, 403, status(
                        403, "Forbidden", f'users "{(imp_user or b"").decode()}" is forbidden: '
                        f'User "{caller.user}" cannot impersonate resource "users" in API '
                        f'group "" at the cluster scope', {"kind": "users"}))
                if not imp_user:
                    return reply(request, 400, status(400, "BadRequest",
                                                      "requested impersonation without a user"))
                caller = Caller(imp_user.decode(), [g.decode() for g in imp_groups])
                entry["impersonated_user"] = caller.user
                entry["impersonated_groups"] = caller.groups
            else:
                entry["impersonated_user"] = None
            entry["user_agent"] = (request.getHeader(b"user-agent") or b"").decode()
            entry["had_client_authorization"] = request.getHeader(b"x-client-auth") is not None
            log(entry)
            return dispatch(request, caller, path, query)

    def reply(request, code: int, body, content_type=b"application/json"):
        request.setResponseCode(code)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"audit-id", b"standin")
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request.setHeader(b"content-length", str(len(data)).encode())
        return data

    def forbidden(request, caller, verb, resource_name, namespace):
        group_part = 'in API group ""'
        where = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
        res, _, sub = resource_name.partition("/")
        message = (f'{res} is forbidden: User "{caller.user}" cannot {verb} resource "{res}"'
                   + (f' subresource "{sub}"' if sub else "") + f" {group_part}{where}")
        return reply(request, 403, status(403, "Forbidden", message, {"kind": res}))

    def dispatch(request, caller, path, query):
        method = request.method.decode()
        accept = (request.getHeader(b"accept") or b"").decode()
        if path == "/version":
            return reply(request, 200, {"major": "1", "minor": MINOR, "gitVersion": "v1.32.4",
                                        "platform": "linux/amd64", "goVersion": "go1.23"})
        if path in ("/api", "/apis"):
            if "apidiscovery.k8s.io" in accept and "v=v2" in accept:
                ctype = b"application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
                if path == "/api":
                    return reply(request, 200, discovery_v2_core(), ctype)
                return reply(request, 200, {"kind": "APIGroupDiscoveryList", "apiVersion":
                                            "apidiscovery.k8s.io/v2", "metadata": {},
                                            "items": []}, ctype)
            if path == "/api":
                return reply(request, 200, {"kind": "APIVersions", "versions": ["v1"],
                                            "serverAddressByClientCIDRs": []})
            return reply(request, 200, {"kind": "APIGroupList", "apiVersion": "v1",
                                        "groups": []})
        if path == "/api/v1":
            return reply(request, 200, api_resource_list())
        if path == "/openapi/v3":
            return reply(request, 200, openapi_v3_index(0))
        if path == "/openapi/v3/api/v1":
            return reply(request, 200, openapi_v3_core())
        if path.startswith("/openapi/"):
            return reply(request, 404, status(404, "NotFound", "the server could not find "
                                                               "the requested resource"))
        parts = [p for p in path.split("/") if p]
        if len(parts) < 3 or parts[:2] != ["api", "v1"]:
            return reply(request, 404, status(404, "NotFound", "the server could not find "
                                                               "the requested resource"))
        rest = parts[2:]
        namespace = ""
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        res = rest[0]
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        if res == "namespaces":
            verb = "get" if name else "list"
            if not allowed(caller, verb, "namespaces"):
                return forbidden(request, caller, verb, "namespaces", "")
            items = [{"metadata": {"name": n}} for n in ("default", "kube-system")]
            return reply(request, 200, {"kind": "NamespaceList", "apiVersion": "v1",
                                        "metadata": {}, "items": items})
        if res not in store.objects:
            return reply(request, 404, status(404, "NotFound", f"resource {res} not found"))
        watch = query.get("watch", [""])[0] in ("true", "1")
        verb = {"GET": "watch" if watch else ("get" if name else "list"), "POST": "create",
                "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, "get")
        resource_name = f"{res}/{sub}" if sub else res
        if sub in ("exec", "attach", "portforward"):
            verb = "create"
        if not allowed(caller, verb, resource_name):
            return forbidden(request, caller, verb, resource_name, namespace)
        objects = store.objects[res]
        if sub in ("exec", "attach", "portforward"):
            if (namespace, name) not in objects:
                return reply(request, 404, status(404, "NotFound",
                                                  f'pods "{name}" not found'))
            upgrade = (request.getHeader(b"upgrade") or b"").lower()
            if upgrade == b"websocket":
                return kube_ws.upgrade(request, sub, query, config, reactor)
            if upgrade.startswith(b"spdy/3.1"):
                return kube_spdy.upgrade(request, sub, query, config, reactor)
            return reply(request, 400, status(400, "BadRequest",
                                              "Upgrade request required"))
        if sub == "log":
            return pod_log(request, name, query)
        wants_table = "as=Table" in accept
        if method == "GET" and not name:
            items = [o for (ns, _), o in sorted(objects.items()) if not namespace or
                     ns == namespace]
            if watch:
                return watch_stream(request, res, namespace, wants_table)
            if wants_table:
                return reply(request, 200, table(res, items, str(store.rv)),
                             b"application/json;as=Table;v=v1;g=meta.k8s.io")
            kind = "PodList" if res == "pods" else "ConfigMapList"
            return reply(request, 200, {"kind": kind, "apiVersion": "v1",
                                        "metadata": {"resourceVersion": str(store.rv)},
                                        "items": items})
        key = (namespace or "default", name)
        if method == "GET":
            if key not in objects:
                return reply(request, 404, status(404, "NotFound", f'{res} "{name}" not found',
                                                  {"name": name, "kind": res}))
            if wants_table:
                return reply(request, 200, table(res, [objects[key]], str(store.rv)),
                             b"application/json;as=Table;v=v1;g=meta.k8s.io")
            return reply(request, 200, objects[key])
        body = request.content.read()
        if method == "POST":
            try:
                obj = json.loads(body)
            except ValueError:
                return reply(request, 400, status(400, "BadRequest", "malformed JSON body"))
            obj.setdefault("metadata", {})["namespace"] = namespace or "default"
            obj["metadata"]["managedFields"] = [managed(
                query.get("fieldManager", ["kubectl-client-side-apply"])[0], "Update", obj)]
            key = (namespace or "default", obj["metadata"].get("name", ""))
            if key in objects:
                return reply(request, 409, status(409, "AlreadyExists",
                                                  f'{res} "{key[1]}" already exists'))
            return reply(request, 201, store.put(res, obj))
        if method == "DELETE":
            obj = objects.pop(key, None)
            if obj is None:
                return reply(request, 404, status(404, "NotFound", f'{res} "{name}" not found'))
            for watcher in list(store.watchers):
                watcher(res, "DELETED", obj)
            return reply(request, 200, obj)
        if method in ("PUT", "PATCH"):
            ctype = (request.getHeader(b"content-type") or b"").decode()
            if ctype.startswith("application/apply-patch+yaml"):
                import yaml

                patch = yaml.safe_load(body)
                manager = query.get("fieldManager", ["?"])[0]
                base = objects.get(key, {"apiVersion": "v1",
                                         "kind": "Pod" if res == "pods" else "ConfigMap"})
                obj = merge_patch(base, patch)
                obj["metadata"]["managedFields"] = [managed(manager, "Apply", obj)]
                created = key not in objects
                return reply(request, 201 if created else 200, store.put(res, obj))
            if key not in objects:
                return reply(request, 404, status(404, "NotFound", f'{res} "{name}" not found'))
            try:
                patch = json.loads(body)
            except ValueError:
                return reply(request, 400, status(400, "BadRequest", "malformed JSON body"))
            if method == "PUT":
                obj = patch
            elif ctype.startswith("application/json-patch+json"):
                return reply(request, 415, status(415, "UnsupportedMediaType",
                                                  "JSON patch is not supported here"))
            else:  # merge-patch+json and strategic-merge-patch+json (merge semantics here)
                obj = merge_patch(objects[key], patch)
            obj.setdefault("metadata", {}).update(name=name, namespace=key[0])
            obj["metadata"]["managedFields"] = [managed(
                query.get("fieldManager", ["kubectl-client-side-apply"])[0], "Update", obj)]
            return reply(request, 200, store.put(res, obj))
        return reply(request, 405, status(405, "MethodNotAllowed", "method not allowed"))

    def watch_stream(request, res, namespace, wants_table):
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")

        def send(resource_name, kind, obj):
            if resource_name != res or (namespace and obj["metadata"]["namespace"] != namespace):
                return
            shown = table(res, [obj], obj["metadata"]["resourceVersion"], with_columns=False) \
                if wants_table else obj
            request.write(json.dumps({"type": kind, "object": shown}).encode() + b"\n")

        store.watchers.append(send)
        finished = request.notifyFinish()
        finished.addBoth(lambda _: store.watchers.remove(send))
        request.write(b"")
        return server.NOT_DONE_YET

    def pod_log(request, name, query):
        follow = query.get("follow", [""])[0] in ("true", "1")
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/plain")
        counter = {"n": 0}
        lines = int(config.get("log_lines", 5))

        def line() -> bytes:
            counter["n"] += 1
            return f"{name} log line {counter['n']}\n".encode()

        if not follow:
            data = b"".join(line() for _ in range(lines))
            request.setHeader(b"content-length", str(len(data)).encode())
            return data
        from twisted.internet.task import LoopingCall

        loop = LoopingCall(lambda: request.write(line()))
        loop.clock = reactor
        loop.start(0.1)
        request.notifyFinish().addBoth(lambda _: loop.stop())
        return server.NOT_DONE_YET

    site = server.Site(Root())
    site.store = store
    return site


def record_errors(path: Path) -> None:
    """Every logged failure (an "Unhandled Error" included) goes to ``path``,
    one JSON line each, so a test can assert the stand-in had none."""
    from twisted.logger import formatEvent, globalLogPublisher

    def observe(event: dict) -> None:
        failure = event.get("log_failure")
        if failure is None:
            return
        with open(path, "a") as f:
            f.write(json.dumps({"message": formatEvent(event),
                                "error": failure.getTraceback()}) + "\n")

    globalLogPublisher.addObserver(observe)


def main(config_path: str) -> None:
    from OpenSSL import crypto
    from twisted.internet import reactor, ssl
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from tests.serverscript import serve_on_ephemeral_port

    config = json.loads(Path(config_path).read_text())
    record_errors(Path(config["dir"]) / "errors.jsonl")
    pki = config["pki"]
    ca = crypto.load_certificate(crypto.FILETYPE_PEM, Path(pki["ca"]).read_bytes())
    options = ssl.CertificateOptions(
        privateKey=crypto.load_privatekey(crypto.FILETYPE_PEM,
                                          Path(pki["server_key"]).read_bytes()),
        certificate=crypto.load_certificate(crypto.FILETYPE_PEM,
                                            Path(pki["server_cert"]).read_bytes()),
        verify=True, caCerts=[ca], requireCertificate=False)
    site = build_site(config, reactor)
    serve_on_ephemeral_port(reactor, TLSMemoryBIOFactory(options, False, site))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main(sys.argv[1])
