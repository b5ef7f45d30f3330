"""The node tells its audit shipper when the link is back (in memory, fake
clock, the real auth API through the node's cluster client)."""

from __future__ import annotations

from test_node_service import INTERVAL, cluster, data_dir, node, reactor  # noqa: F401 (fixtures)


class Highest:
    def uniform(self, a: float, b: float) -> float:
        return b


def test_the_first_good_heartbeat_after_an_outage_delivers_the_audit_spool(node, cluster,
                                                                           reactor):
    shipper = node.audit.shipper
    shipper.rng = Highest()  # the longest backoff: the shipper alone would wait 30 s
    cluster.down = True
    node.audit.spool.append_event({
        "id": "ev-outage", "event": "session.end", "time": "2027-01-15T08:00:00Z",
        "cluster": "home", "node": "n1", "user": "alice", "session_id": "s-1"})
    shipper.kick()
    while shipper.failures < 8:
        reactor.advance(1)
    assert shipper._call.getTime() - reactor.seconds() > 2 * INTERVAL
    cluster.down = False
    reactor.advance(INTERVAL)  # the next heartbeat goes through...
    reactor.advance(0)
    # ...and the spool follows at once, into the real audit log.
    assert [e.get("id") for e in cluster.events() if e.get("id") == "ev-outage"] == ["ev-outage"]
    assert node.audit.spool.pending_events() == []
