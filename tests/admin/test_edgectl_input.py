"""``edgectl`` refuses bad input with one clear line before it talks to anyone.

The auth server address given here (127.0.0.1:9, discard) is never dialled:
every case fails while reading the command line or the YAML file.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from edgeaccess.admin import main as edgectl
from edgeaccess.pki import keys, x509ca

NOW = datetime.now(timezone.utc)


@pytest.fixture(scope="module")
def identity_file(tmp_path_factory):
    """An admin identity file (key, certificate, CA) as the proxy writes it."""
    ca_key, ca_cert = x509ca.create_ca("example", NOW)
    key = keys.generate_private_key()
    cert = x509ca.issue_identity_certificate(
        ca_key, ca_cert, key.public_key(),
        x509ca.Identity(kind="admin", name="admin", cluster="example"),
        now=NOW, ttl=timedelta(hours=1))
    path = tmp_path_factory.mktemp("admin") / "identity.pem"
    keys.write_secret(path, keys.private_key_pem(key) + x509ca.certificate_pem(cert)
                      + x509ca.certificate_pem(ca_cert))
    return path


def _edgectl(capsys, identity_file, *argv) -> tuple[int, str, str]:
    code = edgectl.main(["--auth-server", "127.0.0.1:9", "--identity", str(identity_file),
                         *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _create(tmp_path, capsys, identity_file, text: str) -> tuple[int, str, str]:
    path = tmp_path / "resource.yaml"
    path.write_text(text)
    return _edgectl(capsys, identity_file, "create", "-f", str(path))


@pytest.mark.parametrize("text, expected", [
    ("kind: role\nmetadata: {name: dev\n", "line"),
    ("kind: role\n  version: v1\n bad: [", "line"),
    ("kind: gadget\nversion: v1\nmetadata: {name: x}\n", "unknown resource kind"),
    ("version: v1\nmetadata: {name: x}\n", "missing 'kind'"),
    ("kind: role\nversion: v1\nmetadata: {description: nameless}\nspec: {}\n",
     "metadata.name"),
    ("kind: role\nversion: v1\nspec: {}\n", "metadata"),
    ("- just\n- a list\n", "must be a mapping"),
    ("", "no resource"),
    ("kind: role\nversion: v1\nmetadata: {name: dev}\nspec: {allow: {logins: 7}}\n", "logins"),
])
def test_bad_resource_files_give_one_clear_line(tmp_path, capsys, identity_file, text,
                                                expected):
    code, out, err = _create(tmp_path, capsys, identity_file, text)
    assert code == 1
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert "Traceback" not in err


def test_a_bad_second_document_stops_the_first_from_being_sent(tmp_path, capsys,
                                                                identity_file):
    text = ("kind: role\nversion: v1\nmetadata: {name: good}\nspec: {}\n---\n"
            "kind: gadget\nversion: v1\nmetadata: {name: bad}\n")
    code, out, err = _create(tmp_path, capsys, identity_file, text)
    assert code == 1 and out == ""
    assert "unknown resource kind" in err and "cannot reach" not in err


def test_missing_resource_file(tmp_path, capsys, identity_file):
    code, _, err = _edgectl(capsys, identity_file, "create", "-f", str(tmp_path / "nope.yaml"))
    assert code == 1
    assert err == f"error: file {tmp_path / 'nope.yaml'} not found\n"


@pytest.mark.parametrize("target", ["role", "role/", "dev"])
def test_rm_needs_kind_slash_name(capsys, identity_file, target):
    code, _, err = _edgectl(capsys, identity_file, "rm", target)
    assert code == 1
    assert err == "error: rm takes KIND/NAME, e.g. role/dev\n"


def test_get_of_an_unknown_kind(capsys, identity_file):
    code, _, err = _edgectl(capsys, identity_file, "get", "gadgets")
    assert code == 1
    assert "unknown kind 'gadgets'" in err and err.count("\n") == 1


def test_data_dir_without_a_running_proxy(tmp_path, capsys):
    code = edgectl.main(["--data-dir", str(tmp_path), "status"])
    _, err = capsys.readouterr()
    assert code == 1
    assert "has no runtime.json" in err and err.count("\n") == 1


def test_auth_server_needs_an_identity(capsys):
    code = edgectl.main(["--auth-server", "127.0.0.1:9", "status"])
    _, err = capsys.readouterr()
    assert code == 1
    assert err == "error: --auth-server needs --identity FILE\n"


def test_no_server_at_all(capsys):
    code = edgectl.main(["status"])
    _, err = capsys.readouterr()
    assert code == 1
    assert "--data-dir" in err and err.count("\n") == 1


def test_empty_password_is_refused(capsys, identity_file, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    code, _, err = _edgectl(capsys, identity_file, "users", "set-password", "alice",
                            "--password-stdin")
    assert code == 1
    assert err == "error: empty password\n"
