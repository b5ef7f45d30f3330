"""The resources page's apps and Kubernetes sections (in memory): only what
the roles allow (``app_labels``, ``kubernetes_labels``), in the selected
cluster (a leaf is asked with the session's identity), the label filter
applied, every value escaped."""

from __future__ import annotations

import html

import attrs
import pytest

from authkit import add_user, resolve
from edgeaccess import errors
from edgeaccess.apps.sessions import AppGateway, AppIndex
from edgeaccess.kube.proxy import KubeDirectory, RoleCache
from edgeaccess.pki.x509ca import Identity
from edgeaccess.proxy.web import ProxyWeb
from edgeaccess.tunnel.protocol import App, Inventory
from edgeaccess.tunnel.server import TunnelRegistry
from edgeaccess.web import sections
from edgeaccess.web.app import WebUI
from edgeaccess.web.sessions import WebSessionStore
from test_web_pages import HOST, Browser, log_in

XSS = "<script>window.__xss=1</script>"


@attrs.define(eq=False)
class Tunnel:
    """What the app index and the Kubernetes directory read of a node's tunnel."""

    identity: Identity
    inventory: Inventory


class Leaf:
    """A trusted leaf cluster answering the root's internal API: records what
    it was asked and as whom."""

    def __init__(self, answers: dict) -> None:
        self.answers = answers
        self.asked: list[tuple[str, str, Identity]] = []
        self.tunnels = {"leaf": object()}

    async def remote_clusters(self):
        return [{"name": "leaf", "status": "online"}]

    async def ask(self, cluster, path, identity):
        self.asked.append((cluster, path, identity))
        answer = self.answers[path]
        if isinstance(answer, Exception):
            raise answer
        return answer


class Kube:
    """The parts of KubeProxy that listing reads, with the real role cache and directory."""

    def __init__(self, auth, clock, registry) -> None:
        self.roles = RoleCache(auth, clock)
        resolve(self.roles.refresh())
        self.directory = KubeDirectory(registry)
        self.cluster_name = auth.cluster_name


ROLE = f"""kind: role
version: v1
metadata: {{name: web-only}}
spec:
  allow:
    logins: [root]
    app_labels: {{team: web}}
    kubernetes_labels: {{env: dev}}
    kubernetes_groups: [viewers]
"""


@pytest.fixture
def world(auth, clock, monkeypatch):
    import yaml

    resolve(auth.upsert_resource(yaml.safe_load(ROLE)))
    registry = TunnelRegistry()
    registry.register(Tunnel(
        Identity(kind="node", name="edge-1", cluster=auth.cluster_name, uuid="u-1"),
        Inventory(name="edge-1",
                  apps=(App("grafana", "http://127.0.0.1:3000", {"team": "web", "x": XSS}),
                        App("billing", "http://127.0.0.1:4000", {"team": "finance"}),
                        App("wiki", "http://127.0.0.1:5000", {"team": "web", "tier": "docs"})),
                  kube_clusters=("dev-k8s", "prod-k8s"),
                  kube_labels={"dev-k8s": {"env": "dev", "note": XSS},
                               "prod-k8s": {"env": "prod"}})))
    leaf = Leaf({
        "/v1/apps": [{"name": "leafapp", "labels": {"team": "web"}, "uri": "http://x"},
                     {"name": 7}, "junk", {"name": "evil.example/#"}, {"name": XSS}],
        "/v1/kube/clusters": [{"name": "leaf-k8s", "labels": {"env": "dev"},
                               "problem": XSS}],
        "/v1/nodes": [],
    })

    async def leaf_request(clock, tunnel, path, identity):  # the node list's way to the leaf
        return await leaf.ask("leaf", path, identity)

    monkeypatch.setattr("edgeaccess.cluster.root.leaf_request", leaf_request)
    ui = WebUI(auth, WebSessionStore(auth, clock), opener=None, clusters=leaf,
               addresses=lambda: {"web": HOST}, clock=clock)
    gateway = AppGateway(auth=auth, index=AppIndex(registry), sessions=None, keys=None,
                         public_host="proxy.example", web_addr=lambda: HOST, clock=clock)
    ui.resource_sections += [sections.app_section(gateway, leaf.ask),
                             sections.kube_section(Kube(auth, clock, registry), leaf.ask,
                                                   auth.cluster_name)]
    browser = Browser(ProxyWeb(auth, lambda: {"web": HOST, "ssh": "x:3023"}, "proxy.example",
                               None, ui=ui).resource())
    return browser, leaf


