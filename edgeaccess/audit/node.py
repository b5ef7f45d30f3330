"""The node's audit pieces composed: disk writer, spool, observer, shipper,
session guard.

``edgenode`` awaits :meth:`NodeAudit.open` once its identity is known, gives
``observer`` to its SSH server, wraps its authorizer with :meth:`guard`
and makes ``shipper`` a child service (started and stopped with the node).
The disk writer is the node's one thread for audit file I/O; it is stopped
(after finishing what is queued) when the reactor shuts down.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import attrs

from edgeaccess.audit.diskwriter import DiskWriter
from edgeaccess.audit.observer import AuditingObserver, SpoolGuardAuthorizer
from edgeaccess.audit.spool import DEFAULT_MAX_BYTES, Spool
from edgeaccess.audit.uploader import HTTPSAuditUploader, SpoolShipper


@attrs.define
class NodeAudit:
    """What a node needs for auditing (see the module docstring)."""

    spool: Spool
    observer: AuditingObserver
    shipper: SpoolShipper
    writer: DiskWriter

    @classmethod
    async def open(cls, directory: Path, identity, client_factory: Callable, reactor, *,
                   uploader=None, max_bytes: int = DEFAULT_MAX_BYTES,
                   rng: random.Random | None = None,
                   writer: DiskWriter | None = None) -> "NodeAudit":
        """Open the spool in ``directory`` and end sessions a crash cut.

        :param identity: the node's identity (``name``, ``uuid``, ``cluster``).
        :param client_factory: returns the node's
            :class:`~edgeaccess.clusterclient.ClusterClient` to the auth API
            (used by the default uploader).
        :param uploader: another ``IAuditUploader`` (e.g. the tunnel's).
        :param writer: a started disk writer (one is made, and stopped at
            reactor shutdown, if not given).
        """
        if writer is None:
            writer = DiskWriter(reactor, name="edge-audit-writer")
            writer.start()
            reactor.addSystemEventTrigger("after", "shutdown", writer.finish)
        spool = await Spool.open(directory, writer, max_bytes=max_bytes)
        if uploader is None:
            uploader = HTTPSAuditUploader(client_factory)
        shipper = SpoolShipper(spool, uploader, reactor, rng=rng)
        observer = AuditingObserver(spool, cluster=identity.cluster, node_name=identity.name,
                                    node_id=identity.uuid, clock=reactor)
        await observer.recover()
        return cls(spool=spool, observer=observer, shipper=shipper, writer=writer)

    def guard(self, authorizer) -> SpoolGuardAuthorizer:
        """``authorizer``, refusing new sessions while the spool is full."""
        return SpoolGuardAuthorizer(authorizer, self.spool)
