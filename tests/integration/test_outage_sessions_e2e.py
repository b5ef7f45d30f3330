"""Every kind of session across tunnel outages: real daemons, real clients,
relays that cut and black-hole the tunnels.

One world: a root cluster whose nodes' tunnels reach it only through the
relay ``uplink`` (``--tunnel-public-addr``): a node with SSH and the demo app,
a Kubernetes agent in front of the API stand-in (tests/kube_standin.py; no
kube-apiserver can be installed here), a node with a short
``--resume-budget``; and a leaf cluster trusting the root whose tunnel to the
root goes through the relay ``leaf_link`` (the trust's ``tunnel_addr``), with
a tunnelled leaf node of its own (its tunnel to the leaf is not touched), a LAN
node (``leaflan``: the leaf's proxy dials its agent port) and a Kubernetes
agent with its own stand-in. The users' connections to the proxies are never
touched.

Every scenario runs in its own thread: it opens its session, then meets the
others at a barrier; from there the outage driver cuts the uplink (every
connection reset, new ones refused) while the leaf's link is stalled
(nothing forwarded, nothing closed), then cuts the leaf's link
(:data:`CUT_AT` ...). Shell loops on the nodes run until a stop file
appears and downloads are paced by their reader until their link's outages
are over, so no timing of the machine decides what crosses an outage. Each
test checks one scenario:

- a root user's ``edge ssh --cluster leaf`` command to the leaf node across
  the stall and the cut of the leaf's tunnel: output whole and in order,
  exit 0, one audited session in the leaf and none split in the root; after
  the outages the leaf's app answers through the root again; the same to the
  leaf's LAN node; ``kubectl exec -i`` to the leaf's Kubernetes (una's role
  maps to the leaf's ``kube-editor``) across both of the leaf's outages;
- a web terminal (the browser's WebSocket protocol, spoken by Python) to a
  tunnelled node across the cut, and one to the leaf node across the leaf's
  stall and cut: output in order, typed before, during and after arrives;
- ``kubectl exec -i`` through the tunnelled Kubernetes agent: stdin lines
  and their echoes stream across the cut, the exit code comes back;
  ``kubectl exec -it`` (a PTY): typed before, during and after the cut;
  ``kubectl port-forward``: a 16 MiB stream through it, byte-exact;
- an app's WebSocket echo (messages and a 300 KiB one sent during the cut)
  and a 24 MiB app download, byte-exact;
- an SSH command through TLS routing (``ProxyCommand``; the user reaches the
  tunnel port directly);
- past a budget: a web terminal to the node whose ``--resume-budget`` is
  shorter than the cut ends cleanly (the browser is told) and the node audits
  ``session.end`` with ``tunnel outage exceeded 5s``.

After the outages: a ``kubectl exec -i`` killed mid-stream ends the pod's
process and nothing logs an error (the stand-in records its logged failures);
last, the leaf's LAN node stopped (SIGTERM) ends a running session at once,
audited ``the node is stopping``.

Measured (``-s`` or ``-rA``): link restored -> output flowing again.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from edgeaccess.devcluster import (
    NodeProcess,
    ProxyProcess,
    join_node,
    run_edge,
    start_demo_app,
    stop_process,
    wait_for,
)

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tcprelay import TcpRelay  # noqa: E402
from test_trusted_clusters_e2e import trust_yaml  # noqa: E402

from tests.apps.appkit import WebSocketClient, app_login, curl, tls_socket  # noqa: E402
from tests.kube_world import KUBECTL, start_world  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.exists(KUBECTL), reason="kubectl is not installed")

PASSWORD = "outage-sessions-pass-1"
APPS_DOMAIN = "edge.localhost"
#: When each outage starts and how long it lasts, in seconds after every
#: scenario's session is up (the ``go`` barrier).
CUT_AT, CUT_FOR = 2.0, 10.0
LEAF_CUT_AT, LEAF_CUT_FOR = 16.0, 10.0
#: Each scenario goes on this long after its link is back, then stops.
AFTER = 3.0
#: shortnode's --resume-budget: shorter than the cut.
SHORT_BUDGET = 5.0
DOWNLOAD = 24 * 1024 * 1024 + 17
FORWARDED = 16 * 1024 * 1024 + 5
#: The demo app's /api/bytes pattern (edgeaccess.apps.demo).
PATTERN = bytes(range(256)) * 256


def report(what: str, seconds: float) -> None:
    print(f"\nMEASURED {what}: {seconds:.2f} s", flush=True)


def expected_lines(prefix: str, count: int, separator: str = "-") -> list[str]:
    return [f"{prefix}{separator}{i}" for i in range(1, count + 1)]


class World:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.uplink = TcpRelay().start()
        self.leaf_link = TcpRelay().start()
        self.root = ProxyProcess(base / "root", base / "root.log", cluster="root", extra_args=[
            "--tunnel-public-addr", self.uplink.addr, "--apps-domain", APPS_DOMAIN])
        self.leaf = ProxyProcess(base / "leaf", base / "leaf.log", cluster="leaf")
        self.nodes: list[NodeProcess] = []
        self.kube = None
        #: The leaf's Kubernetes agent (and its stand-in), reached through the root.
        self.leaf_kube = None
        self.demo = None
        self.homes: dict[str, Path] = {}
        self.started: float | None = None
        #: When each link came back (monotonic), set by the outage driver.
        self.restored: dict[str, float] = {}
        self.restored_events = {"uplink": threading.Event(), "leaf_link": threading.Event()}
        #: Set AFTER s past each restore: the scenarios of that link wrap up.
        self.done = {"uplink": threading.Event(), "leaf_link": threading.Event()}
        self.cut_started = threading.Event()
        self.stopping = threading.Event()
        self.go: threading.Barrier | None = None
        #: The threads of the scenarios that passed the barrier.
        self._arrived: set[int] = set()

    def start(self) -> "World":
        root, leaf = self.root, self.leaf
        with ThreadPoolExecutor(2) as pool:
            for done in [pool.submit(p.start) for p in (root, leaf)]:
                done.result()
        for relay in (self.uplink, self.leaf_link):
            relay.target = ("127.0.0.1", root.ports["tunnel"])
        self.demo, demo_port = start_demo_app(root, self.base / "demo.log")
        self.demo_port = demo_port
        app = f"uri=http://127.0.0.1:{demo_port},labels=team:web"
        with ThreadPoolExecutor(3) as pool:
            tnode = pool.submit(join_node, root, self.base, "tnode", tunnel=True,
                                extra_args=["--app", f"name=demo,{app}"])
            leafnode = pool.submit(join_node, leaf, self.base, "leafnode", tunnel=True,
                                   extra_args=["--app", f"name=leafapp,{app}"])
            # Its channels outlive an outage of SHORT_BUDGET only (the cut is longer).
            shortnode = pool.submit(join_node, root, self.base, "shortnode", tunnel=True,
                                    extra_args=["--resume-budget", f"{SHORT_BUDGET:g}s"])
            # The Kubernetes agent, its API stand-in and bob (role kube-editor).
            kube = pool.submit(start_world, self.base / "kube", proxy=root,
                               users={"bob": ("kube-editor",)})
            # The leaf's LAN node (the leaf's proxy dials its agent port) and
            # the leaf's own Kubernetes agent (no user of the leaf's: una of
            # the root reaches both through the leaf's tunnel).
            leaflan = pool.submit(join_node, leaf, self.base, "leaflan")
            leaf_kube = pool.submit(start_world, self.base / "leaf-kube", proxy=leaf, users={})
            for future in (tnode, leafnode, kube, shortnode, leaflan, leaf_kube):
                if future is kube:
                    self.kube = kube.result()
                    self.nodes.append(self.kube.node)
                elif future is leaf_kube:
                    self.leaf_kube = leaf_kube.result()
                    self.nodes.append(self.leaf_kube.node)
                else:
                    self.nodes.append(future.result()[0])
        self.leaflan = self.nodes[4]
        assert self.uplink.active() >= 3  # every root node's tunnel runs through it
        root.add_user("una", PASSWORD, roles=("access",), logins=("root",))
        token = root.edgectl_json("tokens", "add", "--type", "trusted_cluster")["token"]
        trust = self.base / "trust.yaml"
        # una's role also maps to the leaf's kube-editor (the leaf's Kubernetes).
        yaml = trust_yaml(name="root", token=token, pin=root.pin(), web=root.addr("web"),
                          tunnel=self.leaf_link.addr)
        mapped = "{remote: access, local: [access]}"
        assert mapped in yaml
        trust.write_text(yaml.replace(mapped, "{remote: access, local: [access, kube-editor]}"))
        leaf.edgectl("create", "-f", str(trust))
        pin = root.pin()
        self.homes = {"una": self.base / "home-una", "una-tls": self.base / "home-una-tls"}
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda args: root.login(args[0], "una", PASSWORD, pin=pin,
                                                  extra=args[1]),
                          [(self.homes["una"], ()), (self.homes["una-tls"], ("--tls-routing",))]))
        # TLS routing shares the tunnel port, whose public address is the
        # nodes' relay: this user reaches the port itself (only the nodes'
        # uplink is cut, never the user's link).
        config = self.homes["una-tls"] / "ssh_config"
        routed = config.read_text()
        assert f"--connect {self.uplink.addr} " in routed
        config.write_text(routed.replace(f"--connect {self.uplink.addr} ",
                                         f"--connect 127.0.0.1:{root.ports['tunnel']} "))
        wait_for(lambda: "leaf cluster leaf is online" in root.log(), 30,
                 "the leaf's tunnel to the root", root.process, interval=0.1)
        assert self.leaf_link.active() == 1
        leafnode_process = self.nodes[1]
        wait_for(lambda: "trusted root clusters: ['root']" in leafnode_process.log(), 30,
                 "the leaf node to learn the root's CA", leafnode_process.process,
                 interval=0.1)
        for host in ("tnode.root", "leafnode.leaf", "shortnode.root", "leaflan.leaf"):
            wait_for(lambda: ssh(self.homes["una"], host, "echo ok").stdout == "ok\n", 30,
                     f"ssh to {host}", interval=0.2)
        edge = [sys.executable, "-m", "edgeaccess.client.main", "kube"]
        wait_for(lambda: "standin" in subprocess.run(
            [*edge, "ls", "--cluster", "leaf"], env=self.una_kube_env(), capture_output=True,
            text=True, timeout=60).stdout, 30, "the leaf's Kubernetes in edge kube ls",
            interval=0.3)
        login = subprocess.run([*edge, "login", "standin", "--cluster", "leaf"],
                               env=self.una_kube_env(), capture_output=True, text=True,
                               timeout=60)
        assert login.returncode == 0, login.stderr
        return self

    def una_kube_env(self) -> dict:
        """una's environment for the leaf's Kubernetes (her kubeconfig)."""
        home = self.homes["una"]
        return {**os.environ, "EDGE_HOME": str(home), "HOME": str(home),
                "KUBECONFIG": str(home / "kubeconfig")}

    def stop(self) -> None:
        self.stopping.set()
        for relay in (self.uplink, self.leaf_link):
            relay.close()
        for process in (*self.nodes, self.leaf, self.root):
            process.stop()
        for kube in (self.kube, self.leaf_kube):
            if kube is not None:
                kube.standin.stop()
        stop_process(self.demo)

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name} ---\n{p.log()[-4000:]}"
                         for p in (self.root, self.leaf, *self.nodes))

    # --- the outages ---------------------------------------------------------------

    def arrive(self) -> None:
        """A scenario's session is up: wait for every other one (then the
        outages start); the first call sets the time origin."""
        self.go.wait()
        self._arrived.add(threading.get_ident())
        if self.started is None:
            self.started = time.monotonic()

    def arrive_failed(self) -> None:
        """A scenario failed: if it had not arrived yet, count it as arrived,
        so the others (and the outages) go on and only its own test fails."""
        if threading.get_ident() in self._arrived:
            return
        try:
            self.go.wait()
        except threading.BrokenBarrierError:
            pass

    def stop_file(self, link: str) -> Path:
        """Created when the scenarios of ``link`` should stop (shell loops
        on the nodes, which run on this machine, poll it)."""
        return self.base / f"done-{link}"

    def wait_until(self, at: float) -> bool:
        """Sleep until ``at`` s after the start; False when the module is done."""
        return not self.stopping.wait(max(0.0, self.started + at - time.monotonic()))

    def _restored(self, link: str) -> None:
        self.restored[link] = time.monotonic()
        self.restored_events[link].set()

    def _done(self, link: str) -> None:
        self.stop_file(link).touch()
        self.done[link].set()

    def outages(self) -> None:
        """Run the outages; whatever happens, the links come back and every
        scenario is told to wrap up (a failure here fails every test)."""
        try:
            self._outages()
        finally:
            for relay in (self.uplink, self.leaf_link):
                relay.resume()
            for link in self.done:
                self.restored_events[link].set()
                self._done(link)

    def _outages(self) -> None:
        self.arrive()
        if not self.wait_until(CUT_AT):
            return
        assert self.uplink.cut_all(hold=True) >= 3
        self.leaf_link.stall_all()
        self.cut_started.set()
        if not self.wait_until(CUT_AT + CUT_FOR):
            return
        self.uplink.resume()
        self.leaf_link.resume()
        self._restored("uplink")
        if not self.wait_until(CUT_AT + CUT_FOR + AFTER):
            return
        self._done("uplink")
        if not self.wait_until(LEAF_CUT_AT):
            return
        assert self.leaf_link.cut_all(hold=True) >= 1
        if not self.wait_until(LEAF_CUT_AT + LEAF_CUT_FOR):
            return
        self.leaf_link.resume()
        self._restored("leaf_link")
        if self.wait_until(LEAF_CUT_AT + LEAF_CUT_FOR + AFTER):
            self._done("leaf_link")

    def flowing_after(self, link: str) -> float:
        """Seconds from ``link`` coming back to now (the caller just saw output)."""
        return time.monotonic() - self.restored[link]

    # --- the web UI ----------------------------------------------------------------

    def web_session(self, user: str) -> str:
        """Log in through the web UI's form (CSRF cookie and field, as a browser
        does); the ``__Host-edge-session`` cookie's value."""
        import http.client

        host, port = self.root.runtime()["listen"]["web"].rsplit(":", 1)
        tls = ssl.create_default_context(cafile=str(self.root.data_dir / "ca" / "tls_ca.crt"))
        conn = http.client.HTTPSConnection(host, int(port), context=tls, timeout=30)
        try:
            conn.request("GET", "/web/login")
            form = conn.getresponse()
            form.read()
            csrf = cookie_of(form, "__Host-edge-csrf")
            body = urllib.parse.urlencode({"user": user, "password": PASSWORD, "csrf": csrf})
            conn.request("POST", "/web/login", body=body, headers={
                "content-type": "application/x-www-form-urlencoded",
                "cookie": f"__Host-edge-csrf={csrf}", "origin": f"https://{host}:{port}"})
            answer = conn.getresponse()
            answer.read()
            assert answer.status == 303, answer.status
            return cookie_of(answer, "__Host-edge-session")
        finally:
            conn.close()


