"""Run a local cluster of real processes: ``make run``, and the end-to-end tests.

``python -m edgeaccess.devcluster --dir run`` starts a proxy and a LAN
node on 127.0.0.1 with the embedded SQLite backend, creates a user, and
prints the commands to try. :class:`ProxyProcess` and
:class:`NodeProcess` are what the integration tests use too.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import attrs

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class ProcessFailed(Exception):
    pass


def stop_process(process: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL once ``timeout`` seconds pass; reaped either way."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for(predicate, timeout: float, what: str, process=None, interval: float = 0.05):
    """Poll ``predicate`` until it returns a true value, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise ProcessFailed(f"{what}: process exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _dies_with_parent():
    """A ``preexec_fn`` for :class:`subprocess.Popen` that asks Linux to send
    the child SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``), so
    a killed pytest or devcluster (``kill -9``) leaves no daemon holding its
    ports; ``None`` elsewhere (nothing to do)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return set_parent_death_signal


_spawn_requests: "queue.SimpleQueue | None" = None
_spawner_lock = threading.Lock()


def popen(argv: list[str], **options) -> subprocess.Popen:
    """:class:`subprocess.Popen` of a child that dies with this process
    (:func:`_dies_with_parent`). Linux sends the signal when the *thread*
    that forked ends, and tests start daemons from pools whose threads end
    at once: every child is forked by one daemon thread that lives as long
    as the process."""
    global _spawn_requests
    with _spawner_lock:
        if _spawn_requests is None:
            _spawn_requests = queue.SimpleQueue()
            threading.Thread(target=_spawner, args=(_spawn_requests,), name="devcluster-spawner",
                             daemon=True).start()
    result: concurrent.futures.Future = concurrent.futures.Future()
    _spawn_requests.put((result, argv, options))
    return result.result()


def _spawner(requests: queue.SimpleQueue) -> None:
    while True:
        result, argv, options = requests.get()
        try:
            result.set_result(subprocess.Popen(argv, preexec_fn=_dies_with_parent(), **options))
        except BaseException as error:
            result.set_exception(error)


@attrs.define
class _Process:
    directory: Path
    log_path: Path
    process: subprocess.Popen | None = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _spawn(self, argv: list[str], env=None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.directory, env={**os.environ, **(env or {})}, start_new_session=True)
        log.close()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)


@attrs.define
class ProxyProcess(_Process):
    """``twistd -n edgeproxy`` with every port chosen by the kernel (or given)."""

    cluster: str = "example"
    ports: dict = attrs.Factory(dict)
    extra_args: list = attrs.Factory(list)
    #: Extra environment (e.g. EDGE_CA_KEY, the key every proxy of a cluster shares).
    env: dict = attrs.Factory(dict)

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    def start(self, timeout: float = 30.0) -> "ProxyProcess":
        runtime = self.data_dir / "runtime.json"
        if runtime.exists():
            runtime.unlink()
        listen = {name: f"127.0.0.1:{self.ports.get(name, 0)}"
                  for name in ("web", "ssh", "auth", "tunnel", "kube")}
        self._spawn(TWISTD + [
            "-n", "--pidfile=", "edgeproxy", "--data-dir", str(self.data_dir),
            "--cluster-name", self.cluster, "--public-addr", "127.0.0.1",
            "--web-listen", listen["web"], "--ssh-listen", listen["ssh"],
            "--auth-listen", listen["auth"], "--tunnel-listen", listen["tunnel"],
            "--kube-listen", listen["kube"], *self.extra_args], env=self.env)
        wait_for(runtime.exists, timeout, "proxy runtime.json", self.process)
        info = self.runtime()
        wait_for(lambda: self._presets_ready(), timeout, "preset roles", self.process)
        for name, addr in info["listen"].items():
            self.ports.setdefault(name, int(addr.rpartition(":")[2]))
        return self

    def _presets_ready(self) -> bool:
        log = self.log()
        # A proxy sharing a PostgreSQL backend finds the presets made by another.
        return "created preset role" in log or "loaded certificate" in log or "preset roles ready" in log

    def runtime(self) -> dict:
        return json.loads((self.data_dir / "runtime.json").read_text())

    def authority(self):
        """The cluster's CAs, private keys included (tests that forge, benchmarks
        that simulate nodes): read from the embedded backend with the CA key
        in the data dir (the proxy keeps them nowhere else)."""
        import sqlite3

        from edgeaccess.pki import castore

        database = sqlite3.connect(f"file:{self.data_dir / 'backend.sqlite3'}?mode=ro", uri=True)
        try:
            (value,) = database.execute("SELECT value FROM items WHERE key = ?",
                                        (castore.AUTHORITIES_KEY,)).fetchone()
        finally:
            database.close()
        key = castore.parse_ca_key((self.data_dir / castore.DEFAULT_KEY_FILE).read_text(),
                                   "the CA key file")
        return castore.open_authority(bytes(value), self.cluster, key)

    def addr(self, name: str) -> str:
        return self.runtime()["addresses"][name]

    def edgectl(self, *args, input: str | None = None, check: bool = True):
        result = subprocess.run(
            [sys.executable, "-m", "edgeaccess.admin.main", "--data-dir", str(self.data_dir),
             *args], input=input, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise ProcessFailed(f"edgectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def edgectl_json(self, *args):
        return json.loads(self.edgectl(*args, "--format", "json").stdout)

    def pin(self) -> str:
        return self.edgectl_json("status")["ca_pin"]

    def add_user(self, name: str, password: str, roles=("access",), logins=()):
        args = ["users", "add", name, "--roles", ",".join(roles)]
        if logins:
            args += ["--logins", ",".join(logins)]
        self.edgectl(*args)
        self.edgectl("users", "set-password", name, "--password-stdin", input=password + "\n")

    def login(self, home: Path, user: str, password: str, *, pin: str | None = None,
              extra=()) -> Path:
        """``edge login`` as ``user`` with ``EDGE_HOME=home``, pinning this
        cluster's CA; raises ProcessFailed with edge's message on failure."""
        result = run_edge(home, "login", "--proxy", self.addr("web"), "--user", user,
                          "--password-stdin", "--ca-pin", pin or self.pin(), *extra,
                          input=password + "\n")
        if result.returncode != 0:
            raise ProcessFailed(f"edge login as {user} failed: {result.stderr.strip()}")
        return home

    def node_token(self, ttl: str = "30m") -> str:
        return self.edgectl_json("tokens", "add", "--type", "node", "--ttl", ttl)["token"]


@attrs.define
class NodeProcess(_Process):
    """``twistd -n edgenode`` joined to a proxy's auth service."""

    name: str = "node"
    auth_server: str = ""
    token: str | None = None
    ca_pin: str | None = None
    labels: str = ""
    ssh_port: int = 0
    extra_args: list = attrs.Factory(list)

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    def start(self) -> "NodeProcess":
        argv = TWISTD + ["-n", "--pidfile=", "edgenode", "--data-dir", str(self.data_dir),
                         "--auth-server", self.auth_server, "--nodename", self.name,
                         "--ssh-listen", f"127.0.0.1:{self.ssh_port}",
                         "--heartbeat-interval", "1"]
        if self.token:
            argv += ["--token", self.token]
        if self.ca_pin:
            argv += ["--ca-pin", self.ca_pin]
        if self.labels:
            argv += ["--labels", self.labels]
        self._spawn(argv + self.extra_args)
        return self

    def wait_listed(self, proxy: ProxyProcess, timeout: float = 30.0,
                    address: str | None = None) -> dict:
        """This node's entry in ``edgectl nodes ls`` (with ``address``, if given)."""
        def listed():
            for node in proxy.edgectl_json("nodes", "ls"):
                if node["name"] == self.name and address in (None, node["address"]):
                    return node
            return None

        return wait_for(listed, timeout, f"node {self.name} in nodes ls", self.process,
                        interval=0.2)


