"""Resource documents: the YAML that ``edgectl create -f`` reads and ``edgectl get`` prints.

Every resource has the same header::

    kind: role            # one of the registered kinds
    version: v1
    metadata: {name: dev}
    spec: {...}           # owned by the kind's parser

This module reads YAML text into documents (with line numbers in its errors), checks the
header, and dispatches each document to the parser registered for its ``kind``. Kinds are
registered by the modules that own them (:func:`register_kind`): ``role`` by
:mod:`edgeaccess.identity.roles` (imported at the end of this module, so it is always
known), ``ldap_connector`` and ``trusted_cluster`` by their own modules.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import yaml
from twisted.logger import Logger

from edgeaccess.errors import BadResource

_log = Logger()

#: A resource name: what appears in ``metadata.name`` and in ``edgectl rm KIND/NAME``.
RESOURCE_NAME_PATTERN = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}")

#: Bigger input is refused before parsing: resources are small, YAML parsing is not free.
MAX_DOCUMENT_BYTES = 1024 * 1024

_HEADER_FIELDS = ("kind", "version", "metadata", "spec")


@attrs.frozen
class _Kind:
    kind: str
    parser: Callable[[dict[str, Any]], object]
    serializer: Callable[[Any], dict[str, Any]]
    cls: type | None


# Insertion-ordered: error messages list kinds in registration order.
_KINDS: dict[str, _Kind] = {}


def register_kind(
    kind: str,
    parser: Callable[[dict[str, Any]], object],
    serializer: Callable[[Any], dict[str, Any]],
    *,
    cls: type | None = None,
) -> None:
    """Make ``kind`` known to :func:`parse_resource` and :func:`resource_to_dict`.

    :param kind: the ``kind:`` value of the documents, e.g. ``"ldap_connector"``.
    :param parser: turns a whole document (header included) into an object; raises
        :class:`~edgeaccess.errors.BadResource` on invalid input.
    :param serializer: the inverse: an object to a document that ``parser`` accepts.
    :param cls: the class of the parsed objects, so that :func:`resource_to_dict` and
        :func:`resource_kind` can find the kind of an object.

    Registering a kind again replaces the previous registration.
    """
    _KINDS[kind] = _Kind(kind=kind, parser=parser, serializer=serializer, cls=cls)


def registered_kinds() -> list[str]:
    """The known kinds, in registration order."""
    return list(_KINDS)


def short_repr(value: object) -> str:
    """``repr(value)`` cut to a size fit for an error message (input may be huge)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _known() -> str:
    return ", ".join(_KINDS) or "none"


def validate_resource_name(name: object, kind: str = "resource") -> str:
    """Return ``name`` if it is a valid resource name, else raise BadResource.

    A name is 1 to 63 characters, letters, digits, ``.``, ``_`` and ``-``, starting with a
    letter or a digit (so it is safe in a URL path, a file name and ``KIND/NAME``).
    """
    if not isinstance(name, str) or not name:
        raise BadResource(f"{kind}: metadata.name is required and must be a string")
    if RESOURCE_NAME_PATTERN.fullmatch(name) is None:
        raise BadResource(
            f"{kind}: invalid name {short_repr(name)}: use 1 to 63 letters, digits, "
            "'.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_header(
    doc: object, kind: str | None = None, versions: tuple[str, ...] | None = None
) -> str:
    """Check a document's header and return its ``metadata.name``.

    :param doc: a parsed YAML document.
    :param kind: if given, the kind the document must have; if not, any registered kind.
    :param versions: if given, the versions accepted.
    :raises BadResource: naming the field at fault.
    """
    if not isinstance(doc, Mapping):
        raise BadResource(
            f"a resource must be a mapping with kind, version, metadata and spec, "
            f"not {_type_name(doc)}"
        )
    doc_kind = doc.get("kind")
    if doc_kind is None:
        raise BadResource(f"missing 'kind' (known: {_known()})")
    if not isinstance(doc_kind, str):
        raise BadResource(f"'kind' must be a string (known: {_known()})")
    if kind is not None and doc_kind != kind:
        raise BadResource(f"expected kind {kind!r}, got {short_repr(doc_kind)}")
    if kind is None and doc_kind not in _KINDS:
        raise BadResource(f"unknown resource kind {short_repr(doc_kind)} (known: {_known()})")
    label = kind or doc_kind
    version = doc.get("version")
    if version is None:
        raise BadResource(f"{label}: missing 'version'")
    if not isinstance(version, str):
        raise BadResource(f"{label}: 'version' must be a string such as 'v1'")
    metadata = doc.get("metadata")
    if metadata is None:
        raise BadResource(f"{label}: missing 'metadata' (with at least a name)")
    if not isinstance(metadata, Mapping):
        raise BadResource(f"{label}: 'metadata' must be a mapping")
    name = validate_resource_name(metadata.get("name"), label)
    if versions is not None and version not in versions:
        raise BadResource(
            f"{label} {name}: unsupported version {short_repr(version)} "
            f"(supported: {', '.join(versions)})"
        )
    return name


