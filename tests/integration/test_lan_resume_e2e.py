"""SSH sessions to LAN nodes outlive a broken proxy->node link: real daemons,
plain OpenSSH, a relay that cuts and black-holes the link.

One proxy (``--resume-budget 20s``) and three LAN nodes (direct mode, the
same budget), each node's agent port reached only through its own
:class:`TcpRelay` (``--agent-advertise-addr``): the proxy dials the node
through the relay and carries the users' SSH over that connection. An
outage is the relay's (``cut_all(hold=True)``: every connection reset and
every new one refused; ``stall_all()``: nothing forwarded, nothing closed),
until ``resume()``; the users' connections to the proxy are never touched.
The scenarios only wait, so they all run at once, in threads started by
the module fixture; each test checks one of them:

- ``cut`` node, a 12 s cut: a running command's output arrives whole and in
  order and ssh exits 0; an interactive session survives (one audited
  session); scp of 8 MiB is byte-exact;
- ``stall`` node, a 12 s black hole: the same command and interactive session;
- ``long`` node, a 34 s black hole: past the 20 s budget the session ends
  cleanly (ssh returns, before the link is back) and ``session.end`` says why;
- ``plain`` node, ``--agent-listen off``: announces no agent, reached over TCP.

Measured times (``-s`` or ``-rA``): link restored -> output flowing again.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edgeaccess.devcluster import ProxyProcess, join_node, wait_for

sys.path.insert(0, str(Path(__file__).parent))
import outagekit  # noqa: E402
from outagekit import Outages, report, ssh, ssh_options  # noqa: E402
from tcprelay import TcpRelay  # noqa: E402

PASSWORD = "lan-resume-pass-1"
CLUSTER = "lanres"
BUDGET = 20.0
#: The outage the sessions must survive (12 s), the one past the budget;
#: 220 lines, one every 0.1 s; 8 MiB at ~1 MB/s.
OUTAGES = Outages(outage=12.0, long_outage=34.0, lines=220, scp_size=8 * 1024 * 1024,
                  scp_limit_kbit=8000)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Link(outagekit.Link):
    """A LAN node whose agent port the proxy reaches only through a relay."""

    def __init__(self, base: Path, proxy: ProxyProcess, name: str) -> None:
        self.agent_port = _free_port()
        super().__init__(base, name, proxy,
                         TcpRelay(target=("127.0.0.1", self.agent_port)).start())

    def start(self) -> "Link":
        self.proxy.login(self.home, "alice", PASSWORD)
        self.node, _ = join_node(
            self.proxy, self.base, f"n-{self.name}",
            extra_args=["--agent-listen", f"127.0.0.1:{self.agent_port}",
                        "--agent-advertise-addr", self.relay.addr,
                        "--resume-budget", f"{BUDGET:g}s"])
        wait_for(lambda: ssh(self, "echo", "ok").stdout == "ok\n", 60,
                 f"ssh to {self.name}", self.node.process, interval=0.3)
        assert self.relay.active() >= 1  # the proxy's connection runs through the relay
        return self

    @property
    def host(self) -> str:
        return f"root@n-{self.name}.{CLUSTER}"


class _PlainNode:
    """The node with ``--agent-listen off`` (stopped with the links)."""

    def __init__(self, node) -> None:
        self.node = node
        self.stopping = threading.Event()  # as a Link's: nothing of it runs

    def stop(self) -> None:
        self.node.stop()


@pytest.fixture(scope="module")
def links(tmp_path_factory):
    started = time.monotonic()
    base = tmp_path_factory.mktemp("lanres")
    proxy = ProxyProcess(base / "proxy", base / "proxy.log", cluster=CLUSTER,
                         extra_args=["--resume-budget", f"{BUDGET:g}s"])
    proxy.start()
    made: dict[str, Link] = {}
    try:
        proxy.add_user("alice", PASSWORD, roles=("access",), logins=("root",))
        with ThreadPoolExecutor(3) as pool:
            starting = {name: pool.submit(Link(base / name, proxy, name).start)
                        for name in ("cut", "stall", "long")}
            errors = []
            for name, future in starting.items():
                try:
                    made[name] = future.result(timeout=180)
                except Exception as error:  # noqa: BLE001 - reported below
                    errors.append(f"{name}: {error}")
            # And a node without an agent port: the proxy splices TCP to its SSH port.
            plain = pool.submit(join_node, proxy, base, "n-plain",
                                extra_args=["--agent-listen", "off"])
            try:
                made["plain"] = _PlainNode(plain.result(timeout=180)[0])
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(f"plain: {error}")
        if errors:
            pytest.fail("links did not start: " + "; ".join(errors) +
                        f"\n--- proxy log:\n{proxy.log()[-4000:]}")
        report("proxy and four LAN nodes up", time.monotonic() - started)
        yield made
    finally:
        for link in made.values():
            link.stop()
        proxy.stop()


@pytest.fixture(scope="module")
def outcomes(links):
    """Every scenario at once; tests pick their result."""
    yield from OUTAGES.run_all(links)


def outcome(outcomes, name: str, links) -> dict:
    return OUTAGES.outcome(outcomes, name, links)


# --- the tests ------------------------------------------------------------------------

def test_ssh_to_a_lan_node_goes_through_its_agent_port(links):
    log = links["cut"].proxy.log()
    for name in ("cut", "stall", "long"):
        assert f"target=n-{name}.{CLUSTER}:22 route=agent outcome=ok" in log


def test_a_node_with_agent_listen_off_is_reached_over_tcp(links):
    cut = links["cut"]
    result = subprocess.run(["ssh", *ssh_options(cut), f"root@n-plain.{CLUSTER}", "echo",
                             "plain-$((6*7))"], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert (result.returncode, result.stdout) == (0, "plain-42\n"), result.stderr
    assert f"target=n-plain.{CLUSTER}:22 route=direct outcome=ok" in cut.proxy.log()
    [record] = [n for n in cut.proxy.edgectl_json("nodes", "ls") if n["name"] == "n-plain"]
    assert "agent" not in record


@pytest.mark.parametrize("link", ["cut", "stall"])
def test_a_running_commands_output_arrives_whole_and_in_order_across_an_outage(
        outcomes, links, link):
    OUTAGES.check_stream(outcome(outcomes, f"{link}.stream", links))


@pytest.mark.parametrize("link", ["cut", "stall"])
def test_an_interactive_session_survives_an_outage_as_one_audited_session(
        outcomes, links, link):
    OUTAGES.check_interactive(outcome(outcomes, f"{link}.interactive", links),
                              links[link].proxy, f"LAN {link}")


def test_the_proxy_redialled_the_node_and_its_channels_resumed(outcomes, links):
    outcome(outcomes, "cut.stream", links)
    outcome(outcomes, "stall.stream", links)
    log = links["cut"].proxy.log()
    assert "redialing it for 20 s" in log
    assert log.count("resumes its session") >= 2


def test_scp_across_a_cut_is_byte_exact(outcomes, links):
    OUTAGES.check_scp(outcome(outcomes, "cut.scp", links))


def test_an_outage_past_the_budget_ends_the_session_cleanly_with_an_audited_reason(
        outcomes, links):
    # Ended by the budget (20 s after the black hole was noticed), not by the link's return.
    OUTAGES.check_past_the_budget(outcome(outcomes, "long.session", links),
                                  links["long"].proxy, BUDGET, slack=2)
