"""Regression tests for the bugs the fuzz targets found, one input each."""

from __future__ import annotations

import base64
import json

import pytest
from treq.testing import StubTreq
from twisted.conch.ssh.common import NS
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols import amp

from edgeaccess import errors, httpapi
from edgeaccess.auth.common import _load_public_key
from edgeaccess.identity import kinds  # noqa: F401  (registers the resource kinds)
from edgeaccess.identity import resources, roles
from edgeaccess.pki import keys, sshca
from tests.logwatch import LoudLog
from tests.tunnel.support import make_server_factory
from tests.tunnel.test_protocol import hello_box

_COMPRESSED_ECDSA = b"ecdsa-sha2-nistp256 " + base64.b64encode(
    NS(b"ecdsa-sha2-nistp256") + NS(b"nistp256") + NS(b"\x02" + b"\x11" * 32))


@pytest.mark.parametrize("line", [
    b"-----BEGIN PUBLIC KEY-----",          # cryptography: UnsupportedAlgorithm
    b"ssh-foo AAAAB3NzaC1rc2EAAAADAQAB",     # unknown key type: UnsupportedAlgorithm
    _COMPRESSED_ECDSA,                       # NotImplementedError: Need uncompressed point
], ids=["pem-as-openssh", "unknown-type", "compressed-ecdsa"])
def test_unparseable_ssh_keys_are_value_errors_and_400s(line: bytes) -> None:
    with pytest.raises(ValueError):
        keys.load_public_key_openssh(line)
    with pytest.raises(ValueError):
        sshca.load_certificate(line)
    with pytest.raises(errors.BadRequest):
        _load_public_key(line.decode(), "ssh_public_key")


@pytest.mark.parametrize("text", ["99999999999999999d", "9" * 5000 + "s", "3651d"])
def test_huge_durations_in_requests_are_400(text: str) -> None:
    with pytest.raises(errors.BadRequest):
        httpapi.parse_duration(text)


@pytest.mark.parametrize("text", ["99999999999999999999h", "9" * 400 + "h"])
def test_huge_durations_in_roles_are_refused(text: str) -> None:
    with pytest.raises(errors.BadRequest):
        roles.parse_duration(text)


def test_login_with_a_huge_ttl_is_a_400_not_a_500() -> None:
    from tests.auth.authkit import InlineReactor, InlineThreadPool, make_authority, resolve
    from edgeaccess.auth.service import AuthServer
    from edgeaccess.backend.memory import MemoryBackend
    from edgeaccess.proxy.web import ProxyWeb

    clock = Clock()
    auth = AuthServer(make_authority(), MemoryBackend(clock), clock, reactor=InlineReactor(),
                      threadpool=InlineThreadPool())
    resolve(auth.bootstrap())
    stub = StubTreq(ProxyWeb(auth, lambda: {"web": "x:1", "ssh": "x:2"}, "x").resource())
    body = json.dumps({"user": "u", "password": "p", "ssh_public_key": "k",
                       "ttl": "99999999999999999d"}).encode()
    d = stub.post("https://x/v1/login", data=body)
    stub.flush()
    responses: list = []
    d.addBoth(responses.append)
    assert responses[0].code == 400


def test_yaml_with_a_control_character_is_a_bad_resource() -> None:
    with pytest.raises(errors.BadResource, match="invalid YAML"):
        resources.parse_resources(b"\x00kind: role\n")
    with pytest.raises(errors.BadResource, match="invalid YAML"):
        resources.parse_resources("kind: role\x07\n")


@pytest.mark.parametrize("box", [
    amp.AmpBox(_command=b"Heartbeat", _error=b"99", _error_code=b"X", _error_description=b"y"),
    amp.AmpBox(_command=b"Heartbeat", _answer=b"5"),
    amp.AmpBox(_error=b"5"),
], ids=["error-and-command", "answer-and-command", "error-without-code"])
def test_answers_and_errors_are_checked_in_amps_order(box) -> None:
    # AMP reads _answer, then _error, then _command: a box with an error tag
    # and a command is an error to no question, refused without a traceback.
    server = make_server_factory(MemoryReactorClock()).buildProtocol(None)
    transport = StringTransport()
    server.makeConnection(transport)
    with LoudLog() as loud:
        server.dataReceived(hello_box())
        server.dataReceived(box.serialize())
    loud.assert_quiet()
    assert transport.disconnecting
    assert server.closed_reason in ("answer to no question", "malformed error box")


def test_deeply_nested_json_bodies_are_400() -> None:
    from twisted.web.test.requesthelper import DummyRequest

    request = DummyRequest([b""])
    request.content = __import__("io").BytesIO(b"[" * 100_000)
    with pytest.raises(errors.BadRequest, match="nested too deeply"):
        httpapi.read_json(request)


def test_a_deeply_nested_inventory_is_a_bad_request() -> None:
    from edgeaccess.tunnel.protocol import Inventory

    with pytest.raises(errors.BadRequest):
        Inventory.from_json("[" * 60_000)


@pytest.mark.parametrize("text", [
    b'kind: role\nmetadata: {name: "\\U00110000"}\n',   # an escape beyond Unicode: chr() fails
    b'kind: role\nmetadata: {name: "\\UFFFFFFFF"}\n',   # beyond a C int: OverflowError
    b"[" * 5000,                                           # the composer recurses per level
    b"a: " + b"{a: " * 3000,
], ids=["escape-beyond-unicode", "escape-beyond-c-int", "nested-lists", "nested-maps"])
def test_yaml_that_pyyaml_chokes_on_is_a_bad_resource(text: bytes) -> None:
    with pytest.raises(errors.BadResource, match="invalid YAML"):
        resources.parse_resources(text)


def test_a_certificate_with_a_corrupt_ca_key_is_refused_as_malformed() -> None:
    import random

    from tests.fuzz.targets import TARGETS

    fields = {"user": True, "key_id": b"\x00" * 7, "principals": [b""],
              "valid_after": 1_799_999_940, "valid_before": 1_800_003_600,
              "extensions": {}, "critical": {}, "signer": "ca"}
    value = {"mode": "fields", "login": "root", "peer": "127.0.0.1", "algorithm": None,
             "signature": None, "fields": fields}
    # The mutants the fuzzer found: one cuts the CA key's point short, which
    # cryptography parses only when asked (ValueError in verification).
    target = TARGETS["ssh-cert"]
    check, rng = target.make(), random.Random(34)
    for _ in range(19):
        check(target.mutate(value, rng))  # raises on anything but CertificateInvalid/AccessDenied