def join_node(proxy: ProxyProcess, directory: Path, name: str, *, tunnel: bool = False,
              labels: str = "", timeout: float = 30.0, auth_server: str | None = None,
              **options) -> tuple[NodeProcess, dict]:
    """Start a node that joins ``proxy`` with a token and the CA pin (through
    the proxy's web address in reverse-tunnel mode when ``tunnel``) and wait
    until ``edgectl nodes ls`` lists it (with address ``tunnel`` in that mode).

    ``auth_server`` overrides the address joined (e.g. ``127.0.0.1:PORT`` when
    the public address is a name only browsers and curl resolve).

    Returns the node and its listing. A node that does not join is stopped,
    and the error carries the end of its log.
    """
    node = NodeProcess(directory / name, directory / f"{name}.log", name=name,
                       auth_server=auth_server or proxy.addr("web" if tunnel else "auth"),
                       token=proxy.node_token(), ca_pin=proxy.pin(), labels=labels, **options)
    node.start()
    try:
        return node, node.wait_listed(proxy, timeout, address="tunnel" if tunnel else None)
    except Exception as error:
        node.stop()
        raise ProcessFailed(f"node {name} did not join ({error}); its log ends:\n"
                            f"{node.log()[-4000:]}") from error


def run_edge(home: Path, *args, input: str | None = None, timeout: float = 60.0):
    """Run the ``edge`` client with ``EDGE_HOME=home``."""
    return subprocess.run([sys.executable, "-m", "edgeaccess.client.main", *args],
                          input=input, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "EDGE_HOME": str(home)})


