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

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pexpect
import pytest

from edgeaccess.devcluster import ProxyProcess, join_node, wait_for

sys.path.insert(0, str(Path(__file__).parent))
from tcprelay import TcpRelay  # noqa: E402

PASSWORD = "lan-resume-pass-1"
CLUSTER = "lanres"
BUDGET = 20.0
#: The outage the sessions must survive, and the one past the budget.
OUTAGE = 12.0
LONG_OUTAGE = 34.0
#: When the outage starts after the scenario's clients started.
OUTAGE_AT = 4.0
#: The streaming command: one numbered line every 0.1 s for > OUTAGE_AT + OUTAGE.
LINES = 220
STREAM = f"for i in $(seq 1 {LINES}); do echo line-$i; sleep 0.1; done"
SCP_SIZE = 8 * 1024 * 1024


def report(what: str, seconds: float) -> None:
    print(f"\nMEASURED {what}: {seconds:.2f} s", flush=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Link:
    """A LAN node whose agent port the proxy reaches only through a relay."""

    def __init__(self, base: Path, proxy: ProxyProcess, name: str) -> None:
        self.name = name
        self.base = base
        self.proxy = proxy
        self.agent_port = _free_port()
        self.relay = TcpRelay(target=("127.0.0.1", self.agent_port)).start()
        self.node = None
        self.home = base / "home"
        self.outage_started: float | None = None
        self.restored: float | None = None
        self.restored_event = threading.Event()
        #: Set at teardown: an outage still running ends there.
        self.stopping = threading.Event()

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

    def outage(self, kind: str, seconds: float, at: float = OUTAGE_AT) -> None:
        """After ``at`` seconds, cut or stall the proxy->node link for ``seconds``."""
        if self.stopping.wait(at):
            return
        self.outage_started = time.monotonic()
        if kind == "cut":
            assert self.relay.cut_all(hold=True) >= 1
        else:
            self.relay.stall_all()
        self.stopping.wait(seconds)
        self.relay.resume()
        self.restored = time.monotonic()
        self.restored_event.set()

    def stop(self) -> None:
        self.stopping.set()
        self.relay.close()
        if self.node is not None:
            self.node.stop()


def ssh_options(link: Link) -> list[str]:
    return ["-F", str(link.home / "ssh_config"), "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=15"]


def ssh(link: Link, *command: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh", *ssh_options(link), link.host, *command],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


# --- the scenarios (each returns what its test checks) -----------------------------

def streaming_command(link: Link) -> dict:
    started = time.monotonic()
    result = ssh(link, STREAM, timeout=OUTAGE_AT + LONG_OUTAGE + 60)
    return {"returncode": result.returncode, "stdout": result.stdout,
            "stderr": result.stderr, "seconds": time.monotonic() - started}


def interactive_session(link: Link) -> dict:
    child = pexpect.spawn("ssh", ["-tt", *ssh_options(link), link.host], timeout=60,
                          encoding="utf-8")
    child.setwinsize(30, 100)
    try:
        child.sendline("echo sid-$EDGE_SESSION_ID-end")
        child.expect(r"sid-([0-9a-f-]{36})-end")
        session_id = child.match.group(1)
        child.sendline("echo before-$((6*7))")
        child.expect("before-42")
        wait_for(lambda: link.outage_started is not None, 30, "the outage")
        time.sleep(2.0)
        # Typed while the link is down: delivered once it is back.
        child.sendline("echo during-$((6*8))")
        link.restored_event.wait(LONG_OUTAGE)
        child.expect("during-48", timeout=60)
        flowing = time.monotonic() - link.restored
        child.sendline("echo after-$((6*9))")
        child.expect("after-54")
        child.sendline("exit 0")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close()
    return {"session_id": session_id, "exitstatus": child.exitstatus,
            "restored_to_output": flowing}


def scp_upload(link: Link) -> dict:
    source = link.base / "upload.bin"
    with open(source, "wb") as f:
        f.write(os.urandom(SCP_SIZE))
    dest = link.base / "received.bin"
    # Limited to ~1 MB/s, so that the cut falls in the middle of the copy.
    result = subprocess.run(["scp", *ssh_options(link), "-l", "8000", str(source),
                             f"{link.host}:{dest}"],
                            capture_output=True, text=True, timeout=OUTAGE_AT + OUTAGE + 120,
                            stdin=subprocess.DEVNULL)
    digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    return {"returncode": result.returncode, "stderr": result.stderr,
            "same": dest.exists() and digest(source) == digest(dest),
            "size": dest.stat().st_size if dest.exists() else None}


def session_past_the_budget(link: Link) -> dict:
    started = time.monotonic()
    result = ssh(link, "echo started; sleep 600", timeout=OUTAGE_AT + LONG_OUTAGE + 60)
    ended = time.monotonic()
    return {"returncode": result.returncode, "stdout": result.stdout,
            "ended_after_outage_start": ended - (link.outage_started or started),
            "link_back_then": link.restored is not None and link.restored <= ended}


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
    pool = ThreadPoolExecutor(10)
    cut, stall, long = links["cut"], links["stall"], links["long"]
    futures: dict[str, Future] = {
        "cut.stream": pool.submit(streaming_command, cut),
        "cut.interactive": pool.submit(interactive_session, cut),
        "cut.scp": pool.submit(scp_upload, cut),
        "stall.stream": pool.submit(streaming_command, stall),
        "stall.interactive": pool.submit(interactive_session, stall),
        "long.session": pool.submit(session_past_the_budget, long),
        "cut.outage": pool.submit(cut.outage, "cut", OUTAGE),
        "stall.outage": pool.submit(stall.outage, "stall", OUTAGE),
        "long.outage": pool.submit(long.outage, "stall", LONG_OUTAGE),
    }
    yield futures
    for link in links.values():
        link.stopping.set()
    pool.shutdown(wait=True, cancel_futures=True)


def outcome(outcomes, name: str, links) -> dict:
    try:
        return outcomes[name].result(timeout=OUTAGE_AT + LONG_OUTAGE + 120)
    except Exception:
        link = links[name.partition(".")[0]]
        print(f"--- node log of {link.name}:\n{link.node.log()[-6000:]}\n--- proxy log:\n"
              f"{link.proxy.log()[-8000:]}")
        raise


def expected_stream() -> str:
    return "".join(f"line-{i}\n" for i in range(1, LINES + 1))


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
    result = outcome(outcomes, f"{link}.stream", links)
    assert result["returncode"] == 0, result["stderr"]
    assert result["stdout"] == expected_stream()
    assert result["seconds"] > OUTAGE_AT + OUTAGE  # it really ran through the outage


@pytest.mark.parametrize("link", ["cut", "stall"])
def test_an_interactive_session_survives_an_outage_as_one_audited_session(
        outcomes, links, link):
    result = outcome(outcomes, f"{link}.interactive", links)
    assert result["exitstatus"] == 0
    report(f"LAN {link} {OUTAGE:.0f} s: link restored -> interactive output flowing",
           result["restored_to_output"])
    assert result["restored_to_output"] < 15.0  # generous: 2 cores shared by many
    proxy = links[link].proxy
    session_id = result["session_id"]

    def ended():
        found = proxy.edgectl_json("audit", "search", "--session", session_id)
        return found if "session.end" in [e["event"] for e in found] else None

    events = wait_for(ended, 30, f"session.end of {session_id}", interval=0.3)
    assert [e["event"] for e in events] == ["session.start", "session.end"]
    assert events[-1]["reason"] == "exited" and events[-1]["exit_status"] == 0


def test_the_proxy_redialled_the_node_and_its_channels_resumed(outcomes, links):
    outcome(outcomes, "cut.stream", links)
    outcome(outcomes, "stall.stream", links)
    log = links["cut"].proxy.log()
    assert "redialing it for 20 s" in log
    assert log.count("resumes its session") >= 2


def test_scp_across_a_cut_is_byte_exact(outcomes, links):
    result = outcome(outcomes, "cut.scp", links)
    assert result["returncode"] == 0, result["stderr"]
    assert result["size"] == SCP_SIZE and result["same"]


def test_an_outage_past_the_budget_ends_the_session_cleanly_with_an_audited_reason(
        outcomes, links):
    result = outcome(outcomes, "long.session", links)
    assert result["stdout"] == "started\n"
    assert result["returncode"] != 0
    # Ended by the budget (20 s after the black hole was noticed), not by the link's return.
    assert BUDGET - 2 < result["ended_after_outage_start"] < LONG_OUTAGE
    assert not result["link_back_then"]
    proxy = links["long"].proxy

    def ended():
        found = [e for e in proxy.edgectl_json("audit", "search", "--type", "session.end")
                 if e.get("reason") == f"tunnel outage exceeded {BUDGET:g}s"]
        return found or None

    events = wait_for(ended, 30, "session.end with the outage reason", interval=0.5)
    assert len(events) == 1 and events[0]["user"] == "alice"