def rows(body: str, section: str) -> list[str]:
    import re

    table = body.split(f'<table id="{section}">', 1)[1].split("</table>", 1)[0]
    return re.findall(r'<tr data-name="([^"]*)"', table)


def test_apps_and_kube_clusters_the_roles_allow_with_launch_link_and_login_hint(auth, world):
    browser, _ = world
    add_user(auth, "alice", roles=("web-only",))
    log_in(browser)
    resp, body = browser.get("/web/")
    assert resp.code == 200
    assert rows(body, "apps") == ["grafana", "wiki"]  # not billing (team: finance)
    assert rows(body, "kube") == ["dev-k8s"]  # not prod-k8s (env: prod)
    assert 'href="https://grafana.proxy.example:3080/"' in body
    assert "<code class=\"hint\">edge kube login dev-k8s</code>" in body
    assert "<td>unit</td>" in body or f"<td>{auth.cluster_name}</td>" in body


def test_access_role_sees_every_app_and_kube_cluster(auth, world):
    browser, _ = world
    add_user(auth, "alice", roles=("access",))
    log_in(browser)
    _, body = browser.get("/web/")
    assert rows(body, "apps") == ["billing", "grafana", "wiki"]
    assert rows(body, "kube") == ["dev-k8s", "prod-k8s"]


def test_the_label_filter_applies_to_apps_and_kube_clusters(auth, world):
    browser, _ = world
    add_user(auth, "alice", roles=("access",))
    log_in(browser)
    _, body = browser.get("/web/?q=team%3Dweb")
    assert rows(body, "apps") == ["grafana", "wiki"]
    assert rows(body, "kube") == []
    assert "No Kubernetes clusters you may reach match" in body
    _, body = browser.get("/web/?q=prod")
    assert rows(body, "apps") == [] and rows(body, "kube") == ["prod-k8s"]


def test_labels_and_leaf_answers_with_script_are_escaped(auth, world):
    browser, _ = world
    add_user(auth, "alice", roles=("access",))
    log_in(browser)
    for path in ("/web/", "/web/?cluster=leaf"):
        _, body = browser.get(path)
        assert XSS not in body
    _, body = browser.get("/web/")
    assert html.escape(XSS, quote=False) in body


def test_a_selected_leaf_is_asked_as_the_user_and_its_answer_checked(auth, world):
    browser, leaf = world
    add_user(auth, "alice", roles=("access",))
    log_in(browser)
    _, body = browser.get("/web/?cluster=leaf")
    assert rows(body, "apps") == ["leafapp"]  # malformed entries dropped
    assert 'href="https://leafapp.proxy.example:3080/"' in body
    assert "evil.example" not in body  # a name that would make the link another site's
    assert rows(body, "kube") == ["leaf-k8s"]
    assert "edge kube login leaf-k8s --cluster leaf" in body
    asked = {(path, identity.name, identity.roles) for _, path, identity in leaf.asked}
    assert ("/v1/apps", "alice", ("access",)) in asked
    assert ("/v1/kube/clusters", "alice", ("access",)) in asked


def test_a_leaf_that_cannot_answer_gets_a_message_not_an_error_page(auth, world):
    browser, leaf = world
    leaf.answers["/v1/apps"] = errors.ClusterOffline("cluster leaf is offline")
    leaf.answers["/v1/kube/clusters"] = {"not": "a list"}
    add_user(auth, "alice", roles=("access",))
    log_in(browser)
    resp, body = browser.get("/web/?cluster=leaf")
    assert resp.code == 200
    assert "cannot list them in leaf: cluster leaf is offline" in body
    assert "cannot list them in leaf: cluster leaf sent a malformed list" in body
