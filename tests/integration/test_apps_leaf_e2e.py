"""An app of a leaf cluster reached through the root: two real proxies (the
root's public host is ``edge.localhost``), the leaf trusting the root, a
tunnelled leaf node publishing the demo app. The root relays the user's
connection through the leaf's tunnel; the leaf checks its own (mapped) roles
and signs the assertion with its own key, which the app verifies against the
leaf's JWKS.
"""

from __future__ import annotations

import json

import pytest

from edgeaccess.devcluster import ProxyProcess, join_node, run_edge, stop_process, wait_for
from tests.apps.appkit import (
    PUBLIC_HOST,
    app_login,
    browser_trusting_web_ca,
    curl,
    edge_login,
    start_demo_app,
    start_proxy,
    web_listen,
    web_login,
    web_port,
)
from tests.integration.steps import browser_app_session_ended_by_ui_logout, trusted_cluster_yaml

LEAF_ROLE = """\
kind: role
version: v1
metadata: {name: leaf-ops}
spec:
  allow: {app_labels: {team: ops}}
"""


def trust_yaml(token: str, pin: str, web: str, tunnel: str) -> str:
    return trusted_cluster_yaml(name="root", token=token, pin=pin, web=web, tunnel=tunnel,
                                role_map={"access": ["access"], "webonly": ["leaf-ops"]})


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    base = tmp_path_factory.mktemp("appsleaf")
    root = start_proxy(base / "root", "root")
    leaf = demo = node = None
    try:
        leaf = ProxyProcess(base / "leaf", base / "leaf.log", cluster="leaf")
        leaf.start()
        demo, demo_port = start_demo_app(leaf)
        node, _ = join_node(leaf, base, "leafnode", tunnel=True,
                            extra_args=["--app", f"name=leafapp,uri=http://127.0.0.1:"
                                                 f"{demo_port},labels=team:web"])
        (base / "role.yaml").write_text(LEAF_ROLE)
        leaf.edgectl("create", "-f", str(base / "role.yaml"))
        token = root.edgectl_json("tokens", "add", "--type", "trusted_cluster")["token"]
        (base / "trust.yaml").write_text(trust_yaml(
            token, root.pin(), web_listen(root), root.runtime()["listen"]["tunnel"]))
        leaf.edgectl("create", "-f", str(base / "trust.yaml"))
        (base / "webonly.yaml").write_text(
            "kind: role\nversion: v1\nmetadata: {name: webonly}\n"
            "spec:\n  allow: {app_labels: {team: web}}\n")
        root.edgectl("create", "-f", str(base / "webonly.yaml"))
        root.add_user("alice", "alice-password-1", roles=("access",))
        root.add_user("bob", "bob-password-1", roles=("webonly",))
        alice = edge_login(root, base / "alice", "alice", "alice-password-1")
        bob = edge_login(root, base / "bob", "bob", "bob-password-1")

        def leaf_online():
            result = run_edge(alice, "clusters", "--format", "json")
            return result.returncode == 0 and any(
                c["name"] == "leaf" and c["status"] == "online"
                for c in json.loads(result.stdout))

        wait_for(leaf_online, 30, "leaf cluster online at the root", interval=0.3)
        yield {"root": root, "leaf": leaf, "alice": alice, "bob": bob, "demo_port": demo_port}
    finally:
        if node is not None:
            node.stop()
        stop_process(demo)
        if leaf is not None:
            leaf.stop()
        root.stop()



@pytest.fixture(scope="module")
def browser(clusters, tmp_path_factory):
    """Chromium that verifies the web port's certificate (the cluster's web CA)."""
    yield from browser_trusting_web_ca(clusters["root"], tmp_path_factory)


def test_leaf_apps_are_listed_through_the_root(clusters):
    result = run_edge(clusters["alice"], "apps", "ls", "--cluster", "leaf", "--format", "json")
    assert result.returncode == 0, result.stderr
    (app,) = json.loads(result.stdout)
    assert app["name"] == "leafapp" and app["cluster"] == "leaf"
    assert app["public_addr"].startswith("https://leafapp.edge.localhost:")
    # bob's root role maps to a leaf role that allows no app labelled team=web.
    result = run_edge(clusters["bob"], "apps", "ls", "--cluster", "leaf", "--format", "json")
    assert json.loads(result.stdout) == []


def test_leaf_app_through_the_root_with_the_leafs_signed_identity(clusters):
    config = app_login(clusters["alice"], "leafapp", "--cluster", "leaf")
    result = curl(config, "/api/whoami")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["verified"] is True, answer  # against the leaf's JWKS
    assert answer["claims"]["iss"] == "leaf"
    assert answer["claims"]["username"] == "alice"
    assert answer["claims"]["roles"] == ["access"]  # the leaf's mapped roles
    assert answer["headers"]["X-Forwarded-For"] == ["127.0.0.1"]
    assert answer["headers"]["X-Forwarded-Host"] == [config["url"].removeprefix("https://")]
    body = bytes(range(256)) * 4096
    result = curl(config, "/api/echo", "--data-binary", "@-", input=body)
    assert result.stdout == body
    result = run_edge(clusters["bob"], "apps", "login", "leafapp", "--cluster", "leaf")
    assert result.returncode != 0 and "not allow" in result.stderr


def test_browser_reaches_a_leaf_app_through_the_roots_web_session(clusters, browser):
    """Launch from the root's web session (no app certificate): the root's
    launcher finds the app in the leaf, the app host sets its cookie, the page
    comes from the leaf's node with an identity the leaf signed; logging out
    of the root's web UI ends the access."""
    root = clusters["root"]
    port = web_port(root)
    ui = f"https://{PUBLIC_HOST}:{port}"
    app = f"https://leafapp.{PUBLIC_HOST}:{port}"
    context = browser.new_context()
    try:
        _, answer = browser_app_session_ended_by_ui_logout(
            context, ui, app, "alice", "alice-password-1", "/?from=leaf")
        # The leaf's JWKS verified it; the leaf signed and mapped the roles.
        assert answer["claims"]["iss"] == "leaf" and answer["claims"]["roles"] == ["access"]
        assert answer["headers"]["X-Forwarded-Host"] == [app.removeprefix("https://")]
    finally:
        context.close()

    def audited(kind):
        return [e for e in root.edgectl_json("audit", "search", "--type", kind)
                if e.get("user") == "alice" and e.get("app") == "leafapp"
                and e.get("method") == "web"]

    (start,) = audited("app.session.start")
    assert start["app_cluster"] == "leaf" and start["remote_addr"] == "127.0.0.1"
    (end,) = wait_for(lambda: audited("app.session.end"), 20, "app.session.end")
    assert end["reason"].startswith("web session ended") and end["app_cluster"] == "leaf"


def test_browser_launch_of_a_leaf_app_the_user_may_not_reach_is_refused(clusters, browser):
    root = clusters["root"]
    port = web_port(root)
    context = browser.new_context()
    try:
        page = context.new_page()
        web_login(page, f"https://{PUBLIC_HOST}:{port}", "bob", "bob-password-1")
        response = page.goto(f"https://leafapp.{PUBLIC_HOST}:{port}/")
        assert response.status == 404, page.inner_text("body")[:300]
        assert "no app named leafapp you may reach" in page.inner_text("body")
        assert not [c for c in context.cookies(f"https://leafapp.{PUBLIC_HOST}:{port}")
                    if c["name"] == "__Host-edge-app"]
    finally:
        context.close()
