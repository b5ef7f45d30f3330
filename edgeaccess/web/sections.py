"""The resources page's sections after the nodes: web apps and Kubernetes clusters.

Each provider lists what the session's roles allow in the selected cluster:
this cluster's from the proxy's own indexes (the app index of the tunnels,
the Kubernetes directory), a leaf's by asking the leaf over its tunnel with
the session's identity, so the leaf decides with its mapped roles, as for
its nodes. Everything a leaf sends is checked before it is shown.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from twisted.logger import Logger

from edgeaccess import errors
from edgeaccess.apps.spec import check_app_name
from edgeaccess.web.app import ResourceRow, ResourceSection

_log = Logger()

#: ``async (cluster, path, identity) -> JSON`` asking a leaf cluster.
LeafRequest = Callable[[str, str, object], Awaitable[object]]


def leaf_asker(clusters, clock) -> LeafRequest:
    """Ask a leaf cluster over its tunnel (``RootClusters``), as the user."""
    from edgeaccess.cluster.root import leaf_request

    async def ask(cluster: str, path: str, identity):
        tunnel = clusters.tunnels.get(cluster) if clusters is not None else None
        if tunnel is None:
            raise errors.ClusterOffline(f"cluster {cluster} is offline")
        return await leaf_request(clock, tunnel, path, identity)

    return ask


def _labels(value) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


async def _from_leaf(leaf_request: LeafRequest | None, cluster: str, path: str,
                     session) -> list[dict]:
    if leaf_request is None:
        raise errors.NotFound(f"cluster {cluster} not found")
    found = await leaf_request(cluster, path, session.identity())
    if not isinstance(found, list):
        raise errors.EdgeError(f"cluster {cluster} sent a malformed list")
    return [entry for entry in found
            if isinstance(entry, dict) and isinstance(entry.get("name"), str)]


def app_section(gateway, leaf_request: LeafRequest | None):
    """Web apps: name, labels, cluster, and a link to the app's URL (the
    browser is launched into it with the web session, see
    ``edgeaccess.apps.api``).

    :param gateway: the :class:`~edgeaccess.apps.sessions.AppGateway`.
    """

    async def provide(session, checker, cluster: str) -> ResourceSection:
        if cluster == gateway.cluster:
            apps = gateway.local_apps(checker)
        else:
            apps = await _from_leaf(leaf_request, cluster, "/v1/apps", session)
        rows = []
        for app in sorted(apps, key=lambda a: a["name"]):
            try:
                check_app_name(app["name"])
            except errors.BadRequest:
                # A leaf's answer: the name becomes part of a link's host.
                _log.warn("cluster {cluster} lists an app named {name!r}: not a valid app "
                          "name; not shown", cluster=cluster, name=app["name"][:64])
                continue
            # The root serves a leaf's apps under its own host too.
            url = gateway.public_origin(app["name"]) + "/"
            rows.append(ResourceRow(name=app["name"], labels=_labels(app.get("labels")),
                                    cluster=cluster, link=url, link_text="Launch"))
        return ResourceSection(id=provide.section_id, title=provide.section_title,
                               columns=("Name", "Labels", "Cluster", "Open"),
                               rows=tuple(rows), empty="No applications you may reach")

    provide.section_id, provide.section_title = "apps", "Applications"
    return provide


def kube_section(kube, leaf_request: LeafRequest | None, local_cluster: str):
    """Kubernetes clusters: name, labels, cluster, and the ``edge kube
    login`` command that adds it to the user's kubeconfig.

    :param kube: the proxy's :class:`~edgeaccess.kube.proxy.KubeProxy` or None.
    """
    from edgeaccess.kube.listing import allowed_kube_clusters

    async def provide(session, checker, cluster: str) -> ResourceSection:
        if cluster == local_cluster:
            found = allowed_kube_clusters(kube, session.identity())
            command = "edge kube login {name}"
        else:
            found = await _from_leaf(leaf_request, cluster, "/v1/kube/clusters", session)
            command = "edge kube login {name} --cluster " + cluster
        rows = []
        for entry in sorted(found, key=lambda e: e["name"]):
            problem = entry.get("problem")
            rows.append(ResourceRow(
                name=entry["name"], labels=_labels(entry.get("labels")), cluster=cluster,
                hint=command.format(name=entry["name"]),
                note=str(problem) if isinstance(problem, str) else None))
        return ResourceSection(id=provide.section_id, title=provide.section_title,
                               columns=("Name", "Labels", "Cluster", "Connect"),
                               rows=tuple(rows), empty="No Kubernetes clusters you may reach")

    provide.section_id, provide.section_title = "kube", "Kubernetes clusters"
    return provide
