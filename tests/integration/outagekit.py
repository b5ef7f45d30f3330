"""What the link-outage e2e modules share: a link a relay can cut or stall,
and the SSH scenarios that run across its outage.

A module (test_unstable_links_e2e.py: a node's reverse tunnel;
test_lan_resume_e2e.py: the proxy's connection to a LAN node's agent port)
builds its :class:`Link` subclasses (what is behind the relay differs) and
one :class:`Outages` with its numbers; the scenarios only wait, so the
module fixture runs them all at once (:meth:`Outages.run_all`) and each test
checks one result (:meth:`Outages.outcome`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pexpect

from edgeaccess.devcluster import ProxyProcess, wait_for


def report(what: str, seconds: float) -> None:
    print(f"\nMEASURED {what}: {seconds:.2f} s", flush=True)


class Link:
    """A relay between a proxy and what it must reach, and a user's home.

    Subclasses set :attr:`node`, start things and name :attr:`host`.
    """

    #: When the outage starts after the scenarios' clients started.
    outage_at = 4.0

    def __init__(self, base: Path, name: str, proxy: ProxyProcess, relay) -> None:
        self.name = name
        self.base = base
        self.proxy = proxy
        self.relay = relay
        self.node = None
        self.home = base / "home"
        self.outage_started: float | None = None
        self.restored: float | None = None
        self.restored_event = threading.Event()
        #: Set at teardown: an outage still running ends there.
        self.stopping = threading.Event()

    @property
    def host(self) -> str:
        raise NotImplementedError

    def after_cut(self) -> None:
        """Called once every connection through the relay is reset."""

    def outage(self, kind: str, seconds: float) -> None:
        """After :attr:`outage_at` seconds, cut or stall the link for ``seconds``."""
        if self.stopping.wait(self.outage_at):
            return
        self.outage_started = time.monotonic()
        if kind == "cut":
            assert self.relay.cut_all(hold=True) >= 1
            self.after_cut()
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


def session_events(proxy: ProxyProcess, session_id: str) -> list[dict]:
    """The audit events of a session, once its ``session.end`` is in."""

    def ended():
        found = proxy.edgectl_json("audit", "search", "--session", session_id)
        return found if "session.end" in [e["event"] for e in found] else None

    return wait_for(ended, 30, f"session.end of {session_id}", interval=0.3)


def outage_endings(proxy: ProxyProcess, budget: float) -> list[dict]:
    """The ``session.end`` events that say the outage outlasted ``budget``."""

    def ended():
        found = [e for e in proxy.edgectl_json("audit", "search", "--type", "session.end")
                 if e.get("reason") == f"tunnel outage exceeded {budget:g}s"]
        return found or None

    return wait_for(ended, 30, "session.end with the outage reason", interval=0.5)


class Outages:
    """The scenarios of one module and its numbers.

    :param outage: seconds of the outage the sessions must survive;
    :param long_outage: seconds of the one past the budget;
    :param lines: lines of the streaming command (one per 0.1 s: it must
        outlast ``outage_at + outage``);
    :param scp_size: bytes copied across a cut, at ``scp_limit_kbit`` (so
        that the cut falls in the middle of the copy).
    """

    def __init__(self, *, outage: float, long_outage: float, lines: int, scp_size: int,
                 scp_limit_kbit: int) -> None:
        self.outage = outage
        self.long_outage = long_outage
        self.lines = lines
        self.scp_size = scp_size
        self.scp_limit_kbit = scp_limit_kbit
        self.stream = f"for i in $(seq 1 {lines}); do echo line-$i; sleep 0.1; done"

    @property
    def _longest(self) -> float:
        return Link.outage_at + self.long_outage + 60

    def expected_stream(self) -> str:
        return "".join(f"line-{i}\n" for i in range(1, self.lines + 1))

    # -- the scenarios (each returns what its test checks) -------------------

    def streaming_command(self, link: Link) -> dict:
        started = time.monotonic()
        result = ssh(link, self.stream, timeout=self._longest)
        return {"returncode": result.returncode, "stdout": result.stdout,
                "stderr": result.stderr, "seconds": time.monotonic() - started}

    def interactive_session(self, link: Link) -> dict:
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
            link.restored_event.wait(self.long_outage)
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

    def scp_upload(self, link: Link) -> dict:
        source = link.base / "upload.bin"
        with open(source, "wb") as f:
            f.write(os.urandom(self.scp_size))
        dest = link.base / "received.bin"
        result = subprocess.run(["scp", *ssh_options(link), "-l", str(self.scp_limit_kbit),
                                 str(source), f"{link.host}:{dest}"],
                                capture_output=True, text=True,
                                timeout=Link.outage_at + self.outage + 120,
                                stdin=subprocess.DEVNULL)
        digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
        return {"returncode": result.returncode, "stderr": result.stderr,
                "same": dest.exists() and digest(source) == digest(dest),
                "size": dest.stat().st_size if dest.exists() else None}

    def session_past_the_budget(self, link: Link) -> dict:
        started = time.monotonic()
        result = ssh(link, "echo started; sleep 600", timeout=self._longest)
        ended = time.monotonic()
        return {"returncode": result.returncode, "stdout": result.stdout,
                "ended_after_outage_start": ended - (link.outage_started or started),
                "link_back_then": link.restored is not None and link.restored <= ended}

    # -- running them --------------------------------------------------------

    def run_all(self, links: dict[str, Link]):
        """Every scenario at once on the links ``cut``, ``stall`` and ``long``
        (a generator for a module fixture: yields the futures by name)."""
        pool = ThreadPoolExecutor(12)
        cut, stall, long = links["cut"], links["stall"], links["long"]
        futures: dict[str, Future] = {
            "cut.stream": pool.submit(self.streaming_command, cut),
            "cut.interactive": pool.submit(self.interactive_session, cut),
            "cut.scp": pool.submit(self.scp_upload, cut),
            "stall.stream": pool.submit(self.streaming_command, stall),
            "stall.interactive": pool.submit(self.interactive_session, stall),
            "long.session": pool.submit(self.session_past_the_budget, long),
            "cut.outage": pool.submit(cut.outage, "cut", self.outage),
            "stall.outage": pool.submit(stall.outage, "stall", self.outage),
            "long.outage": pool.submit(long.outage, "stall", self.long_outage),
        }
        yield futures
        for link in links.values():
            link.stopping.set()  # the long outage has done its part once its test checked it
        pool.shutdown(wait=True, cancel_futures=True)

    def outcome(self, outcomes, name: str, links) -> dict:
        """The result of scenario ``name``; with the logs printed if it failed."""
        try:
            return outcomes[name].result(timeout=Link.outage_at + self.long_outage + 120)
        except Exception:
            link = links[name.partition(".")[0]]
            print(f"--- node log of {link.name}:\n{link.node.log()[-6000:]}\n"
                  f"--- proxy log:\n{link.proxy.log()[-8000:]}")
            raise

    # -- what both modules check ---------------------------------------------

    def check_stream(self, result: dict) -> None:
        assert result["returncode"] == 0, result["stderr"]
        assert result["stdout"] == self.expected_stream()
        # It really ran through the outage.
        assert result["seconds"] > Link.outage_at + self.outage

    def check_interactive(self, result: dict, proxy: ProxyProcess, what: str) -> list[dict]:
        """One audited session that exited 0; returns its events."""
        assert result["exitstatus"] == 0
        report(f"{what} {self.outage:.0f} s: link restored -> interactive output flowing",
               result["restored_to_output"])
        assert result["restored_to_output"] < 15.0  # generous: 2 cores shared by many
        events = session_events(proxy, result["session_id"])
        assert [e["event"] for e in events] == ["session.start", "session.end"]
        assert events[-1]["reason"] == "exited" and events[-1]["exit_status"] == 0
        return events

    def check_scp(self, result: dict) -> None:
        assert result["returncode"] == 0, result["stderr"]
        assert result["size"] == self.scp_size and result["same"]

    def check_past_the_budget(self, result: dict, proxy: ProxyProcess, budget: float,
                              slack: float = 0.0) -> None:
        """Ended by the budget (counted from when the outage was noticed,
        ``slack`` seconds early at most), not by the link's return; audited."""
        assert result["stdout"] == "started\n"
        assert result["returncode"] != 0
        assert budget - slack < result["ended_after_outage_start"] < self.long_outage
        assert not result["link_back_then"]
        events = outage_endings(proxy, budget)
        assert len(events) == 1 and events[0]["user"] == "alice"
