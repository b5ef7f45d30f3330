"""``edge kube ls``: the Kubernetes clusters a user's roles allow."""

from __future__ import annotations

from edgeaccess import errors
from edgeaccess.kube.access import impersonation


def allowed_kube_clusters(kube, identity) -> list[dict]:
    """Name, labels, and the user and groups the user would reach each allowed cluster as.

    :param kube: the proxy's :class:`~edgeaccess.kube.proxy.KubeProxy` (None: no Kubernetes).
    :param identity: the caller (roles local to this cluster).
    """
    if kube is None:
        return []
    checker = kube.roles.checker(identity.roles, identity.traits)
    found = []
    for record in kube.directory.records():
        if identity.kind != "admin" and not checker.can_access_kube(record["labels"]):
            continue
        entry = {"name": record["name"], "labels": record["labels"],
                 "cluster": kube.cluster_name}
        try:
            imp = impersonation(checker, identity.name, record["name"], record["labels"])
            entry.update(kube_user=imp.user, kube_groups=list(imp.groups))
        except errors.AccessDenied as e:
            entry["problem"] = str(e)
        found.append(entry)
    return found
