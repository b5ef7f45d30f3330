"""The node tests run the node on a memory reactor: its audit disk writer
runs inline (:class:`~edgeaccess.audit.diskwriter.InlineDiskWriter`)."""

from __future__ import annotations

import pytest

from edgeaccess.audit.diskwriter import InlineDiskWriter


@pytest.fixture(autouse=True)
def inline_audit_writer(monkeypatch):
    monkeypatch.setattr("edgeaccess.audit.node.DiskWriter", InlineDiskWriter)
