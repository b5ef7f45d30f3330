"""Kubeconfig files: the agent's credential in, the user's contexts out."""

from __future__ import annotations

import base64
import json
import re
import sys

import pytest
import yaml

from edgeaccess import errors
from edgeaccess.kube import kubeconfig


def write(path, user: dict, server="https://127.0.0.1:6443"):
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(b"CA").decode()}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    return path


def test_client_certificate_files_relative_to_the_kubeconfig(tmp_path):
    (tmp_path / "c.pem").write_bytes(b"CERT")
    (tmp_path / "k.pem").write_bytes(b"KEY")
    config = kubeconfig.load_agent_config(write(tmp_path / "kc", {
        "client-certificate": "c.pem", "client-key": "k.pem"}))
    assert (config.host, config.port, config.tls) == ("127.0.0.1", 6443, True)
    assert config.ca_pem == b"CA" and config.cert_pem == b"CERT" and config.key_pem == b"KEY"
    assert "KEY" not in repr(config)


def test_token_file_is_read_and_never_shown(tmp_path):
    (tmp_path / "token").write_text("s3cret\n")
    config = kubeconfig.load_agent_config(write(tmp_path / "kc", {"tokenFile": "token"}))
    assert kubeconfig.read_static_credential(config).token == "s3cret"
    assert "s3cret" not in repr(kubeconfig.read_static_credential(config))


def test_exec_plugin_gives_a_token_with_its_expiry(tmp_path):
    script = tmp_path / "plugin.py"
    script.write_text("import json, os\n"
                      "assert json.loads(os.environ['KUBERNETES_EXEC_INFO'])['kind'] == "
                      "'ExecCredential'\n"
                      "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1', "
                      "'kind': 'ExecCredential', 'status': {'token': 'from-plugin', "
                      "'expirationTimestamp': '2030-01-01T00:00:00Z'}}))\n")
    config = kubeconfig.load_agent_config(write(tmp_path / "kc", {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
        "args": [str(script)]}}))
    credential = kubeconfig.run_exec_plugin(config.exec_plugin)
    assert credential.token == "from-plugin" and credential.expires == 1893456000.0


@pytest.mark.parametrize("user, server, message", [
    ({}, "https://h:1", "has no credential"),
    ({"token": "t"}, "ftp://h", "not an http(s) URL"),
    ({"token": "t"}, "https://h:1/prefix", "with a path"),
    ({"client-certificate-data": base64.b64encode(b"x").decode()}, "https://h", "needs its key"),
])
def test_unusable_kubeconfigs_are_refused_with_a_reason(tmp_path, user, server, message):
    with pytest.raises(errors.BadRequest, match=re.escape(message)):
        kubeconfig.load_agent_config(write(tmp_path / "kc", user, server))


def test_exec_plugin_failures_are_clear(tmp_path):
    plugin = kubeconfig.ExecPlugin(command=sys.executable, args=("-c", "print('nope')"))
    with pytest.raises(errors.BadRequest, match="did not answer an ExecCredential"):
        kubeconfig.run_exec_plugin(plugin)
    plugin = kubeconfig.ExecPlugin(command=sys.executable, args=("-c", "raise SystemExit(3)"))
    with pytest.raises(errors.BadRequest, match="exited with 3"):
        kubeconfig.run_exec_plugin(plugin)


def test_login_merges_and_removal_leaves_other_entries(tmp_path):
    path = tmp_path / "config"
    path.write_text("apiVersion: v1\nkind: Config\ncurrent-context: mine\n"
                    "clusters: [{name: mine, cluster: {server: 'https://x'}}]\n"
                    "users: [{name: mine, user: {token: t}}]\n"
                    "contexts: [{name: mine, context: {cluster: mine, user: mine}}]\n"
                    "preferences: {colors: true}\n")
    for _ in range(2):  # a second login replaces, never duplicates
        kubeconfig.merge_login(path, "root-prod", server="https://p:3026/k8s/prod",
                               ca_pem=b"CA", exec_command="edge", exec_args=["kube"],
                               exec_env={"EDGE_HOME": "/h"})
    doc = yaml.safe_load(path.read_text())
    assert doc["current-context"] == "root-prod"
    assert [c["name"] for c in doc["clusters"]] == ["mine", "root-prod"]
    assert doc["users"][1]["user"]["exec"]["apiVersion"] == "client.authentication.k8s.io/v1"
    assert doc["preferences"] == {"colors": True}
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert kubeconfig.remove_login(path, ["root-prod"]) == ["root-prod"]
    doc = yaml.safe_load(path.read_text())
    assert [c["name"] for c in doc["contexts"]] == ["mine"] and doc["current-context"] == ""
    assert doc["users"] == [{"name": "mine", "user": {"token": "t"}}]


def test_the_exec_credential_kubectl_reads():
    from datetime import datetime, timezone

    cred = kubeconfig.exec_credential("CERT", "KEY", datetime(2030, 1, 1, tzinfo=timezone.utc))
    assert json.loads(json.dumps(cred))["status"] == {
        "clientCertificateData": "CERT", "clientKeyData": "KEY",
        "expirationTimestamp": "2030-01-01T00:00:00Z"}
