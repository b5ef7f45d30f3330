"""Shared fixtures for end-to-end tests: real processes on 127.0.0.1, kernel-chosen ports.

``proxy`` is one ``twistd -n edgeproxy`` per test module (its cluster is
named after the module), stopped at the end of the module.
"""

from __future__ import annotations

import re

import pytest

from edgeaccess.devcluster import ProxyProcess
from tests.integration.steps import upper_echo_server


def _cluster_name(module_name: str) -> str:
    """A valid cluster name from a test module's name (``test_cluster_core`` -> ``cluster-core``)."""
    name = re.sub(r"[^a-z0-9-]+", "-", module_name.lower().removeprefix("test_"))
    return name.strip("-")[:40] or "test"


@pytest.fixture(scope="module")
def proxy(request, tmp_path_factory):
    """A running proxy for the whole module; its log is printed if it fails to start."""
    base = tmp_path_factory.mktemp("proxy")
    process = ProxyProcess(base / "proxy", base / "proxy.log",
                           cluster=_cluster_name(request.module.__name__.rpartition(".")[2]))
    try:
        process.start()
    except Exception:
        process.kill()
        pytest.fail(f"proxy did not start; log:\n{process.log()[-4000:]}")
    yield process
    process.stop()



@pytest.fixture
def upper_echo_port():
    """A TCP server on 127.0.0.1 that answers upper-cased (a pod's port); its port."""
    with upper_echo_server() as port:
        yield port
