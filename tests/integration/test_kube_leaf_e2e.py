"""A leaf cluster's Kubernetes, reached by a root cluster's user through the root's proxy.

The leaf runs the agent (tests/kube_world.py) and decides with its own roles,
mapped from the root user's by the trusted cluster's role map; the request
crosses the leaf's tunnel to the root (``cluster`` channel ``kube:NAME``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeaccess.devcluster import ProxyProcess, run_edge, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
from tests.kube_world import KUBECTL, PASSWORD, start_world  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.exists(KUBECTL), reason="kubectl is not installed")

ROOT_ROLE = """
kind: role
version: v1
metadata: {name: root-kube}
spec:
  allow:
    logins: [nobody]
"""


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    base = tmp_path_factory.mktemp("kube-leaf")
    root = ProxyProcess(base / "root", base / "root.log", cluster="kroot").start()
    leaf = ProxyProcess(base / "leaf", base / "leaf.log", cluster="kleaf").start()
    world = None
    try:
        world = start_world(base / "leaf-world", proxy=leaf, users={})
        (base / "root-role.yaml").write_text(ROOT_ROLE)
        root.edgectl("create", "-f", str(base / "root-role.yaml"))
        root.add_user("rooty", PASSWORD, roles=("root-kube",))
        token = root.edgectl_json("tokens", "add", "--type", "trusted_cluster")["token"]
        (base / "trust.yaml").write_text(f"""
kind: trusted_cluster
version: v1
metadata: {{name: kroot}}
spec:
  enabled: true
  token: {token}
  ca_pin: {root.pin()}
  web_proxy_addr: {root.addr("web")}
  tunnel_addr: {root.addr("tunnel")}
  role_map: [{{remote: root-kube, local: [kube-editor]}}]
""")
        leaf.edgectl("create", "-f", str(base / "trust.yaml"))
        home = base / "home-rooty"
        root.login(home, "rooty", PASSWORD)
        wait_for(lambda: "leaf cluster kleaf is online" in root.log(), 30, "the leaf tunnel")
        wait_for(lambda: "trusted root clusters: ['kroot']" in world.node.log(), 30,
                 "the leaf's agent to learn the root's role map")
        yield root, leaf, world, home
    finally:
        if world is not None:
            world.stop()
        leaf.stop()
        root.stop()


def test_a_root_user_lists_and_uses_the_leafs_kubernetes_with_the_leafs_roles(clusters):
    root, leaf, world, home = clusters
    env = {**os.environ, "EDGE_HOME": str(home), "KUBECONFIG": str(home / "kubeconfig"),
           "HOME": str(home)}
    listed = run_edge(home, "kube", "ls", "--cluster", "kleaf", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert [e["name"] for e in entries] == ["standin"]
    assert entries[0]["kube_user"] == "cluster-admin"
    login = subprocess.run([sys.executable, "-m", "edgeaccess.client.main", "kube", "login",
                            "standin", "--cluster", "kleaf"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert login.returncode == 0, login.stderr
    assert "kleaf-standin" in (home / "kubeconfig").read_text()
    got = subprocess.run([KUBECTL, "get", "pods"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert got.returncode == 0, got.stderr + leaf.log()[-3000:]
    assert "web-1" in got.stdout
    # The leaf's role (kube-editor, mapped from root-kube) decided: user and groups.
    seen = [r for r in world.standin.requests() if r.get("impersonated_user") == "cluster-admin"]
    assert seen and seen[-1]["impersonated_groups"][0] == "editors"
    execd = subprocess.run([KUBECTL, "exec", "-i", "web-1", "--", "cat"], input="leaf data\n",
                           env=env, capture_output=True, text=True, timeout=60)
    assert execd.returncode == 0 and execd.stdout == "leaf data\n", execd.stderr
    # The leaf audits the request of the root's user.
    events = wait_for(lambda: [e for e in leaf.edgectl_json("audit", "search", "--type",
                                                            "kube.request")
                               if e.get("user") == "rooty"], 30, "the leaf's audit event")
    assert events[-1]["root_cluster"] == "kroot"
    assert events[-1]["kube_cluster"] == "standin"
    # ... and so does the root, in its own chain (docs/security.md, "Kubernetes": both).
    events = wait_for(lambda: [e for e in root.edgectl_json("audit", "search", "--type",
                                                            "kube.request")
                               if e.get("user") == "rooty"], 30, "the root's audit event")
    assert events[-1]["leaf_cluster"] == "kleaf"
    assert events[-1]["kube_cluster"] == "standin"


def test_a_root_user_whose_roles_map_to_nothing_is_refused_by_the_leaf(clusters):
    root, leaf, world, home = clusters
    root.add_user("unmapped", PASSWORD, roles=("access",))
    other = home.parent / "home-unmapped"
    root.login(other, "unmapped", PASSWORD)
    listed = run_edge(other, "kube", "ls", "--cluster", "kleaf", "--format", "json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr
