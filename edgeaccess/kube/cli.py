"""``edge kube``: list Kubernetes clusters, write kubeconfig contexts, hand kubectl a credential.

- ``edge kube ls [--cluster LEAF]``
- ``edge kube login NAME [--cluster LEAF]`` adds cluster, user and context
  ``CLUSTER-NAME`` to the kubeconfig ``$KUBECONFIG`` names (default
  ``~/.kube/config``) and selects it; the user runs ``edge kube credentials``
  as an exec credential plugin, so kubectl always gets the profile's current
  certificate, or the message "run edge login" once it expired.
- ``edge logout`` removes what ``edge kube login`` added (see
  :func:`remove_kube_logins`).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from edgeaccess import cli, errors
from edgeaccess.kube import kubeconfig

#: What ``edge kube login`` added, per profile: ``[{"kubeconfig", "name"}]``.
LOGINS_FILE = "kube_logins.json"


def add_edge_kube(sub) -> None:
    """Register ``edge kube ...`` on the ``edge`` parser."""
    kube = sub.add_parser("kube", help="reach Kubernetes clusters with kubectl")
    commands = kube.add_subparsers(dest="kube_command", required=True, metavar="COMMAND")
    ls = commands.add_parser("ls", help="list the Kubernetes clusters you may reach")
    ls.add_argument("--cluster", help="a leaf cluster (default: the one logged in to)")
    ls.add_argument("--format", choices=("text", "json"), default="text")
    login = commands.add_parser("login", help="add a kubeconfig context for a cluster")
    login.add_argument("name", help="Kubernetes cluster name (see edge kube ls)")
    login.add_argument("--cluster", help="a leaf cluster (default: the one logged in to)")
    creds = commands.add_parser("credentials", help="exec credential plugin for kubectl "
                                "(written by edge kube login)")
    creds.add_argument("--context", help="the context it is for (for messages)")


def run_edge_kube(args, home: Path, profile, client) -> int:
    if args.kube_command == "credentials":
        return _credentials(args, home, profile)
    cluster = args.cluster or profile.cluster
    path = "/v1/kube/clusters" if cluster == profile.cluster \
        else f"/v1/clusters/{cluster}/kube"
    if args.kube_command == "ls":
        found = client.get(path)
        if args.format == "json":
            cli.print_json(found)
        else:
            cli.print_table(["Kube Cluster", "Labels", "As user", "Groups"], [
                [k["name"], cli.format_labels(k["labels"]), k.get("kube_user", "-"),
                 ", ".join(k.get("kube_groups", [])) or k.get("problem", "-")]
                for k in found])
        return 0
    if args.kube_command == "login":
        found = {k["name"]: k for k in client.get(path)}
        if args.name not in found:
            raise errors.NotFound(f"Kubernetes cluster {args.name} not found in cluster "
                                  f"{cluster} (or your roles do not allow it); see "
                                  "edge kube ls")
        ping = client.get("/v1/ping")
        kube_addr = (ping.get("proxy") or {}).get("kube_addr")
        if not kube_addr:
            raise errors.NotFound(f"the proxy at {profile.proxy} has no Kubernetes port")
        if cluster == profile.cluster:
            server = f"https://{kube_addr}/k8s/{args.name}"
        else:
            server = f"https://{kube_addr}/k8s-leaf/{cluster}/{args.name}"
        name = f"{cluster}-{args.name}"
        target = kubeconfig.user_kubeconfig_path()
        kubeconfig.merge_login(
            target, name, server=server, ca_pem=(home / "ca.pem").read_bytes(),
            exec_command=sys.executable,
            exec_args=["-m", "edgeaccess.client.main", "kube", "credentials",
                       "--context", name],
            exec_env={"EDGE_HOME": str(home)})
        _remember(home, target, name)
        sys.stdout.write(f"Logged in to Kubernetes cluster {args.name} of {cluster}.\n"
                         f"Context {name} is selected in {target}. Try: kubectl get pods\n")
        return 0
    raise errors.BadRequest(f"unknown command kube {args.kube_command}")


def _credentials(args, home: Path, profile) -> int:
    valid = datetime.fromisoformat(profile.valid_before.replace("Z", "+00:00"))
    if valid <= datetime.now(timezone.utc):
        raise errors.CertificateInvalid(
            f"your edgeaccess certificate expired at {profile.valid_before}: run edge login")
    credential = kubeconfig.exec_credential((home / "tls.crt").read_text(),
                                            (home / "tls.key").read_text(), valid)
    sys.stdout.write(json.dumps(credential) + "\n")
    return 0


def _remember(home: Path, target: Path, name: str) -> None:
    path = home / LOGINS_FILE
    try:
        entries = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        entries = []
    entry = {"kubeconfig": str(target.absolute()), "name": name}
    if entry not in entries:
        entries.append(entry)
    path.write_text(json.dumps(entries))


def remove_kube_logins(home: Path) -> list[str]:
    """Remove every context ``edge kube login`` added with this profile."""
    path = home / LOGINS_FILE
    try:
        entries = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return []
    removed = []
    by_file: dict[str, list[str]] = {}
    for entry in entries:
        if isinstance(entry, dict):
            by_file.setdefault(str(entry.get("kubeconfig")), []).append(str(entry.get("name")))
    for file, names in by_file.items():
        try:
            removed += kubeconfig.remove_login(Path(file), names)
        except (OSError, errors.EdgeError):
            continue
    path.unlink()
    return removed
