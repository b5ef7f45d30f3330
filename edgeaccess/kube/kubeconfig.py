"""Kubeconfig files: the agent's credential in, the user's contexts out.

- :func:`load_agent_config` reads what ``--kubeconfig FILE`` says about the
  API the agent publishes: server URL, its CA (``certificate-authority-data``
  or ``certificate-authority``), and the agent's own credential: a client
  certificate, a bearer token (``token`` or ``tokenFile``), or an exec
  credential plugin (``client.authentication.k8s.io/v1``), run again when
  what it gave expires.
- :func:`merge_login` / :func:`remove_login` add and remove the cluster, user
  and context ``edge kube login`` writes into the user's kubeconfig, leaving
  every other entry as it was.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import yaml

from edgeaccess import errors

EXEC_API_VERSION = "client.authentication.k8s.io/v1"


def _data_or_file(entry: dict, key: str, base: Path) -> bytes | None:
    data = entry.get(f"{key}-data")
    if data:
        try:
            return base64.b64decode(data, validate=True)
        except (ValueError, TypeError):
            raise errors.BadRequest(f"kubeconfig: {key}-data is not base64") from None
    name = entry.get(key)
    if name:
        path = Path(name)
        if not path.is_absolute():
            path = base / path
        return path.read_bytes()
    return None


@attrs.frozen
class ExecPlugin:
    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class AgentConfig:
    """Where the API is and how the agent authenticates to it."""

    server: str
    host: str
    port: int
    tls: bool
    ca_pem: bytes | None = None
    insecure: bool = False
    cert_pem: bytes | None = attrs.field(default=None, repr=False)
    key_pem: bytes | None = attrs.field(default=None, repr=False)
    token: str | None = attrs.field(default=None, repr=False)
    token_file: str | None = None
    exec_plugin: ExecPlugin | None = None
    tls_server_name: str | None = None


def load_agent_config(path: str | Path, context: str | None = None) -> AgentConfig:
    """Read the agent's API address and credential from a kubeconfig.

    :raises errors.BadRequest: the file is unreadable, malformed, or names
        no usable server or credential.
    """
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise errors.BadRequest(f"cannot read kubeconfig {path}: {e}") from None
    if not isinstance(doc, dict):
        raise errors.BadRequest(f"kubeconfig {path} is not a mapping")
    base = path.parent

    def named(section: str, name: str) -> dict:
        for item in doc.get(section) or []:
            if isinstance(item, dict) and item.get("name") == name:
                value = item.get(section[:-1]) or {}
                if isinstance(value, dict):
                    return value
        raise errors.BadRequest(f"kubeconfig {path}: no {section[:-1]} {name!r}")

    context_name = context or doc.get("current-context")
    if not context_name:
        contexts = doc.get("contexts") or []
        if len(contexts) != 1:
            raise errors.BadRequest(f"kubeconfig {path}: no current-context")
        context_name = contexts[0].get("name")
    ctx = named("contexts", context_name)
    cluster = named("clusters", ctx.get("cluster", ""))
    user = named("users", ctx.get("user", "")) if ctx.get("user") else {}
    server = cluster.get("server")
    if not isinstance(server, str) or not server:
        raise errors.BadRequest(f"kubeconfig {path}: the cluster names no server")
    parts = urlsplit(server)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise errors.BadRequest(f"kubeconfig {path}: server {server!r} is not an http(s) URL")
    if parts.path not in ("", "/"):
        raise errors.BadRequest(f"kubeconfig {path}: a server URL with a path is not supported")
    try:
        ca = _data_or_file(cluster, "certificate-authority", base)
        cert = _data_or_file(user, "client-certificate", base)
        key = _data_or_file(user, "client-key", base)
    except OSError as e:
        raise errors.BadRequest(f"kubeconfig {path}: {e}") from None
    exec_plugin = None
    spec = user.get("exec")
    if isinstance(spec, dict):
        if not isinstance(spec.get("command"), str):
            raise errors.BadRequest(f"kubeconfig {path}: exec without a command")
        exec_plugin = ExecPlugin(
            command=spec["command"], args=tuple(str(a) for a in spec.get("args") or ()),
            env=tuple((str(e.get("name")), str(e.get("value")))
                      for e in spec.get("env") or () if isinstance(e, dict)))
    token_file = user.get("tokenFile")
    if token_file and not Path(token_file).is_absolute():
        token_file = str(base / token_file)
    if bool(cert) != bool(key):
        raise errors.BadRequest(f"kubeconfig {path}: a client certificate needs its key")
    if not (cert or user.get("token") or token_file or exec_plugin):
        raise errors.BadRequest(
            f"kubeconfig {path}: user {ctx.get('user')!r} has no credential (client "
            "certificate, token or exec plugin)")
    return AgentConfig(
        server=server, host=parts.hostname, port=parts.port or (443 if parts.scheme == "https"
                                                                 else 80),
        tls=parts.scheme == "https", ca_pem=ca,
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        cert_pem=cert, key_pem=key, token=user.get("token") or None, token_file=token_file,
        exec_plugin=exec_plugin, tls_server_name=cluster.get("tls-server-name"))


@attrs.frozen
class Credential:
    """What goes with each request to the API: a token and/or a client certificate."""

    token: str | None = attrs.field(default=None, repr=False)
    cert_pem: bytes | None = attrs.field(default=None, repr=False)
    key_pem: bytes | None = attrs.field(default=None, repr=False)
    expires: float | None = None  # POSIX time, None: never


def read_static_credential(config: AgentConfig) -> Credential:
    """The credential of a config without an exec plugin (blocking: a token file is read)."""
    token = config.token
    if config.token_file:
        token = Path(config.token_file).read_text().strip()
    return Credential(token=token, cert_pem=config.cert_pem, key_pem=config.key_pem)


def run_exec_plugin(plugin: ExecPlugin, timeout: float = 30.0) -> Credential:
    """Run an exec credential plugin (blocking: call it from a thread).

    :raises errors.BadRequest: the plugin failed or answered something else
        than an ``ExecCredential`` with a token or a certificate.
    """
    env = {**os.environ, **dict(plugin.env),
           "KUBERNETES_EXEC_INFO": json.dumps({
               "apiVersion": EXEC_API_VERSION, "kind": "ExecCredential",
               "spec": {"interactive": False}})}
    try:
        result = subprocess.run([plugin.command, *plugin.args], capture_output=True,
                                env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise errors.BadRequest(f"exec credential plugin {plugin.command}: {e}") from None
    if result.returncode != 0:
        raise errors.BadRequest(f"exec credential plugin {plugin.command} exited with "
                                f"{result.returncode}")
    try:
        cred = json.loads(result.stdout)
        status = cred["status"]
        if cred.get("kind") != "ExecCredential" or not isinstance(status, dict):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise errors.BadRequest(f"exec credential plugin {plugin.command} did not answer "
                                "an ExecCredential") from None
    expires = None
    if status.get("expirationTimestamp"):
        try:
            expires = datetime.fromisoformat(
                str(status["expirationTimestamp"]).replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise errors.BadRequest("exec credential plugin: bad expirationTimestamp") from None
    cert = status.get("clientCertificateData")
    key = status.get("clientKeyData")
    token = status.get("token")
    if not token and not (cert and key):
        raise errors.BadRequest(f"exec credential plugin {plugin.command} gave no credential")
    return Credential(token=token or None, cert_pem=cert.encode() if cert else None,
                      key_pem=key.encode() if key else None, expires=expires)


# --- the user's kubeconfig -----------------------------------------------------------


def user_kubeconfig_path() -> Path:
    """The file ``edge kube login`` writes: the first of ``$KUBECONFIG``, else ~/.kube/config."""
    value = os.environ.get("KUBECONFIG", "")
    first = next((p for p in value.split(os.pathsep) if p), "")
    return Path(first) if first else Path.home() / ".kube" / "config"


def _read_user_config(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    doc = yaml.safe_load(text) if text.strip() else None
    if doc is None:
        doc = {"apiVersion": "v1", "kind": "Config", "preferences": {}}
    if not isinstance(doc, dict):
        raise errors.BadRequest(f"{path} is not a kubeconfig (not a mapping)")
    for section in ("clusters", "users", "contexts"):
        if doc.get(section) is None:
            doc[section] = []
        if not isinstance(doc[section], list):
            raise errors.BadRequest(f"{path}: {section} is not a list")
    return doc


def _write_user_config(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".edge-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(doc, f, default_flow_style=False, sort_keys=False)
    os.replace(tmp, path)


def _put(entries: list, name: str, key: str, value: dict) -> None:
    for item in entries:
        if isinstance(item, dict) and item.get("name") == name:
            item[key] = value
            return
    entries.append({"name": name, key: value})


def merge_login(path: Path, name: str, *, server: str, ca_pem: bytes, exec_command: str,
                exec_args: list[str], exec_env: dict[str, str], select: bool = True) -> None:
    """Add (or replace) cluster, user and context ``name``; select it; touch nothing else."""
    doc = _read_user_config(path)
    _put(doc["clusters"], name, "cluster", {
        "server": server,
        "certificate-authority-data": base64.b64encode(ca_pem).decode()})
    _put(doc["users"], name, "user", {"exec": {
        "apiVersion": EXEC_API_VERSION, "command": exec_command, "args": list(exec_args),
        "env": [{"name": k, "value": v} for k, v in sorted(exec_env.items())] or None,
        "interactiveMode": "Never", "provideClusterInfo": False}})
    _put(doc["contexts"], name, "context", {"cluster": name, "user": name})
    if select:
        doc["current-context"] = name
    _write_user_config(path, doc)


def remove_login(path: Path, names) -> list[str]:
    """Remove the clusters, users and contexts named ``names``; returns those removed."""
    names = set(names)
    if not names or not path.exists():
        return []
    doc = _read_user_config(path)
    removed = set()
    for section in ("clusters", "users", "contexts"):
        kept = []
        for item in doc[section]:
            if isinstance(item, dict) and item.get("name") in names:
                removed.add(item["name"])
            else:
                kept.append(item)
        doc[section] = kept
    if doc.get("current-context") in names:
        doc["current-context"] = ""
    if removed:
        _write_user_config(path, doc)
    return sorted(removed)


def exec_credential(cert_pem: str, key_pem: str, expires: datetime) -> dict:
    """The ``ExecCredential`` the plugin prints for kubectl."""
    return {"apiVersion": EXEC_API_VERSION, "kind": "ExecCredential", "spec": {},
            "status": {"clientCertificateData": cert_pem, "clientKeyData": key_pem,
                       "expirationTimestamp": expires.astimezone(timezone.utc)
                       .strftime("%Y-%m-%dT%H:%M:%SZ")}}
