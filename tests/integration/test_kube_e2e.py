"""kubectl through the proxy's Kubernetes port and a tunnelled agent, against the API stand-in.

One world per module (tests/kube_world.py): the Kubernetes API stand-in
(tests/kube_standin.py; no kube-apiserver can be installed here), a proxy,
a kube-only node (``--kube-cluster standin --no-ssh``) with a reverse tunnel,
and users whose kubeconfigs ``edge kube login`` wrote:

- alice: role kube-viewer (group ``viewers`` on clusters labelled env=test);
- bob: role kube-editor (user ``cluster-admin``, groups ``editors`` and his
  ``kube_teams`` trait);
- carol: a role that allows the cluster but gives no groups nor users;
- dave: a role for clusters labelled env=prod only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeaccess.devcluster import wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
from tests.integration.steps import kubectl_port_forward_round_trips  # noqa: E402
from tests.kube_world import KUBECTL, start_world  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.exists(KUBECTL), reason="kubectl is not installed")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = start_world(tmp_path_factory.mktemp("kube"))
    yield world
    world.stop()


def kube_events(world, event_type: str = "kube.request") -> list[dict]:
    return world.proxy.edgectl_json("audit", "search", "--type", event_type)


def test_edge_kube_ls_shows_allowed_clusters_with_the_identity_used(world):
    listed = json.loads(world.edge("bob", "kube", "ls", "--format", "json").stdout)
    assert [k["name"] for k in listed] == ["standin"]
    assert listed[0]["labels"] == {"env": "test"}
    assert listed[0]["kube_user"] == "cluster-admin"
    assert "editors" in listed[0]["kube_groups"]
    # dave's role allows only env=prod clusters: nothing to list, nothing to log in to.
    assert json.loads(world.edge("dave", "kube", "ls", "--format", "json").stdout) == []
    refused = world.edge("dave", "kube", "login", "standin")
    assert refused.returncode != 0 and "not found" in refused.stderr


def test_kube_login_merges_into_an_existing_kubeconfig_and_logout_removes_only_its_entries(
        world, tmp_path):
    home = world.home("bob")
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: other\n"
        "clusters: [{name: other, cluster: {server: 'https://example.invalid'}}]\n"
        "users: [{name: other, user: {token: keep-me}}]\n"
        "contexts: [{name: other, context: {cluster: other, user: other}}]\n")
    env = {**world.env("bob"), "KUBECONFIG": str(kubeconfig)}
    run = subprocess.run([sys.executable, "-m", "edgeaccess.client.main", "kube", "login",
                          "standin"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    import yaml

    doc = yaml.safe_load(kubeconfig.read_text())
    assert doc["current-context"] == "kube-e2e-standin"
    assert {c["name"] for c in doc["contexts"]} == {"other", "kube-e2e-standin"}
    assert doc["users"][0] == {"name": "other", "user": {"token": "keep-me"}}
    got = subprocess.run([KUBECTL, "get", "pods", "-o", "name"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    # logout in a copy of the profile (bob's own stays logged in for the other tests)
    import shutil

    copy = tmp_path / "edge-home"
    shutil.copytree(home, copy)
    entries = json.loads((copy / "kube_logins.json").read_text())
    (copy / "kube_logins.json").write_text(json.dumps(
        [e for e in entries if e["kubeconfig"] == str(kubeconfig)]))
    out = subprocess.run([sys.executable, "-m", "edgeaccess.client.main", "logout"],
                         env={**env, "EDGE_HOME": str(copy)}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    doc = yaml.safe_load(kubeconfig.read_text())
    assert [c["name"] for c in doc["contexts"]] == ["other"]
    assert [c["name"] for c in doc["clusters"]] == ["other"]


def test_get_pods_as_a_table_reaches_the_api_as_the_user(world):
    result = world.kubectl("alice", "get", "pods")
    assert result.returncode == 0, result.stderr
    assert "web-1" in result.stdout and "Running" in result.stdout
    seen = [r for r in world.standin.requests() if r["impersonated_user"] == "alice"]
    assert seen, "the API saw no request impersonating alice"
    assert all(r["authenticated"] == "edge-agent" for r in seen)
    assert all(r["impersonated_groups"] == ["viewers", "system:authenticated"] for r in seen)
    assert not any(r["had_client_authorization"] for r in seen)


def test_client_impersonation_headers_and_credentials_never_reach_the_api(world):
    # --as with a value alice's roles do not allow: refused by the proxy.
    refused = world.kubectl("alice", "get", "pods", "--as", "cluster-admin")
    assert refused.returncode != 0
    assert "impersonating user 'cluster-admin'" in refused.stderr
    refused = world.kubectl("alice", "get", "pods", "--as", "alice", "--as-group", "editors")
    assert refused.returncode != 0 and "impersonating group 'editors'" in refused.stderr
    # --as with an allowed value (bob's kubernetes_users) passes.
    allowed = world.kubectl("bob", "get", "pods", "--as", "cluster-admin")
    assert allowed.returncode == 0, allowed.stderr
    assert not any(r["impersonated_user"] in (None, "") for r in world.standin.requests()
                   if r["authenticated"] == "edge-agent" and r["path"] != "/version")


def test_a_user_whose_roles_give_no_groups_is_refused_with_a_clear_message(world):
    result = world.kubectl("carol", "get", "--raw", "/k8s/standin/api/v1/namespaces/default/pods")
    assert result.returncode != 0
    assert "give no kubernetes_groups or kubernetes_users" in result.stderr
    assert not any(r.get("impersonated_user") == "carol" for r in world.standin.requests())


def test_rbac_of_the_api_answers_with_its_own_forbidden_status(world):
    result = world.kubectl("alice", "delete", "pod", "web-2")
    assert result.returncode != 0
    assert 'User "alice" cannot delete resource "pods"' in result.stderr


def test_watch_streams_events_as_they_happen(world):
    watcher = subprocess.Popen([KUBECTL, "get", "pods", "-w"], env=world.env("alice"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = watcher.stdout.readline()
        assert "NAME" in first
        wait_for(lambda: any(r["impersonated_user"] == "alice" and
                             r["query"].get("watch") == ["true"]
                             for r in world.standin.requests()), 30, "the watch request")
        created = world.kubectl("bob", "run", "watched-pod", "--image=busybox")
        assert created.returncode == 0, created.stderr
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = watcher.stdout.readline()
            if "watched-pod" in line:
                break
        else:
            pytest.fail("the watch never showed the new pod")
    finally:
        watcher.kill()
        watcher.wait()


def test_logs_follow_streams_until_the_client_leaves(world):
    follower = subprocess.Popen([KUBECTL, "logs", "-f", "web-1"], env=world.env("alice"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [follower.stdout.readline() for _ in range(12)]
        assert lines == [f"web-1 log line {n}\n" for n in range(1, 13)]
    finally:
        follower.kill()
        follower.wait()


def test_apply_creates_then_patches_and_server_side_apply_works(world, tmp_path):
    manifest = tmp_path / "cm.yaml"
    manifest.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: applied}\n"
                        "data: {a: '1'}\n")
    first = world.kubectl("bob", "apply", "-f", str(manifest))
    assert first.returncode == 0 and "created" in first.stdout, first.stderr
    manifest.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: applied}\n"
                        "data: {a: '2', b: '3'}\n")
    second = world.kubectl("bob", "apply", "-f", str(manifest))
    assert second.returncode == 0 and "configured" in second.stdout, second.stderr
    ssa = world.kubectl("bob", "apply", "--server-side", "-f", str(manifest))
    assert ssa.returncode == 0, ssa.stderr
    data = world.kubectl("bob", "get", "cm", "applied", "-o", "jsonpath={.data}")
    assert json.loads(data.stdout) == {"a": "2", "b": "3"}
    methods = [r["method"] for r in world.standin.requests()
               if r["path"].endswith("/configmaps/applied") or
               r["path"].endswith("/configmaps") and r["method"] == "POST"]
    assert "POST" in methods and methods.count("PATCH") >= 2


def test_exec_with_stdin_passes_data_and_the_exit_code(world):
    result = world.kubectl("bob", "exec", "-i", "web-1", "--", "sh", "-c",
                           "tr a-z A-Z; exit 7", input="hello through the tunnel\n")
    assert result.stdout == "HELLO THROUGH THE TUNNEL\n"
    assert result.returncode == 7
    assert "exit code 7" in result.stderr
    event = wait_for(lambda: [e for e in kube_events(world, "exec")
                              if e.get("exit_code") == 7], 30, "the exec event")[-1]
    assert event["user"] == "bob" and event["kube_cluster"] == "standin"
    assert event["command"] == "sh -c tr a-z A-Z; exit 7"
    assert event["pod"] == "web-1" and event["namespace"] == "default"
    assert event["success"] is False


def test_exec_is_refused_for_a_viewer_by_the_api(world):
    result = world.kubectl("alice", "exec", "web-1", "--", "true")
    assert result.returncode != 0
    assert 'cannot create resource "pods" subresource "exec"' in result.stderr


def test_interactive_exec_in_a_pty_resizes_and_is_recorded(world):
    import pexpect

    child = pexpect.spawn(KUBECTL, ["exec", "-it", "web-2", "--", "/bin/sh"],
                          env=world.env("bob"), dimensions=(24, 80), timeout=30,
                          encoding="utf-8")
    try:
        child.expect_exact("$ ")
        child.sendline("echo recorded-$((6*7))")
        child.expect_exact("recorded-42")
        child.setwinsize(40, 132)
        wait_for(lambda: any(s.get("event") == "resize" and s["width"] == 132 and
                             s["height"] == 40 for s in world.standin.sessions()),
                 30, "the resize at the stand-in")
        child.sendline("stty size")
        child.expect_exact("40 132")
        child.sendline("exit 0")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    end = wait_for(lambda: [e for e in kube_events(world, "session.end")
                            if e.get("kube_cluster") == "standin" and e.get("pod") == "web-2"],
                   30, "session.end")[-1]
    assert end["user"] == "bob" and end["exit_code"] == 0
    session_id = end["session_id"]
    start = [e for e in kube_events(world, "session.start") if e.get("session_id") == session_id]
    assert start and start[0]["interactive"] is True

    def played():
        result = world.edge("bob", "play", session_id, "--format", "cast")
        return result.stdout if result.returncode == 0 else None

    cast = wait_for(played, 30, "the recording")
    lines = [json.loads(line) for line in cast.splitlines()]
    assert lines[0]["version"] == 2
    assert any(kind == "o" and "recorded-42" in data for _t, kind, data in lines[1:])
    assert any(kind == "r" and data == "132x40" for _t, kind, data in lines[1:])
    # A terminal: its tunnel channel is sent ahead of bulk ones, on both ends.
    classed = [line for line in world.proxy.log().splitlines()
               if "kube:" in line and "is sent as interactive" in line]
    assert classed
    wait_for(lambda: any("kube:" in line and "is sent as interactive" in line
                         for line in world.node.log().splitlines()), 30,
             "the node told of the class")


def test_every_request_is_audited_with_user_verb_resource_and_code(world):
    world.kubectl("alice", "get", "pods")
    world.kubectl("alice", "delete", "pod", "web-2")
    assert world.kubectl("carol", "get", "pods").returncode != 0  # no groups: refused
    events = wait_for(lambda: [e for e in kube_events(world)
                               if e.get("user") == "alice" and e.get("verb") == "delete"],
                      30, "the audited delete")
    deleted = events[-1]
    assert deleted["response_code"] == 403 and deleted["success"] is False
    assert deleted["resource"] == "pods" and deleted["name"] == "web-2"
    assert deleted["namespace"] == "default" and deleted["kube_cluster"] == "standin"
    assert deleted["remote_addr"] == "127.0.0.1"
    listed = [e for e in kube_events(world) if e.get("user") == "alice" and
              e.get("verb") == "list" and e.get("resource") == "pods"]
    assert listed and listed[-1]["response_code"] == 200
    assert listed[-1]["kube_groups"] == ["viewers", "system:authenticated"]
    refused = wait_for(lambda: [e for e in kube_events(world) if e.get("user") == "carol"],
                       30, "the audited refusal of carol")
    assert all(e["response_code"] == 403 for e in refused)


def test_exec_over_the_spdy_fallback_passes_stdin_and_the_exit_code(world):
    result = world.kubectl("bob", "exec", "-i", "web-1", "--", "sh", "-c", "tr a-z A-Z; exit 4",
                           input="spdy stream\n",
                           env={"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false"})
    assert result.stdout == "SPDY STREAM\n"
    assert result.returncode == 4
    assert any(s.get("protocol") == "SPDY/3.1" and s.get("exit_code") == 4
               for s in world.standin.sessions())
    event = wait_for(lambda: [e for e in kube_events(world, "exec")
                              if e.get("protocol") == "spdy"], 30, "the SPDY exec event")[-1]
    assert event["command"] == "sh -c tr a-z A-Z; exit 4" and event["user"] == "bob"
    assert event["exit_code"] == 4 and event["success"] is False


def test_interactive_exec_over_spdy_is_recorded_too(world):
    import pexpect

    child = pexpect.spawn(KUBECTL, ["exec", "-it", "web-1", "--", "/bin/sh"],
                          env={**world.env("bob"), "KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false"},
                          dimensions=(24, 80), timeout=30, encoding="utf-8")
    try:
        child.expect_exact("$ ")
        child.sendline("echo spdy-$((5*5))")
        child.expect_exact("spdy-25")
        child.sendline("exit 3")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    end = wait_for(lambda: [e for e in kube_events(world, "session.end")
                            if e.get("protocol") == "spdy"], 30, "the SPDY session.end")[-1]
    assert end["exit_code"] == 3 and end["pod"] == "web-1"
    cast = wait_for(lambda: (lambda r: r.stdout if r.returncode == 0 else None)(
        world.edge("bob", "play", end["session_id"], "--format", "cast")), 30, "the recording")
    assert "spdy-25" in cast


@pytest.mark.parametrize("websockets", ["true", "false"], ids=["websocket", "spdy"])
def test_port_forward_carries_data_both_ways(world, upper_echo_port, websockets):
    # Two connections through the same forward.
    kubectl_port_forward_round_trips(
        {**world.env("bob"), "KUBECTL_PORT_FORWARD_WEBSOCKETS": websockets}, upper_echo_port,
        "through the tunnel", rounds=2)


# --- bad input -------------------------------------------------------------------------


def _raw_request(world, user: str, data: bytes) -> bytes:
    """Send raw bytes over TLS with the user's certificate to the Kubernetes port."""
    import socket
    import ssl

    home = world.home(user)
    port = world.proxy.runtime()["listen"]["kube"].rpartition(":")[2]
    context = ssl.create_default_context(cafile=str(home / "ca.pem"))
    context.load_cert_chain(str(home / "tls.crt"), str(home / "tls.key"))
    with socket.create_connection(("127.0.0.1", int(port)), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(data)
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and b'"code"' in answer:
                    break
            return answer


def test_malformed_and_oversized_requests_get_a_status_and_the_proxy_goes_on(world):
    answer = _raw_request(world, "bob", b"GET /k8s/standin/version HTTP/1.1\r\nBad Header\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") and b'"kind": "Status"' in answer
    answer = _raw_request(world, "bob", b"POST /k8s/standin/api/v1/namespaces/default/configmaps"
                          b" HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    big = 17 * 1024 * 1024
    answer = _raw_request(world, "bob", b"POST /k8s/standin/api/v1/namespaces/default/configmaps"
                          b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          + f"Content-Length: {big}\r\n\r\n".encode() + b"{" * (big - 1))
    assert answer.startswith(b"HTTP/1.1 413") and b"larger than" in answer
    answer = _raw_request(world, "bob", b"GET /k8s/nosuchcluster/api HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404") and b"nosuchcluster not found" in answer
    assert world.kubectl("bob", "get", "pods").returncode == 0


def test_an_upgrade_the_api_refuses_is_answered_and_the_connection_goes_on(world):
    result = world.kubectl("bob", "exec", "no-such-pod", "--", "true")
    assert result.returncode != 0 and 'pods "no-such-pod" not found' in result.stderr
    assert world.kubectl("bob", "get", "pods").returncode == 0


def test_a_client_vanishing_mid_stream_leaves_nothing_broken(world):
    import signal

    follower = subprocess.Popen([KUBECTL, "logs", "-f", "web-1"], env=world.env("bob"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    follower.stdout.readline()
    follower.send_signal(signal.SIGKILL)
    follower.wait()
    assert world.kubectl("bob", "get", "pods").returncode == 0
    for log in (world.proxy.log(), world.node.log()):
        assert "Traceback" not in log and "Unhandled" not in log


class GarbageAPI:
    """A TLS server with the stand-in's certificate that answers every request with garbage."""

    def __init__(self, pki: dict) -> None:
        import socket
        import ssl
        import threading

        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki["server_cert"], pki["server_key"])
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn) -> None:
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(65536)
                tls.sendall(b"this is not HTTP at all\r\n\r\n")
        except OSError:
            pass

    def close(self) -> None:
        self.server.close()


def test_an_api_that_answers_garbage_or_is_down_gives_a_status_and_no_credential(world):
    from edgeaccess.devcluster import join_node
    from tests import kube_standin

    garbage = GarbageAPI(world.standin.pki)
    secret = "very-secret-agent-token-42"
    kubeconfig = kube_standin.write_kubeconfig(world.base / "flaky-kubeconfig", garbage.port,
                                               world.standin.pki, token=secret)
    node, _ = join_node(world.proxy, world.base, "flaky-agent", tunnel=True, extra_args=[
        "--kube-cluster", "flaky", "--kubeconfig", str(kubeconfig), "--kube-labels", "env=test",
        "--no-ssh"])
    try:
        wait_for(lambda: "flaky" in world.edge("bob", "kube", "ls").stdout, 30, "flaky listed")
        login = world.edge("bob", "kube", "login", "flaky")
        assert login.returncode == 0, login.stderr
        env = {"KUBECONFIG": str(world.kubeconfig("bob"))}
        context = ["--context", "kube-e2e-flaky"]
        bad = world.kubectl("bob", "get", "--raw", "/k8s/flaky/api/v1/namespaces", *context,
                            env=env)
        assert bad.returncode != 0 and "sent an invalid answer" in bad.stderr, bad.stderr
        garbage.close()
        down = world.kubectl("bob", "get", "--raw", "/k8s/flaky/api/v1/namespaces", *context,
                             env=env)
        assert down.returncode != 0 and "is unreachable" in down.stderr, down.stderr
        for text in (bad.stderr, down.stderr, world.proxy.log(), node.log()):
            assert secret not in text
        assert "answered garbage" in node.log() and "unreachable" in node.log()
    finally:
        garbage.close()
        node.stop()
        world.edge("bob", "kube", "login", "standin")  # select the stand-in again


def test_an_expired_login_makes_kubectl_say_run_edge_login(world, tmp_path):
    import shutil

    import yaml

    home = tmp_path / "expired-home"
    shutil.copytree(world.home("bob"), home)
    profile = json.loads((home / "profile.json").read_text())
    profile["valid_before"] = "2020-01-01T00:00:00Z"
    (home / "profile.json").write_text(json.dumps(profile))
    doc = yaml.safe_load((home / "kubeconfig").read_text())
    for user in doc["users"]:
        user["user"]["exec"]["env"] = [{"name": "EDGE_HOME", "value": str(home)}]
    (home / "kubeconfig").write_text(yaml.safe_dump(doc))
    result = subprocess.run([KUBECTL, "get", "pods"], capture_output=True, text=True,
                            timeout=60, env={**world.env("bob"), "EDGE_HOME": str(home),
                                             "KUBECONFIG": str(home / "kubeconfig")})
    assert result.returncode != 0
    assert "run edge login" in result.stderr


def test_kubectl_cp_both_ways(world, tmp_path):
    # The stand-in's "containers" are the local machine: the pod path is a temp directory.
    source = tmp_path / "upload.bin"
    source.write_bytes(os.urandom(300_000))
    inside = tmp_path / "in-pod"
    inside.mkdir()
    up = world.kubectl("bob", "cp", str(source), f"web-1:{inside}/copied.bin")
    assert up.returncode == 0, up.stderr
    assert (inside / "copied.bin").read_bytes() == source.read_bytes()
    back = tmp_path / "back.bin"
    down = world.kubectl("bob", "cp", f"web-1:{inside}/copied.bin", str(back))
    assert down.returncode == 0, down.stderr
    assert back.read_bytes() == source.read_bytes()


def test_a_lock_refuses_new_requests_and_cuts_an_open_watch(world):
    watcher = subprocess.Popen([KUBECTL, "get", "pods", "-w"], env=world.env("bob"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock_id = None
    try:
        assert "NAME" in watcher.stdout.readline()
        wait_for(lambda: any(r["impersonated_user"] == "cluster-admin" and
                             r["query"].get("watch") == ["true"]
                             for r in world.standin.requests()), 30, "bob's watch")
        locked = world.proxy.edgectl("lock", "--user", "bob", "--message", "kube audit drill")
        lock_id = locked.stdout.split()[-1] if locked.stdout.split() else None
        started = time.monotonic()
        watcher.wait(timeout=30)
        assert time.monotonic() - started < 10
        refused = world.kubectl("bob", "get", "--raw", "/k8s/standin/api/v1/namespaces")
        assert refused.returncode != 0 and "kube audit drill" in refused.stderr
    finally:
        watcher.kill()
        watcher.wait()
        for lock in world.proxy.edgectl_json("locks", "ls"):
            world.proxy.edgectl("locks", "rm", lock["id"])
    wait_for(lambda: world.kubectl("bob", "get", "pods").returncode == 0, 30,
             "bob unlocked again")
