"""Sessions outlive tunnel outages: real daemons, plain OpenSSH, a relay that
cuts and black-holes the node's uplink.

Each *link* is a proxy whose tunnel port is reached only through a
:class:`TcpRelay` (``--tunnel-public-addr``), and one node in tunnel mode;
an outage is the relay's (``cut_all(hold=True)``: every connection reset and
every new one refused; ``stall_all()``: nothing forwarded, nothing closed,
new connections go nowhere), until ``resume()``. The users' connections to
the proxy are never touched. The scenarios only wait, so they all run at
once, in threads started by the module fixture; each test checks one of
them:

- ``cut`` link, a 30 s cut after which the node's tunnel comes from another
  address (NAT rebinding): a running command's output arrives whole and in
  order and ssh exits 0; an interactive session survives (and stays one
  audited, recorded session); scp of 50 MB is byte-exact;
- ``stall`` link, a 30 s black hole: the same command and interactive session;
- ``long`` link, a 45 s black hole past a 20 s budget (``--resume-budget 20s``
  on its proxy and node: the default 60 s differs only in its number, and the
  module is 40 s shorter): the session ends cleanly (ssh returns, long before
  the link is back) and ``session.end`` says why.

Measured times (``-s`` or ``-rA``): link restored -> output flowing again.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edgeaccess.devcluster import ProxyProcess, join_node, run_edge, wait_for

sys.path.insert(0, str(Path(__file__).parent))
import outagekit  # noqa: E402
from outagekit import Outages, report, ssh  # noqa: E402
from tcprelay import TcpRelay  # noqa: E402

PASSWORD = "unstable-links-pass-1"
LONG_BUDGET = 20.0
#: The outage the sessions must survive (30 s), the one past the long link's
#: budget; 420 lines, one every 0.1 s; 50 MiB at ~5 MB/s.
OUTAGES = Outages(outage=30.0, long_outage=45.0, lines=420, scp_size=50 * 1024 * 1024,
                  scp_limit_kbit=40000)


class Link(outagekit.Link):
    """A proxy reached by its node only through a relay, the node, a user."""

    def __init__(self, base: Path, name: str, budget: float | None = None) -> None:
        relay = TcpRelay().start()
        #: --resume-budget of the proxy and the node (None: the default, 60 s).
        self.budget_args = [] if budget is None else ["--resume-budget", f"{budget:g}s"]
        proxy = ProxyProcess(base / "proxy", base / "proxy.log", cluster=f"links-{name}",
                             extra_args=["--tunnel-public-addr", relay.addr,
                                         *self.budget_args])
        super().__init__(base, name, proxy, relay)

    def start(self) -> "Link":
        self.proxy.start()
        self.relay.target = ("127.0.0.1", self.proxy.ports["tunnel"])
        self.proxy.add_user("alice", PASSWORD, roles=("access",), logins=("root",))
        self.proxy.login(self.home, "alice", PASSWORD)
        self.node, _ = join_node(self.proxy, self.base, f"n-{self.name}", tunnel=True,
                                 extra_args=self.budget_args)
        assert self.relay.active() >= 1  # the tunnel runs through the relay
        wait_for(lambda: ssh(self, "echo", "ok").stdout == "ok\n", 30,
                 f"ssh through link {self.name}", self.node.process, interval=0.2)
        return self

    @property
    def host(self) -> str:
        return f"root@n-{self.name}.{self.proxy.cluster}"

    def after_cut(self) -> None:
        # The node comes back from another address (NAT rebinding).
        self.relay.source_host = "127.0.0.2"

    def stop(self) -> None:
        super().stop()
        self.proxy.stop()


@pytest.fixture(scope="module")
def links(tmp_path_factory):
    started = time.monotonic()
    made: dict[str, Link] = {}
    with ThreadPoolExecutor(3) as pool:
        starting = {name: pool.submit(Link(tmp_path_factory.mktemp(name), name,
                                           LONG_BUDGET if name == "long" else None).start)
                    for name in ("cut", "stall", "long")}
        errors = []
        for name, future in starting.items():
            try:
                made[name] = future.result(timeout=180)
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(f"{name}: {error}")
    if errors:
        for link in made.values():
            link.stop()
        pytest.fail("links did not start: " + "; ".join(errors))
    report("three links up", time.monotonic() - started)
    yield made
    for link in made.values():
        link.stop()


@pytest.fixture(scope="module")
def outcomes(links):
    """Every scenario at once; tests pick their result."""
    yield from OUTAGES.run_all(links)


def outcome(outcomes, name: str, links) -> dict:
    return OUTAGES.outcome(outcomes, name, links)


# --- the tests ------------------------------------------------------------------------

@pytest.mark.parametrize("link", ["cut", "stall"])
def test_a_running_commands_output_arrives_whole_and_in_order_across_an_outage(
        outcomes, links, link):
    OUTAGES.check_stream(outcome(outcomes, f"{link}.stream", links))


@pytest.mark.parametrize("link", ["cut", "stall"])
def test_an_interactive_session_survives_an_outage_as_one_audited_session(
        outcomes, links, link):
    result = outcome(outcomes, f"{link}.interactive", links)
    OUTAGES.check_interactive(result, links[link].proxy, link)
    session_id = result["session_id"]

    # One recording, with what was typed before, during and after the outage.
    def recording():
        played = run_edge(links[link].home, "play", session_id, "--format", "cast")
        return played.stdout if played.returncode == 0 and "after-54" in played.stdout \
            else None

    cast = wait_for(recording, 30, f"the recording of {session_id}", interval=0.3)
    assert cast.index("before-42") < cast.index("during-48") < cast.index("after-54")


def test_after_the_cut_the_node_resumed_from_a_new_address(outcomes, links):
    outcome(outcomes, "cut.stream", links)  # resumed whole (checked above)
    # Every connection through the relay now comes from 127.0.0.2: the
    # proxy saw the node's tunnel arrive from a new IP and port.
    assert links["cut"].relay.upstream_sources() == {"127.0.0.2"}
    assert "resumes its session" in links["cut"].proxy.log()


def test_scp_of_50_mib_across_a_cut_is_byte_exact(outcomes, links):
    OUTAGES.check_scp(outcome(outcomes, "cut.scp", links))


def test_an_outage_past_the_budget_ends_the_session_cleanly_with_an_audited_reason(
        outcomes, links):
    OUTAGES.check_past_the_budget(outcome(outcomes, "long.session", links),
                                  links["long"].proxy, LONG_BUDGET)
    # The outage goes on (to its end) unless the module is done first; past the
    # budget the agent redials with its usual backoff (test_tunnel_e2e covers
    # coming back).
