"""Who a Kubernetes request runs as, and what it asks for (edgeaccess.kube.access)."""

from __future__ import annotations

import pytest

from edgeaccess.errors import AccessDenied, BadRequest
from edgeaccess.identity.rbac import AccessChecker
from edgeaccess.identity.roles import parse_role
from edgeaccess.kube.access import impersonation, request_info, split_cluster


def role(name, allow, deny=None):
    spec = {"allow": allow}
    if deny:
        spec["deny"] = deny
    return parse_role({"kind": "role", "version": "v1", "metadata": {"name": name},
                       "spec": spec})


VIEW = role("view", {"kubernetes_labels": {"env": "test"},
                     "kubernetes_groups": ["viewers", "{{internal.teams}}"]})
ADMIN = role("admin", {"kubernetes_labels": {"*": "*"}, "kubernetes_users": ["cluster-admin"],
                       "kubernetes_groups": ["editors"]})
DENY_PROD = role("no-prod", {}, deny={"kubernetes_labels": {"env": "prod"}})
DENY_EDITORS = role("no-editors", {}, deny={"kubernetes_groups": ["editors"]})
NOTHING = role("nothing", {"kubernetes_labels": {"*": "*"}})


def test_groups_come_from_roles_and_templates_plus_authenticated():
    checker = AccessChecker([VIEW], {"teams": ["blue", "bad value"]})
    imp = impersonation(checker, "alice", "k", {"env": "test"})
    assert imp.user == "alice"
    assert imp.groups == ("viewers", "blue", "system:authenticated")


def test_the_single_kubernetes_user_is_impersonated():
    imp = impersonation(AccessChecker([ADMIN]), "bob", "k", {"env": "x"})
    assert imp.user == "cluster-admin" and imp.groups == ("editors", "system:authenticated")


@pytest.mark.parametrize("roles, labels, kwargs, message", [
    ([VIEW], {"env": "prod"}, {}, "do not allow Kubernetes cluster k"),
    ([ADMIN, DENY_PROD], {"env": "prod"}, {}, "do not allow Kubernetes cluster k"),
    ([NOTHING], {"env": "test"}, {}, "give no kubernetes_groups or kubernetes_users"),
    ([VIEW], {"env": "test"}, {"as_user": "root"}, "impersonating user 'root'"),
    ([VIEW], {"env": "test"}, {"as_groups": ["system:masters"]},
     "impersonating group 'system:masters'"),
    ([ADMIN, DENY_EDITORS], {"env": "x"}, {"as_groups": ["editors"]},
     "impersonating group 'editors'"),
])
def test_refusals_say_why(roles, labels, kwargs, message):
    with pytest.raises(AccessDenied, match=message):
        impersonation(AccessChecker(roles), "alice", "k", labels, **kwargs)


def test_allowed_as_values_are_honoured():
    imp = impersonation(AccessChecker([ADMIN, VIEW]), "bob", "k", {"env": "test"},
                        as_user="bob", as_groups=["viewers"])
    assert imp.user == "bob" and imp.groups == ("viewers", "system:authenticated")


def test_the_cluster_prefix_is_split_off_the_path():
    assert split_cluster(b"/k8s/prod/api/v1/pods?watch=1") == ("prod", b"/api/v1/pods?watch=1")
    assert split_cluster(b"/k8s/prod?x=1") == ("prod", b"/?x=1")
    assert split_cluster(b"/k8s/prod") == ("prod", b"/")
    with pytest.raises(BadRequest):
        split_cluster(b"/api/v1/pods")
    with pytest.raises(BadRequest):
        split_cluster(b"/k8s//api")


@pytest.mark.parametrize("method, target, verb, namespace, resource, name, sub", [
    (b"GET", b"/api/v1/namespaces/default/pods", "list", "default", "pods", "", ""),
    (b"GET", b"/api/v1/namespaces/default/pods?watch=true", "watch", "default", "pods", "", ""),
    (b"GET", b"/api/v1/namespaces/ns/pods/web/log", "get", "ns", "pods", "web", "log"),
    (b"POST", b"/api/v1/namespaces/ns/pods/web/exec?command=ls", "create", "ns", "pods", "web",
     "exec"),
    (b"DELETE", b"/apis/apps/v1/namespaces/ns/deployments", "deletecollection", "ns",
     "deployments", "", ""),
    (b"PATCH", b"/api/v1/namespaces/ns", "patch", "", "namespaces", "ns", ""),
    (b"GET", b"/version", "get", "", "", "", ""),
])
def test_request_info_reads_verb_and_resource(method, target, verb, namespace, resource, name,
                                              sub):
    info = request_info(method, target)
    assert (info.verb, info.namespace, info.resource, info.name, info.subresource) == \
        (verb, namespace, resource, name, sub)