#: ``make run`` publishes its demo app at ``demo.edge.localhost`` (browsers and
#: curl resolve ``*.localhost`` to loopback themselves).
DEMO_APPS_DOMAIN = "edge.localhost"


def start_demo_app(proxy: ProxyProcess, log_path: Path) -> tuple[subprocess.Popen, int]:
    """``edgeaccess.apps.demo`` on an ephemeral port, verifying assertions
    against ``proxy``'s JWKS; returns the process and its port."""
    web = proxy.runtime()["listen"]["web"].replace("0.0.0.0", "127.0.0.1")
    process = popen(
        [sys.executable, "-m", "edgeaccess.apps.demo", "--listen", "127.0.0.1:0",
         "--jwks", f"https://{web}/.well-known/jwks.json",
         "--jwks-ca", str(proxy.data_dir / "ca" / "tls_ca.crt")],
        stdout=subprocess.PIPE, stderr=open(log_path, "ab"), start_new_session=True)
    line = process.stdout.readline().decode()
    if not line.startswith("PORT "):
        stop_process(process)
        raise ProcessFailed(f"the demo app did not start: {line!r}")
    return process, int(line.split()[1])


def _interrupt_once(signum, frame) -> None:
    """SIGTERM stops the cluster like Ctrl-C; a second one must not cut the
    clean-up short (children would be left running)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run a local edgeaccess cluster.")
    parser.add_argument("--dir", default="run", help="state directory (default ./run)")
    parser.add_argument("--cluster", default="local")
    parser.add_argument("--web-port", type=int, default=3080)
    parser.add_argument("--ssh-port", type=int, default=3023)
    parser.add_argument("--auth-port", type=int, default=3025)
    parser.add_argument("--node-port", type=int, default=3022)
    args = parser.parse_args(argv)
    # Stop the children on SIGTERM too, not only on Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt_once)
    base = Path(args.dir).absolute()
    proxy = ProxyProcess(base / "proxy", base / "proxy.log", cluster=args.cluster,
                         ports={"web": args.web_port, "ssh": args.ssh_port,
                                "auth": args.auth_port, "tunnel": 3024, "kube": 3026},
                         extra_args=["--apps-domain", DEMO_APPS_DOMAIN])
    node = tunnel_node = demo_app = None
    try:
        proxy.start()
        login = os.environ.get("USER") or "root"
        password_file = base / "demo-password"
        if not password_file.exists():
            password = secrets.token_urlsafe(12)
            proxy.add_user("demo", password, roles=("access",), logins=(login,))
            password_file.write_text(password + "\n")
            os.chmod(password_file, 0o600)
        password = password_file.read_text().strip()
        node = NodeProcess(base / "lan-node", base / "lan-node.log", name="lan-node",
                           auth_server=proxy.addr("auth"), token=proxy.node_token(),
                           ca_pin=proxy.pin(), labels="env=dev,kind=lan",
                           ssh_port=args.node_port)
        node.start()
        # A small web app, published by the tunnelled node (edgeaccess.apps).
        demo_app, demo_port = start_demo_app(proxy, base / "demo-app.log")
        tunnel_node = NodeProcess(base / "tunnel-node", base / "tunnel-node.log",
                                  name="tunnel-node", auth_server=proxy.addr("web"),
                                  token=proxy.node_token(), ca_pin=proxy.pin(),
                                  labels="env=edge,kind=tunnel",
                                  extra_args=["--app", f"name=demo,uri=http://127.0.0.1:"
                                                       f"{demo_port},labels=env:dev"])
        tunnel_node.start()
        node.wait_listed(proxy)
        tunnel_node.wait_listed(proxy)
        home = base / "edge-home"
        web = proxy.addr("web")
        print(f"""
