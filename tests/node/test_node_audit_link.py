"""The node tells its audit shipper when the link is back (in memory, fake clock)."""

from __future__ import annotations

from test_node_service import INTERVAL, FakeAuth, pki, start_node  # noqa: F401 (fixture)


class Highest:
    def uniform(self, a: float, b: float) -> float:
        return b


class AuditTakingAuth(FakeAuth):
    """FakeAuth that also takes audit events."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.events: list[str] = []

    def post(self, path, body):
        if path == "/v1/audit/events":
            self._check("POST", path)
            ids = [e["id"] for e in body["events"]]
            self.events += ids
            return {"acknowledged": ids}
        return super().post(path, body)


def test_the_first_good_heartbeat_after_an_outage_delivers_the_audit_spool(pki):
    fake = AuditTakingAuth(pki["host_ca"], pki["identity"].user_ca_lines)
    node, reactor = start_node(pki, fake)
    shipper = node.audit.shipper
    shipper.rng = Highest()  # the longest backoff: the shipper alone would wait 30 s
    fake.down = True
    node.audit.spool.append_event({"id": "ev-outage", "event": "session.end"})
    shipper.kick()
    while shipper.failures < 8:
        reactor.advance(1)
    assert shipper._call.getTime() - reactor.seconds() > 2 * INTERVAL
    fake.down = False
    reactor.advance(INTERVAL)  # the next heartbeat goes through...
    reactor.advance(0)
    assert fake.events == ["ev-outage"]  # ...and the spool follows at once
    assert node.audit.spool.pending_events() == []
    node.stopService()