def cookie_of(response, name: str) -> str:
    for header in response.headers.get_all("set-cookie") or []:
        key, _, rest = header.partition("=")
        if key.strip() == name:
            return rest.partition(";")[0]
    raise AssertionError(f"no {name} cookie in {response.headers}")


def ssh(home: Path, host: str, command: str, timeout: float = 30.0,
        login: str = "root") -> subprocess.CompletedProcess:
    return subprocess.run(["ssh", "-F", str(home / "ssh_config"), "-o", "BatchMode=yes",
                           "-o", "ConnectTimeout=15", f"{login}@{host}", command],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


class TerminalSocket(WebSocketClient):
    """The browser's side of a web terminal (edgeaccess.web.terminal): the
    session cookie and the page's own Origin, JSON input, binary output."""

    def __init__(self, world: World, cookie: str, target: str) -> None:
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import Request

        listen = world.root.runtime()["listen"]["web"]
        host, port = listen.rsplit(":", 1)
        tls = ssl.create_default_context(cafile=str(world.root.data_dir / "ca" / "tls_ca.crt"))
        self.sock = tls.wrap_socket(socket.create_connection((host, int(port)), timeout=60),
                                    server_hostname=host)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events = []
        self.sock.sendall(self.ws.send(Request(
            host=listen, target=f"/web/ws/ssh/{target}",
            extra_headers=[(b"cookie", f"__Host-edge-session={cookie}".encode()),
                           (b"origin", f"https://{listen}".encode())])))
        self._wait(lambda e: type(e).__name__ == "AcceptConnection")
        self.output = ""
        self.texts: list[dict] = []

    def type(self, text: str) -> None:
        self.send_text(json.dumps({"type": "input", "data": text}))

    def expect(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """Read output until ``pattern`` (a regex) is in it; the match."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.output)
            if found:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} in the terminal:\n{self.output[-2000:]}")
            self.sock.settimeout(left)
            message = self.receive()
            if isinstance(message, bytes):
                self.output += message.decode("utf-8", "replace")
            else:
                self.texts.append(json.loads(message))
                if self.texts[-1].get("type") == "closed":
                    raise AssertionError(f"the terminal closed: {self.texts[-1]}")

    def read_one(self, timeout: float = 60.0) -> None:
        """Wait for the next message and take it in."""
        self.sock.settimeout(timeout)
        message = self.receive()
        if isinstance(message, bytes):
            self.output += message.decode("utf-8", "replace")
        else:
            self.texts.append(json.loads(message))

    def until_exit(self, timeout: float = 30.0) -> dict:
        self.sock.settimeout(timeout)
        while not any(t.get("type") == "exit" for t in self.texts):
            message = self.receive()
            if isinstance(message, bytes):
                self.output += message.decode("utf-8", "replace")
            else:
                self.texts.append(json.loads(message))
        return next(t for t in self.texts if t.get("type") == "exit")


# --- the scenarios (each returns what its test checks) -----------------------------
#
# Each opens its session, calls world.arrive() (every session up: the outages
# start), runs through its link's outage and stops once world.done[link] is set.

def until_done(world: World, link: str, prefix: str) -> str:
    """A shell loop printing ``PREFIX-1``, ``PREFIX-2``, ... every 0.1 s until
    the link's stop file appears, then ``PREFIX-end-N``."""
    stop = world.stop_file(link)
    return (f"i=0; while [ ! -e {stop} ]; do i=$((i+1)); echo {prefix}-$i; sleep 0.1; done; "
            f"echo {prefix}-end-$i")


def whole_lines(text: str, prefix: str) -> tuple[list[str], list[str]]:
    """(the ``PREFIX-N`` lines of ``text``, the ones a whole stream ends with)."""
    got = lines_of(text, prefix)
    last = re.findall(rf"^{prefix}-end-(\d+)$", strip_terminal(text), re.MULTILINE)
    count = int(last[-1]) if last else -1
    return got, expected_lines(prefix, count)


def streamed_command(world: World, argv: list[str], env: dict | None = None) -> dict:
    """Run ``argv`` (an ssh through some route, whose command is
    :func:`until_done`), arrive once its first line is out, read the rest."""
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env=None if env is None else {**os.environ, **env})
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.append(process.stderr.read()),
                              daemon=True)
    reader.start()
    try:
        first = process.stdout.readline()
        world.arrive()
        rest = process.stdout.read()
        process.wait(60)
        reader.join(30)
    except BaseException:
        world.arrive_failed()
        raise
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return {"returncode": process.returncode, "stdout": first + rest,
            "stderr": "".join(errors)}


def leaf_ssh(world: World, node: str = "leafnode", prefix: str = "leaf") -> dict:
    command = "echo sid-$EDGE_SESSION_ID-end; " + until_done(world, "leaf_link", prefix)
    return streamed_command(world, [sys.executable, "-m", "edgeaccess.client.main", "ssh",
                                    "--cluster", "leaf", f"root@{node}", command],
                            env={"EDGE_HOME": str(world.homes["una"])})


def tls_routed_ssh(world: World) -> dict:
    home = world.homes["una-tls"]
    argv = ["ssh", "-F", str(home / "ssh_config"), "-o", "BatchMode=yes", "-o",
            "ConnectTimeout=15", "root@tnode.root", until_done(world, "uplink", "routed")]
    return streamed_command(world, argv)


def start_terminal(world: World, term: "TerminalSocket") -> str:
    """Size the terminal, read its session id, check the shell answers, then
    arrive (every scenario up); returns the session id."""
    try:
        term.send_text(json.dumps({"type": "resize", "cols": 100, "rows": 30}))
        term.type("echo sid-$EDGE_SESSION_ID-end\n")
        session_id = term.expect(r"sid-([0-9a-f-]{36})-end").group(1)
        term.type("echo before-$((6*7))\n")
        term.expect(r"before-42\r?\n")
    except BaseException:
        world.arrive_failed()
        raise
    world.arrive()
    return session_id


