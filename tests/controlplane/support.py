"""A proxy's control plane in memory: a real AuthServer over a MemoryBackend,
the real cache, publisher and tunnel server, joined to agents with iosim."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock

sys.path.insert(0, str(Path(__file__).parents[1] / "auth"))
from authkit import START, AuditRecorder, InlineReactor, InlineThreadPool, make_authority, resolve  # noqa: E402

from edgeaccess.auth.service import AuthServer  # noqa: E402
from edgeaccess.backend.memory import MemoryBackend  # noqa: E402
from edgeaccess.controlplane import state as cstate  # noqa: E402
from edgeaccess.controlplane.proxy import ProxyControlPlane  # noqa: E402
from edgeaccess.pki.x509ca import Identity  # noqa: E402
from tunnel.support import connected_pair, make_server_factory  # noqa: E402

__all__ = ["START", "resolve", "ProxyWorld", "Received"]


class Received:
    """An agent's ``on_control``: decodes, applies, remembers every message."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.state = cstate.ControlState()

    def __call__(self, data: bytes) -> None:
        message = cstate.decode(data)
        self.messages.append(message)
        self.state.apply(message)

    def types(self) -> list[str]:
        return [m["type"] for m in self.messages]


class ProxyWorld:
    """One proxy: AuthServer + ProxyControlPlane + tunnel server, on a fake clock."""

    def __init__(self, cluster: str = "unit") -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(START)
        self.audit = AuditRecorder()
        self.backend = MemoryBackend(self.clock)
        self.auth = AuthServer(make_authority(cluster), self.backend, self.clock,
                               reactor=InlineReactor(), threadpool=InlineThreadPool(),
                               audit=self.audit)
        resolve(self.auth.bootstrap())
        self.factory = make_server_factory(
            self.clock, Identity(kind="node", name="node-1", cluster=cluster, uuid="uuid-1"))
        self.control = ProxyControlPlane(
            self.auth, self.backend, self.clock, self.factory.registry,
            lambda: [self.auth.authority.user_ca_public_line])
        self.control.startService()

    def agent(self, **kwargs: Any):
        """A connected agent that takes control pushes: (agent, server, pump, received)."""
        received = Received()
        agent, server, pump, _ = connected_pair(self.clock, server_factory=self.factory,
                                                on_control=received, **kwargs)
        return agent, server, pump, received

    def settle(self, pump) -> None:
        for _ in range(3):
            pump.flush(advanceClock=False)
            self.clock.advance(0)