edgeaccess cluster {args.cluster!r} is running (logs in {base}/*.log).

  web UI            https://{web}/   (user demo, password below; the browser verifies the
                    page once it trusts the cluster's web CA {proxy.data_dir / 'ca' / 'web_ca.crt'}:
                    certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n edge-{args.cluster} -i THAT_FILE)
  proxy web/login   https://{web}
  proxy SSH         {proxy.addr('ssh')}
  auth API          {proxy.addr('auth')}
  LAN node          lan-node.{args.cluster} (listens on 127.0.0.1:{args.node_port})
  tunnelled node    tunnel-node.{args.cluster} (no open port: reverse tunnel to the proxy)

Try it (user demo, password in {password_file}: {password}):

  export EDGE_HOME={home} PATH={Path(sys.executable).parent}:$PATH
  edge login --proxy {web} --user demo --ca-pin {proxy.pin()}
  edge ls
  ssh -F $EDGE_HOME/ssh_config {login}@lan-node.{args.cluster}
  ssh -F $EDGE_HOME/ssh_config {login}@tunnel-node.{args.cluster}
  edgectl --data-dir {proxy.data_dir} nodes ls

Kubernetes (port {proxy.addr('kube').rpartition(':')[2]}): no real cluster runs here. The tests' API
stand-in, a proxy, a kube agent and users in one go (prints a kubectl line):

  PYTHONPATH=. {sys.executable} tests/kube_world.py {base / 'kube-world'}

The demo web app on the tunnelled node (curl resolves *.localhost itself):

  edge apps login demo
  $(edge apps config demo --format curl)/api/whoami      # https://demo.{DEMO_APPS_DOMAIN}:{web.rpartition(':')[2]}

Press Ctrl-C to stop the cluster.""", flush=True)
        while all(p.process.poll() is None for p in (proxy, node, tunnel_node)):
            time.sleep(0.5)
        print("a process exited; see the logs", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except (ProcessFailed, TimeoutError) as e:
        print(f"error: {e}\n--- proxy log ---\n{proxy.log()[-3000:]}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for child in (tunnel_node, node):
            if child is not None:
                child.stop()
        stop_process(demo_app)
        proxy.stop()


if __name__ == "__main__":
    sys.exit(main())