def web_terminal(world: World, target: str = "root@tnode.root", link: str = "uplink") -> dict:
    """A web terminal to ``target`` across the outages of ``link``: a shell
    loop's output read as it comes, a line typed during the (first) outage."""
    term = TerminalSocket(world, world.web_session("una"), target)
    try:
        session_id = start_terminal(world, term)
        # Output running through the cut, read as it comes.
        term.type(until_done(world, link, "tick") + "\n")
        term.expect(r"tick-1\r?\n")
        while not world.cut_started.is_set():
            term.read_one()
        # Typed during the cut (it runs once the loop is done).
        time.sleep(1.0)
        term.type("echo during-$((6*8))\n")
        while True:  # what was on its way when the link went; then nothing until it is back
            term.read_one()
            if world.restored_events[link].is_set():
                break
        flowing = world.flowing_after(link)
        term.expect(r"tick-end-\d+", timeout=60)
        term.expect(r"during-48\r?\n", timeout=60)
        term.type("echo after-$((6*9))\n")
        term.expect(r"after-54\r?\n")
        term.type("exit 0\n")
        status = term.until_exit()
    finally:
        term.sock.close()
    return {"output": term.output, "exit": status, "session_id": session_id,
            "restored_to_output": flowing}


def terminal_past_the_budget(world: World) -> dict:
    """A web terminal to shortnode, whose budget ends before the cut does."""
    term = TerminalSocket(world, world.web_session("una"), "root@shortnode.root")
    try:
        session_id = start_terminal(world, term)
        term.sock.settimeout(CUT_AT + 90)  # the proxy's budget (60 s) and a margin
        closed = None
        try:
            while closed is None:
                message = term.receive()
                if not isinstance(message, bytes):
                    text = json.loads(message)
                    closed = text if text.get("type") == "closed" else None
        except ConnectionError:  # closed without saying why
            pass
        ended = time.monotonic() - world.started
    finally:
        term.sock.close()
    return {"session_id": session_id, "closed": closed, "ended_at": ended}


