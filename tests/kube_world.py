"""A running world for Kubernetes tests: the API stand-in, a proxy, a tunnelled
Kubernetes agent, and users with kubeconfigs (real processes on 127.0.0.1).

Used by ``tests/integration/test_kube_e2e.py`` and ``python -m benchmarks kube``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import attrs

from edgeaccess.devcluster import (
    ProcessFailed,
    ProxyProcess,
    join_node,
    stop_process,
    wait_for,
)
from tests import kube_standin
from tests.serverscript import start_script

KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"

ROLES = """
kind: role
version: v1
metadata: {name: kube-viewer}
spec:
  allow:
    kubernetes_labels: {env: test}
    kubernetes_groups: [viewers]
---
kind: role
version: v1
metadata: {name: kube-editor}
spec:
  allow:
    kubernetes_labels: {'*': '*'}
    kubernetes_groups: [editors, '{{internal.kube_teams}}']
    kubernetes_users: [cluster-admin]
---
kind: role
version: v1
metadata: {name: kube-nogroups}
spec:
  allow:
    kubernetes_labels: {'*': '*'}
---
kind: role
version: v1
metadata: {name: kube-elsewhere}
spec:
  allow:
    kubernetes_labels: {env: prod}
    kubernetes_groups: [editors]
"""

USERS = {
    "alice": ("kube-viewer",),
    "bob": ("kube-editor",),
    "carol": ("kube-nogroups",),
    "dave": ("kube-elsewhere",),
}
PASSWORD = "kube-password-1"


@attrs.define
class Standin:
    directory: Path
    port: int
    pki: dict
    process: subprocess.Popen

    def requests(self) -> list[dict]:
        path = self.directory / "requests.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def sessions(self) -> list[dict]:
        path = self.directory / "sessions.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def errors(self) -> list[dict]:
        """Failures the stand-in logged (see ``kube_standin.record_errors``)."""
        path = self.directory / "errors.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        stop_process(self.process)


def start_standin(directory: Path, token: str = "agent-token-123") -> Standin:
    directory.mkdir(parents=True, exist_ok=True)
    pki = kube_standin.make_pki(directory / "pki")
    config = directory / "config.json"
    config.write_text(json.dumps({"dir": str(directory), "pki": pki, "token": token}))
    process, port = start_script(Path(kube_standin.__file__), config, "kube stand-in")
    return Standin(directory, port, pki, process)


@attrs.define
class KubeWorld:
    base: Path
    proxy: ProxyProcess
    standin: Standin
    node: object
    homes: dict = attrs.Factory(dict)

    def home(self, user: str) -> Path:
        return self.homes[user]

    def kubeconfig(self, user: str) -> Path:
        return self.homes[user] / "kubeconfig"

    def env(self, user: str, **extra) -> dict:
        home = self.homes[user]
        return {**os.environ, "EDGE_HOME": str(home), "KUBECONFIG": str(home / "kubeconfig"),
                "HOME": str(home), **extra}

    def kubectl(self, user: str, *args, input: str | None = None, timeout: float = 60,
                env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([KUBECTL, *args], input=input, capture_output=True, text=True,
                              timeout=timeout, env={**self.env(user), **(env or {})})

    def edge(self, user: str, *args, input: str | None = None):
        return subprocess.run([sys.executable, "-m", "edgeaccess.client.main", *args],
                              input=input, capture_output=True, text=True, timeout=60,
                              env=self.env(user))

    def stop(self) -> None:
        for process in (self.node, self.proxy):
            if process is not None:
                process.stop()
        self.standin.stop()


def start_world(base: Path, cluster: str = "kube-e2e", *, kube_name: str = "standin",
                users=USERS, proxy: ProxyProcess | None = None) -> KubeWorld:
    """Stand-in, proxy, a tunnelled kube-only node publishing the stand-in, users logged in."""
    base.mkdir(parents=True, exist_ok=True)
    standin = start_standin(base / "standin")
    node = None
    try:
        if proxy is None:
            proxy = ProxyProcess(base / "proxy", base / "proxy.log", cluster=cluster)
            proxy.start()
        roles = base / "kube-roles.yaml"
        roles.write_text(ROLES)
        proxy.edgectl("create", "-f", str(roles), "--force")
        kubeconfig = kube_standin.write_kubeconfig(base / "agent-kubeconfig", standin.port,
                                                   standin.pki)
        node, _ = join_node(proxy, base, "kube-agent", tunnel=True, extra_args=[
            "--kube-cluster", kube_name, "--kubeconfig", str(kubeconfig),
            "--kube-labels", "env=test", "--no-ssh"])
        world = KubeWorld(base, proxy, standin, node)
        pin = proxy.pin()
        for user, user_roles in users.items():
            proxy.add_user(user, PASSWORD, roles=user_roles)
            home = base / f"home-{user}"
            home.mkdir(exist_ok=True)
            world.homes[user] = home
            proxy.login(home, user, PASSWORD, pin=pin)
        if "bob" in users:
            wait_for(lambda: kube_name in world.edge("bob", "kube", "ls").stdout, 30,
                     "the Kubernetes cluster in edge kube ls")
        for user in users:
            result = world.edge(user, "kube", "login", kube_name)
            if result.returncode != 0 and user in ("alice", "bob"):
                raise ProcessFailed(f"edge kube login as {user}: {result.stderr}")
        return world
    except BaseException:
        if node is not None:
            node.stop()
        if proxy is not None:
            proxy.stop()
        standin.stop()
        raise


if __name__ == "__main__":
    import tempfile
    import time

    base = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="kube-world-"))
    world = start_world(base)
    print(f"world up in {base}; e.g.\n  KUBECONFIG={world.kubeconfig('bob')} "
          f"EDGE_HOME={world.home('bob')} kubectl get pods", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        world.stop()