def _type_name(value: object) -> str:
    if value is None:
        return "an empty document"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return f"a {type(value).__name__}"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys.

    PyYAML silently keeps the last of two equal keys; in a role a second ``deny:`` would
    quietly erase the first, so duplicates are an error.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<: *anchor': merged keys may be overridden, as YAML intends
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable key: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {short_repr(key)}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_error(error: yaml.YAMLError) -> BadResource:
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        problem = error.problem or "syntax error"
        return BadResource(
            f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
        )
    return BadResource(f"invalid YAML: {error}")


def parse_documents(text: str | bytes) -> list[dict[str, Any]]:
    """Read one or more YAML documents (separated by ``---``) and check their headers.

    Empty documents (a trailing ``---``) are skipped. Each document must be a mapping with a
    ``kind`` that is registered, a ``version`` and a valid ``metadata.name``; the ``spec`` is
    checked later by :func:`parse_resource`.

    :raises BadResource: on invalid YAML (with its line and column), on a document that is
        not a resource (with its number and first line), or when there is no document.
    """
    if isinstance(text, bytes):
        if len(text) > MAX_DOCUMENT_BYTES:
            raise BadResource(f"input too large (more than {MAX_DOCUMENT_BYTES} bytes)")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadResource(f"input is not UTF-8 (byte {error.start})") from None
    if len(text.encode("utf-8", "surrogatepass")) > MAX_DOCUMENT_BYTES:
        raise BadResource(f"input too large (more than {MAX_DOCUMENT_BYTES} bytes)")

    documents: list[dict[str, Any]] = []
    try:
        loader = _StrictLoader(text)  # its reader refuses control characters at once
    except yaml.YAMLError as error:
        raise _yaml_error(error) from None
    number = 0
    try:
        while loader.check_node():  # type: ignore[no-untyped-call]
            node = loader.get_node()  # type: ignore[no-untyped-call]
            number += 1
            line = node.start_mark.line + 1
            doc = loader.construct_document(node)  # type: ignore[no-untyped-call]
            if doc is None:
                continue
            try:
                check_header(doc)
                kind = doc["kind"]
                unknown = sorted(str(key) for key in doc if key not in _HEADER_FIELDS)
                if unknown:
                    raise BadResource(
                        f"{kind} {doc['metadata']['name']}: unknown top-level field "
                        f"{short_repr(unknown[0])} (expected kind, version, metadata, spec)"
                    )
            except BadResource as error:
                _log.debug("refused resource document {number}: {reason}",
                           number=number, reason=error.message)
                raise BadResource(f"document {number} (line {line}): {error.message}") from None
            documents.append(doc)
    except yaml.YAMLError as error:
        raise _yaml_error(error) from None
    except (ValueError, OverflowError) as error:  # PyYAML's scanner: chr() of a \U escape
        raise BadResource(f"invalid YAML: {error}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise BadResource("invalid YAML: collections nested too deeply") from None
    finally:
        loader.dispose()
    if not documents:
        raise BadResource("no resource found in the input")
    return documents


def parse_resource(doc: Mapping[str, Any]) -> object:
    """Parse one document into the object of its kind (a :class:`~.roles.Role`, ...).

    :raises BadResource: unknown kind, or whatever the kind's parser refuses.
    """
    check_header(doc)
    return _KINDS[doc["kind"]].parser(dict(doc))


def parse_resources(text: str | bytes) -> list[object]:
    """Parse every document of ``text`` (see :func:`parse_documents`) into objects.

    Errors name the document they come from, so a file of several resources is fixable.
    """
    objects = []
    for number, doc in enumerate(parse_documents(text), start=1):
        try:
            objects.append(parse_resource(doc))
        except BadResource as error:
            raise BadResource(f"document {number}: {error.message}") from None
    return objects


def _kind_of(obj: object) -> _Kind:
    for registered in _KINDS.values():
        if registered.cls is not None and isinstance(obj, registered.cls):
            return registered
    raise TypeError(f"no resource kind registered for {type(obj).__name__}")


def resource_kind(obj: object) -> str:
    """The kind under which ``obj``'s class was registered."""
    return _kind_of(obj).kind


def resource_to_dict(obj: object) -> dict[str, Any]:
    """Serialize a parsed resource back to its document form (for storage and ``get``)."""
    return _kind_of(obj).serializer(obj)


def resource_name(obj: object) -> str:
    """The ``metadata.name`` of a parsed resource (or of a document)."""
    if isinstance(obj, Mapping):
        return check_header(obj)
    name = getattr(obj, "name", None)
    if isinstance(name, str):
        return name
    return str(resource_to_dict(obj)["metadata"]["name"])


def dump_documents(docs: list[dict[str, Any]]) -> str:
    """Write documents as YAML separated by ``---``, keys in their given order."""
    return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False)


# Imported last (the cycle is intended): roles uses the helpers above and registers "role".
from edgeaccess.identity import roles as _roles  # noqa: E402,F401
