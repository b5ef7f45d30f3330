"""The node's ``--app name=N,uri=URL[,labels=k:v][,rewrite_host=H][,ca=FILE]`` values."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import attrs

from edgeaccess import errors
from edgeaccess.tunnel.protocol import App

#: An app name is one DNS label: it becomes ``NAME.<public host>``.
_APP_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_.:/@+*-]{0,253}$")
_HOST = re.compile(r"^[A-Za-z0-9._-]{1,253}(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


def check_app_name(name: str) -> str:
    """Return ``name`` if it is a valid app name (one lowercase DNS label)."""
    if not isinstance(name, str) or not _APP_NAME.match(name):
        raise errors.BadRequest(
            f"invalid app name {str(name)[:64]!r} (lowercase letters, digits and '-', "
            "at most 63 characters)")
    return name


@attrs.frozen
class AppSpec:
    """One app a node publishes."""

    name: str
    uri: str
    labels: dict[str, str] = attrs.field(factory=dict, hash=False)
    rewrite_host: str = ""
    #: CA file to verify an ``https`` app with ("": the system's trust store).
    ca_file: str = ""

    @property
    def scheme(self) -> str:
        return urlsplit(self.uri).scheme

    @property
    def host(self) -> str:
        return urlsplit(self.uri).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.uri)
        return parts.port or (443 if parts.scheme == "https" else 80)

    def inventory(self) -> App:
        """What the node announces for this app in its tunnel's ``Hello``."""
        return App(name=self.name, uri=self.uri, labels=dict(self.labels),
                   rewrite_host=self.rewrite_host)


def parse_app(text: str) -> AppSpec:
    """Parse one ``--app`` value.

    ``labels`` is ``k:v``; several labels are separated by ``;``
    (``labels=env:dev;team:web``), as ``,`` separates the fields.

    :raises BadRequest: naming what is wrong.
    """
    fields: dict[str, str] = {}
    for part in str(text).split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in ("name", "uri", "labels", "rewrite_host", "ca"):
            raise errors.BadRequest(f"invalid --app field {part.strip()[:64]!r} (use name=N,"
                                    "uri=URL[,labels=k:v][,rewrite_host=H][,ca=FILE])")
        if key in fields:
            raise errors.BadRequest(f"--app field {key} given twice")
        fields[key] = value.strip()
    if "name" not in fields or "uri" not in fields:
        raise errors.BadRequest("--app needs name=N and uri=URL")
    name = check_app_name(fields["name"])
    uri = fields["uri"]
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError:
        raise errors.BadRequest(f"invalid uri for app {name}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username \
            or parts.query or parts.fragment or any(ord(c) <= 32 for c in uri):
        raise errors.BadRequest(f"app {name}: uri must be http:// or https://HOST[:PORT][/PATH]")
    labels: dict[str, str] = {}
    for item in filter(None, (i.strip() for i in fields.get("labels", "").split(";"))):
        key, sep, value = item.partition(":")
        if not sep or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
            raise errors.BadRequest(f"app {name}: invalid label {item[:64]!r} (use key:value)")
        labels[key] = value
    rewrite_host = fields.get("rewrite_host", "")
    if rewrite_host and not _HOST.match(rewrite_host):
        raise errors.BadRequest(f"app {name}: invalid rewrite_host {rewrite_host[:64]!r}")
    return AppSpec(name=name, uri=uri.rstrip("/") if parts.path in ("", "/") else uri,
                   labels=labels, rewrite_host=rewrite_host, ca_file=fields.get("ca", ""))
