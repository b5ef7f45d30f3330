"""The node's audit pieces composed: spool, observer, shipper, session guard.

``edgenode`` calls :meth:`NodeAudit.open` once its identity is known, gives
``observer`` to its SSH server, wraps its authorizer with :meth:`guard`
and makes ``shipper`` a child service (started and stopped with the node).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import attrs

from edgeaccess.audit.observer import AuditingObserver, SpoolGuardAuthorizer
from edgeaccess.audit.spool import DEFAULT_MAX_BYTES, Spool
from edgeaccess.audit.uploader import HTTPSAuditUploader, SpoolShipper


@attrs.define
class NodeAudit:
    """What a node needs for auditing (see the module docstring)."""

    spool: Spool
    observer: AuditingObserver
    shipper: SpoolShipper

    @classmethod
    def open(cls, directory: Path, identity, client_factory: Callable, reactor, *,
             uploader=None, max_bytes: int = DEFAULT_MAX_BYTES,
             rng: random.Random | None = None) -> "NodeAudit":
        """Open the spool in ``directory`` and end sessions a crash cut.

        :param identity: the node's identity (``name``, ``uuid``, ``cluster``).
        :param client_factory: returns the node's
            :class:`~edgeaccess.clusterclient.ClusterClient` to the auth API
            (used by the default uploader).
        :param uploader: another ``IAuditUploader`` (e.g. the tunnel's).
        """
        spool = Spool.open(directory, max_bytes=max_bytes)
        if uploader is None:
            uploader = HTTPSAuditUploader(client_factory)
        shipper = SpoolShipper(spool, uploader, reactor, rng=rng)
        observer = AuditingObserver(spool, cluster=identity.cluster, node_name=identity.name,
                                    node_id=identity.uuid, clock=reactor,
                                    on_spooled=shipper.kick)
        observer.recover()
        return cls(spool=spool, observer=observer, shipper=shipper)

    def guard(self, authorizer) -> SpoolGuardAuthorizer:
        """``authorizer``, refusing new sessions while the spool is full."""
        return SpoolGuardAuthorizer(authorizer, self.spool)