def kube_exec_tty(world: World) -> dict:
    """``kubectl exec -it``: a shell in a PTY; typed before, during and after the cut."""
    import pexpect

    child = pexpect.spawn(KUBECTL, ["exec", "-it", "web-2", "--", "/bin/sh"],
                          env=world.kube.env("bob"), dimensions=(24, 80), timeout=60,
                          encoding="utf-8")
    try:
        try:
            child.expect_exact("$ ")
            child.sendline("echo before-$((6*7))")
            child.expect_exact("before-42")
        except BaseException:
            world.arrive_failed()
            raise
        world.arrive()
        world.cut_started.wait(60)
        time.sleep(1.0)
        child.sendline("echo during-$((6*8))")
        world.restored_events["uplink"].wait(60)
        child.expect_exact("during-48")
        flowing = world.flowing_after("uplink")
        child.sendline("echo after-$((6*9))")
        child.expect_exact("after-54")
        child.sendline("exit 0")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=False)
    return {"exitstatus": child.exitstatus, "restored_to_output": flowing}


def kube_exec(world: World, env: dict | None = None, link: str = "uplink") -> dict:
    """``kubectl exec -i``: one stdin line every 0.2 s, echoed back by the pod,
    until the outages of ``link`` are over."""
    exec_ = subprocess.Popen(
        [KUBECTL, "exec", "-i", "web-1", "--", "sh", "-c",
         "while read l; do echo got-$l; done; exit 3"],
        env=env or world.kube.env("bob"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, bufsize=1)
    errors: list[str] = []
    stderr_reader = threading.Thread(target=lambda: errors.append(exec_.stderr.read()),
                                     daemon=True)
    stderr_reader.start()
    count = 1
    try:
        try:
            exec_.stdin.write("k1\n")
            exec_.stdin.flush()
            first = exec_.stdout.readline()
        except BaseException:
            world.arrive_failed()
            raise
        world.arrive()
        while not world.done[link].wait(0.2):
            count += 1
            exec_.stdin.write(f"k{count}\n")
            exec_.stdin.flush()
        exec_.stdin.close()
        stdout = first + exec_.stdout.read()
        exec_.wait(90)
        stderr_reader.join(30)
    finally:
        if exec_.poll() is None:
            exec_.kill()
            exec_.wait()
    return {"returncode": exec_.returncode, "stdout": stdout, "stderr": "".join(errors),
            "count": count}


def paced_download(world: World, sock, host: str, path: str, link: str = "uplink") -> dict:
    """GET ``path`` over ``sock``: the first piece before arriving, then 64 KiB
    every 0.05 s (~1.3 MB/s: the transfer runs through the cut) until the
    link's scenarios are done, then the rest at once. The body, whole."""
    sock.settimeout(60)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                 .encode())
    received = bytearray()
    while b"\r\n\r\n" not in received:
        piece = sock.recv(65536)
        if not piece:
            raise AssertionError(f"no answer to GET {path}: {bytes(received)[:300]!r}")
        received += piece
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
    body = bytearray(body)
    world.arrive()
    while len(body) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        body += piece
        if not world.done[link].is_set():
            time.sleep(0.05)
    return {"status": head.split(b"\r\n", 1)[0].decode(), "size": len(body),
            "length": length, "same": bytes(body) == pattern_bytes(length)}


def pattern_bytes(size: int) -> bytes:
    """What the demo app's ``/api/bytes/SIZE`` sends."""
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


def app_download(world: World, config: dict) -> dict:
    host = f"demo.{APPS_DOMAIN}"
    port = world.root.runtime()["listen"]["web"].rsplit(":", 1)[1]
    try:
        sock = tls_socket(world.root, host, config)
    except BaseException:
        world.arrive_failed()
        raise
    try:
        return paced_download(world, sock, f"{host}:{port}", f"/api/bytes/{DOWNLOAD}")
    finally:
        sock.close()


