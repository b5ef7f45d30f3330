"""Shared fixtures for end-to-end tests: real processes on 127.0.0.1, kernel-chosen ports.

``proxy`` is one ``twistd -n edgeproxy`` per test module (its cluster is
named after the module), stopped at the end of the module.
"""

from __future__ import annotations

import pytest

from tests.integration.steps import module_proxy, upper_echo_server


@pytest.fixture(scope="module")
def proxy(request, tmp_path_factory):
    """A running proxy for the whole module; its log is printed if it fails to start."""
    yield from module_proxy(request, tmp_path_factory)


@pytest.fixture
def upper_echo_port():
    """A TCP server on 127.0.0.1 that answers upper-cased (a pod's port); its port."""
    with upper_echo_server() as port:
        yield port