def kube_port_forward(world: World) -> dict:
    """``kubectl port-forward`` to the "pod"'s port (the stand-in forwards to
    127.0.0.1: the demo app), and a paced download through it."""
    forward = subprocess.Popen([KUBECTL, "port-forward", "pod/web-1", f":{world.demo_port}"],
                               env=world.kube.env("bob"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        try:
            line = forward.stdout.readline()
            port = re.search(r"127\.0\.0\.1:(\d+)", line)
            assert port, line
            sock = socket.create_connection(("127.0.0.1", int(port.group(1))), timeout=60)
        except BaseException:
            world.arrive_failed()
            raise
        try:
            return paced_download(world, sock, "127.0.0.1", f"/api/bytes/{FORWARDED}")
        finally:
            sock.close()
    finally:
        forward.kill()
        forward.wait()


def app_websocket(world: World, config: dict) -> dict:
    """The demo app's WebSocket echo: a numbered message every 0.25 s whether
    or not the echoes come (those sent during the cut queue), and a 300 KiB
    one during the cut; the echoes are read as they come."""
    from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

    host = f"demo.{APPS_DOMAIN}"
    port = world.root.runtime()["listen"]["web"].rsplit(":", 1)[1]
    echoed: list = []
    blob = os.urandom(300 * 1024)
    sent = 0
    try:
        sock = tls_socket(world.root, host, config)
        sock.settimeout(60)
        client = WebSocketClient(sock, f"{host}:{port}")
        client.send_text("m0")
        assert client.receive() == "m0"
    except BaseException:
        world.arrive_failed()
        raise
    try:
        world.arrive()
        ws = client.ws
        partial: list[bytes] = []
        next_send = time.monotonic()
        blob_pending = True
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            now = time.monotonic()
            done = world.done["uplink"].is_set()
            if now >= next_send and not done:
                sent += 1
                sock.sendall(ws.send(TextMessage(data=f"m{sent}")))
                next_send += 0.25
            if blob_pending and world.cut_started.is_set():
                blob_pending = False
                sock.sendall(ws.send(BytesMessage(data=blob)))
            if done and len(echoed) == sent + (0 if blob_pending else 1):
                break
            if not sock.pending():
                wait = max(0.0, min(next_send - now, 0.1)) if not done else 0.5
                if not select.select([sock], [], [], wait)[0]:
                    continue
            data = sock.recv(65536)
            if not data:
                break
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, TextMessage):
                    echoed.append(event.data)
                elif isinstance(event, BytesMessage):
                    partial.append(bytes(event.data))
                    if event.message_finished:
                        echoed.append(b"".join(partial) == blob)
                        partial = []
                elif isinstance(event, Ping):
                    sock.sendall(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    raise AssertionError(f"the app closed the WebSocket: {event}")
    finally:
        sock.close()
    return {"echoed": echoed, "sent": sent}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    started = time.monotonic()
    world = World(tmp_path_factory.mktemp("outage"))
    try:
        world.start()
    except Exception as error:
        logs = world.logs()
        world.stop()
        pytest.fail(f"the clusters did not come up: {error}\n{logs}")
    report("root + leaf + 6 nodes + 2 kube stand-ins up", time.monotonic() - started)
    yield world
    world.stop()


@pytest.fixture(scope="module")
def configs(world):
    """una's app certificates for the root's app and the leaf's (through the root)."""
    home = world.homes["una"]
    return {"demo": app_login(home, "demo"), "leafapp": app_login(home, "leafapp",
                                                                   "--cluster", "leaf")}


SCENARIOS = {
    "leaf.ssh": leaf_ssh,
    "leaf.lan-ssh": lambda world: leaf_ssh(world, "leaflan", "leaflan"),
    "leaf.kube-exec": lambda world: kube_exec(world, world.una_kube_env(), "leaf_link"),
    "terminal": web_terminal,
    "terminal.leaf": lambda world: web_terminal(world, "root@leafnode.leaf", "leaf_link"),
    "terminal.past-budget": terminal_past_the_budget,
    "kube.exec": kube_exec,
    "kube.exec-tty": kube_exec_tty,
    "kube.port-forward": kube_port_forward,
    "app.websocket": lambda world, configs: app_websocket(world, configs["demo"]),
    "app.download": lambda world, configs: app_download(world, configs["demo"]),
    "tls-routing": tls_routed_ssh,
}


@pytest.fixture(scope="module")
def outcomes(world, configs):
    """Every scenario at once; tests pick their result."""
    # Every scenario and the outage driver meet at the barrier.
    world.go = threading.Barrier(len(SCENARIOS) + 1, timeout=120)
    pool = ThreadPoolExecutor(len(SCENARIOS) + 1)
    futures: dict[str, Future] = {"outages": pool.submit(world.outages)}
    for name, scenario in SCENARIOS.items():
        takes_configs = name.startswith("app.")
        futures[name] = pool.submit(scenario, world, configs) if takes_configs \
            else pool.submit(scenario, world)
    yield futures
    world.stopping.set()
    world.go.abort()
    for link in world.done:
        world.stop_file(link).touch()  # no shell loop outlives the module
    pool.shutdown(wait=True, cancel_futures=True)


def outcome(outcomes, world: World, name: str) -> dict:
    try:
        outcomes["outages"].result(timeout=300)  # the outages really happened
        return outcomes[name].result(timeout=300)
    except Exception:
        print(world.logs())
        raise


def strip_terminal(text: str) -> str:
    """``text`` without a terminal's escape sequences and carriage returns."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "")


def lines_of(text: str, prefix: str) -> list[str]:
    """The ``PREFIX-N`` lines of ``text`` (a terminal's escape sequences left out)."""
    return re.findall(rf"^({prefix}-\d+)$", strip_terminal(text), re.MULTILINE)


# --- the tests ------------------------------------------------------------------------

def test_a_leaf_nodes_session_through_the_root_survives_a_stall_and_a_cut_of_the_leafs_tunnel(
        outcomes, world):
    result = outcome(outcomes, world, "leaf.ssh")
    assert result["returncode"] == 0, result["stderr"]
    got, whole = whole_lines(result["stdout"], "leaf")
    assert got == whole and len(whole) > 50
    outcome(outcomes, world, "outages")  # both outages happened while it ran
    # The root re-attached the session it keys by the leaf's cluster identity.
    assert world.root.log().count("cluster:leaf.root resumes its session") >= 2
    session_id = re.search(r"sid-([0-9a-f-]{36})-end", result["stdout"]).group(1)

    def ended():
        found = world.leaf.edgectl_json("audit", "search", "--session", session_id)
        return found if "session.end" in [e["event"] for e in found] else None

    events = wait_for(ended, 30, f"session.end of {session_id} in the leaf", interval=0.3)
    kinds = [e["event"] for e in events]
    assert kinds.count("session.start") == 1 and kinds.count("session.end") == 1, kinds
    end = next(e for e in events if e["event"] == "session.end")
    assert end["user"] == "una" and end["reason"] == "exited" and end["exit_status"] == 0
    # The root audits no part of the leaf's session (nor a second one).
    assert world.root.edgectl_json("audit", "search", "--session", session_id) == []


def test_after_the_outages_the_leafs_app_answers_through_the_root(outcomes, world, configs):
    outcome(outcomes, world, "outages")

    def leaf_online():
        result = run_edge(world.homes["una"], "clusters", "--format", "json")
        return result.returncode == 0 and {"name": "leaf", "status": "online"} in [
            {"name": c["name"], "status": c["status"]} for c in json.loads(result.stdout)]

    wait_for(leaf_online, 30, "the leaf online at the root again", interval=0.3)
    result = curl(configs["leafapp"], "/api/bytes/100000")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (PATTERN * 2)[:100000]


def test_a_web_terminal_keeps_its_shell_across_a_cut(outcomes, world):
    result = outcome(outcomes, world, "terminal")
    output = result["output"]
    assert result["exit"]["status"] == 0
    got, whole = whole_lines(output, "tick")
    assert got == whole and len(whole) > 50
    positions = [output.index(m) for m in ("before-42", "during-48", "after-54")]
    assert positions == sorted(positions)
    report(f"cut {CUT_FOR:.0f} s: link restored -> web terminal output flowing",
           result["restored_to_output"])
    session_id = result["session_id"]

    def ended():
        found = world.root.edgectl_json("audit", "search", "--session", session_id)
        return found if "session.end" in [e["event"] for e in found] else None

    events = wait_for(ended, 30, f"session.end of {session_id}", interval=0.3)
    assert [e["event"] for e in events] == ["session.start", "session.end"]
    assert events[-1]["reason"] == "exited"


def test_a_web_terminal_to_a_leaf_node_keeps_its_shell_across_the_leafs_outages(
        outcomes, world):
    result = outcome(outcomes, world, "terminal.leaf")
    output = result["output"]
    assert result["exit"]["status"] == 0
    got, whole = whole_lines(output, "tick")
    assert got == whole and len(whole) > 50
    positions = [output.index(m) for m in ("before-42", "during-48", "after-54")]
    assert positions == sorted(positions)
    report(f"leaf cut {LEAF_CUT_FOR:.0f} s: link restored -> web terminal output flowing",
           result["restored_to_output"])

    def ended():
        found = world.leaf.edgectl_json("audit", "search", "--session", result["session_id"])
        return found if "session.end" in [e["event"] for e in found] else None

    events = wait_for(ended, 30, "session.end in the leaf", interval=0.3)
    assert [e["event"] for e in events] == ["session.start", "session.end"]


def test_kubectl_exec_streams_stdin_and_output_across_a_cut(outcomes, world):
    result = outcome(outcomes, world, "kube.exec")
    assert result["returncode"] == 3, result["stderr"]
    assert re.findall(r"^got-k\d+$", result["stdout"], re.MULTILINE) == \
        expected_lines("got-k", result["count"], separator="")


def test_a_leaf_lan_nodes_session_through_the_root_survives_the_leafs_outages(outcomes, world):
    # The leaf's proxy reaches this node over its agent port (a LAN node):
    # only the leaf's tunnel to the root stalls and is cut.
    result = outcome(outcomes, world, "leaf.lan-ssh")
    assert result["returncode"] == 0, result["stderr"]
    got, whole = whole_lines(result["stdout"], "leaflan")
    assert got == whole and len(whole) > 50
    session_id = re.search(r"sid-([0-9a-f-]{36})-end", result["stdout"]).group(1)

    def ended():
        found = world.leaf.edgectl_json("audit", "search", "--session", session_id)
        return found if "session.end" in [e["event"] for e in found] else None

    events = wait_for(ended, 30, f"session.end of {session_id} in the leaf", interval=0.3)
    kinds = [e["event"] for e in events]
    assert kinds.count("session.start") == 1 and kinds.count("session.end") == 1, kinds


def test_kubectl_exec_to_the_leafs_kubernetes_streams_across_the_leafs_outages(outcomes, world):
    result = outcome(outcomes, world, "leaf.kube-exec")
    assert result["returncode"] == 3, result["stderr"]
    assert re.findall(r"^got-k\d+$", result["stdout"], re.MULTILINE) == \
        expected_lines("got-k", result["count"], separator="")
    # Long enough to span the stall and the cut of the leaf's link.
    assert result["count"] > (LEAF_CUT_AT + LEAF_CUT_FOR) / 0.2 / 2


def test_kubectl_exec_in_a_pty_keeps_its_shell_across_a_cut(outcomes, world):
    result = outcome(outcomes, world, "kube.exec-tty")
    assert result["exitstatus"] == 0
    report(f"cut {CUT_FOR:.0f} s: link restored -> kubectl exec -it output flowing",
           result["restored_to_output"])


def test_a_kubectl_port_forward_stream_across_a_cut_is_byte_exact(outcomes, world):
    result = outcome(outcomes, world, "kube.port-forward")
    assert result["status"] == "HTTP/1.1 200 OK"
    assert result["size"] == result["length"] == FORWARDED and result["same"]


def test_past_the_nodes_budget_a_web_terminal_ends_cleanly_with_an_audited_reason(
        outcomes, world):
    result = outcome(outcomes, world, "terminal.past-budget")
    # Ended after the node's budget, when its next tunnel told the proxy (its
    # redials back off from the budget's end: seconds after the link is back
    # on a quiet machine), at the latest by the proxy's own 60 s budget; the
    # browser is told it is closed.
    assert CUT_AT + SHORT_BUDGET < result["ended_at"] < CUT_AT + 60 + 15
    assert result["closed"] is not None and result["closed"]["reason"], result
    report(f"budget {SHORT_BUDGET:g} s, cut {CUT_FOR:g} s: web terminal told "
           f"{result['closed']['reason']!r} at", result["ended_at"] - CUT_AT)
    session_id = result["session_id"]

    def ended():
        found = world.root.edgectl_json("audit", "search", "--session", session_id)
        return found if "session.end" in [e["event"] for e in found] else None

    events = wait_for(ended, 30, f"session.end of {session_id}", interval=0.3)
    assert [e["event"] for e in events] == ["session.start", "session.end"]
    assert events[-1]["reason"] == f"tunnel outage exceeded {SHORT_BUDGET:g}s"


def test_an_app_websocket_echoes_every_message_in_order_across_a_cut(outcomes, world):
    result = outcome(outcomes, world, "app.websocket")
    texts = [m for m in result["echoed"] if isinstance(m, str)]
    assert texts == [f"m{i}" for i in range(1, result["sent"] + 1)]
    assert [m for m in result["echoed"] if not isinstance(m, str)] == [True]


def test_a_large_app_download_across_a_cut_is_byte_exact(outcomes, world):
    result = outcome(outcomes, world, "app.download")
    assert result["status"] == "HTTP/1.1 200 OK"
    assert result["size"] == result["length"] == DOWNLOAD and result["same"]


def test_a_tls_routed_ssh_command_survives_a_cut(outcomes, world):
    result = outcome(outcomes, world, "tls-routing")
    assert result["returncode"] == 0, result["stderr"]
    got, whole = whole_lines(result["stdout"], "routed")
    assert got == whole and len(whole) > 50


def test_a_kubectl_exec_killed_mid_stream_ends_its_process_without_an_error(outcomes, world):
    # After the outages (the module's sessions are done): the client goes away
    # while the command still writes; the stand-in's connection is lost with
    # the process's output registered as its producer.
    outcome(outcomes, world, "outages")
    command = ["sh", "-c", "while :; do echo tick; sleep 0.1; done"]
    execd = subprocess.Popen([KUBECTL, "exec", "-i", "web-1", "--", *command],
                             env=world.kube.env("bob"), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert execd.stdout.readline() == b"tick\n"
    finally:
        execd.kill()
        execd.wait()
    standin = world.kube.standin
    wait_for(lambda: any(s["event"] == "end" and s["command"] == command
                         for s in standin.sessions()), 30,
             "the stand-in to end the killed exec's process", interval=0.2)
    assert standin.errors() == []
    for process in (world.root, world.kube.node):
        assert "Unhandled Error" not in process.log()


def test_a_lan_node_stopping_ends_its_session_at_once_with_the_reason(outcomes, world):
    # Last (it stops the leaf's LAN node): SIGTERM is no outage; the node
    # closes its channels on the agent port with the reason before it goes.
    outcome(outcomes, world, "outages")
    session = subprocess.Popen(
        [sys.executable, "-m", "edgeaccess.client.main", "ssh", "--cluster", "leaf",
         "root@leaflan", "echo sid-$EDGE_SESSION_ID-end; sleep 120"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "EDGE_HOME": str(world.homes["una"])})
    try:
        session_id = re.search(r"sid-([0-9a-f-]{36})-end", session.stdout.readline()).group(1)
        world.leaflan.stop()
        session.wait(30)  # not the proxy's 60 s budget
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
    # The node audited why; a stopping node's last events stay in its durable
    # spool (delivery is cancelled on stop; they are sent at its next start).
    spool = world.leaflan.directory / "data" / "audit-spool" / "events.jsonl"
    events = [json.loads(line) for line in spool.read_text().splitlines() if line.strip()]
    ends = [e for e in events if e["event"] == "session.end" and e["session_id"] == session_id]
    assert [e.get("reason") for e in ends] == ["the node is stopping"], ends
