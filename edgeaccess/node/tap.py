"""``twistd edgenode``: options and service composition."""

from __future__ import annotations

from pathlib import Path

from twisted.python import usage

from edgeaccess import internals
from edgeaccess.config import apply_config_file, listen_endpoint, parse_seconds
from edgeaccess.httpclient import split_addr
from edgeaccess.memory import tune_for_streaming
from edgeaccess.node.lanagent import AGENT_PORT


def parse_labels(text: str) -> dict[str, str]:
    """``"env=dev,team=web"`` -> ``{"env": "dev", "team": "web"}``."""
    import re

    labels: dict[str, str] = {}
    if not text:
        return labels
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_./-]{1,63}", key) or \
                not re.fullmatch(r"[A-Za-z0-9_.:/@+-]{0,255}", value):
            raise usage.UsageError(f"invalid label {part!r} (use key=value,key=value)")
        labels[key] = value
    return labels


class Options(usage.Options):
    """Command line of ``twistd edgenode``."""

    synopsis = "[options]"
    longdesc = ("Runs the edgeaccess node agent: joins a cluster with a token once, then "
                "serves SSH to the cluster's users with certificates only.")
    optFlags = [
        ["no-ssh", None, "serve no SSH (e.g. a node that only publishes Kubernetes)"],
    ]
    optParameters = [
        ["data-dir", "d", None, "directory for the node's identity"],
        ["auth-server", None, None, "auth service HOST:3025 (or the proxy's HOST:3080)"],
        ["token", None, None, "join token (needed for the first start only)"],
        ["ca-pin", None, None, "sha256:HEX pin of the cluster CA (edgectl status)"],
        ["nodename", None, None, "this node's name in the cluster"],
        ["labels", None, "", "labels, key=value,key=value"],
        ["ssh-listen", None, "0.0.0.0:3022", "SSH listen address"],
        ["advertise-addr", None, None,
         "HOST:PORT the proxy dials (default: the SSH listen address, or the address "
         "the auth service sees when listening on every interface)"],
        ["heartbeat-interval", None, "30", "seconds between heartbeats"],
        ["resume-budget", None, "60s",
         "how long tunnel channels (SSH sessions...) outlive a tunnel outage, "
         "e.g. 60s or 2m; 0 turns resumption off"],
        ["env-allow", None, "", "extra client environment variables to accept (comma list)"],
        ["kube-cluster", None, None, "publish a Kubernetes API as this cluster name"],
        ["kubeconfig", None, None, "kubeconfig with the agent's credential for --kube-cluster"],
        ["kube-labels", None, "", "labels of the Kubernetes cluster, key=value,key=value"],
        ["agent-listen", None, None,
         "where a LAN node listens for the proxy's SSH, Kubernetes and app channels "
         "(mutual TLS, resumable; default: the SSH listen host, port 3027; 'off': "
         "none, the proxy dials SSH over plain TCP)"],
        ["agent-advertise-addr", None, None,
         "HOST:PORT the proxy dials for the agent port (default: the advertised SSH host "
         "with the agent port)"],
        ["config", "c", None, "YAML file with any of these options"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["app"] = []

    def opt_app(self, value: str) -> None:
        """publish a web app: name=N,uri=URL[,labels=k:v;k:v][,rewrite_host=H][,ca=FILE]
        (repeatable)"""
        from edgeaccess import errors
        from edgeaccess.apps.spec import parse_app

        try:
            app = parse_app(value)
        except errors.EdgeError as e:
            raise usage.UsageError(str(e))
        if any(a.name == app.name for a in self["app"]):
            raise usage.UsageError(f"app {app.name} given twice")
        self["app"].append(app)

    def postOptions(self) -> None:
        if self["config"]:
            apply_config_file(self, self["config"],
                              {p[0] for p in self.optParameters} - {"config"})
        for required in ("data-dir", "auth-server", "nodename"):
            if not self[required]:
                raise usage.UsageError(f"--{required} is required")
        from edgeaccess import errors
        from edgeaccess.identity.resources import validate_resource_name

        try:
            validate_resource_name(self["nodename"], "node")
            split_addr(self["auth-server"], 3025)
        except errors.EdgeError as e:
            raise usage.UsageError(str(e))
        self["labels"] = parse_labels(self["labels"]) if isinstance(self["labels"], str) \
            else {str(k): str(v) for k, v in (self["labels"] or {}).items()}
        self["kube-labels"] = parse_labels(self["kube-labels"]) \
            if isinstance(self["kube-labels"], str) \
            else {str(k): str(v) for k, v in (self["kube-labels"] or {}).items()}
        if str(self["agent-listen"] or "").strip().lower() == "off":
            self["agent-listen"] = AGENT_OFF
        for addr in ("agent-listen", "agent-advertise-addr"):
            if self[addr] and self[addr] != AGENT_OFF and not str(self[addr]).isdigit():
                try:
                    split_addr(str(self[addr]), AGENT_PORT)
                except errors.EdgeError as e:
                    raise usage.UsageError(f"--{addr}: {e}")
        if bool(self["kube-cluster"]) != bool(self["kubeconfig"]):
            raise usage.UsageError("--kube-cluster and --kubeconfig go together")
        if self["kube-cluster"]:
            try:
                validate_resource_name(self["kube-cluster"], "kube cluster")
            except errors.EdgeError as e:
                raise usage.UsageError(str(e))
        try:
            self["heartbeat-interval"] = float(self["heartbeat-interval"])
        except ValueError:
            raise usage.UsageError("--heartbeat-interval must be a number of seconds")
        if not 0.05 <= self["heartbeat-interval"] <= 3600:
            raise usage.UsageError("--heartbeat-interval must be between 0.05 and 3600")
        self["resume-budget"] = parse_seconds(self["resume-budget"], "resume-budget",
                                              high=3600.0)


def makeService(options, reactor=None):
    from edgeaccess.node.service import NodeService

    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    # What this Twisted/pyOpenSSL/CPython offers of the internals we use:
    # misfits take the stock path, with one warning (edgeaccess.internals).
    internals.self_check()
    # Sessions and tunnels stream bulk data: see edgeaccess.memory.
    tune_for_streaming()
    listen_addr = options["ssh-listen"]
    host, port = split_addr(listen_addr if not listen_addr.isdigit()
                            else f"0.0.0.0:{listen_addr}", 3022)
    advertise = options["advertise-addr"] or f"{host}:{port}"
    endpoint = listen_endpoint(reactor, listen_addr, 3022)
    env_allow = [e.strip() for e in (options["env-allow"] or "").split(",") if e.strip()]
    # The agent port (LAN nodes: SSH, Kubernetes, apps): the SSH listen host
    # and port 3027 unless told otherwise (an ephemeral SSH port, as tests
    # use, makes it ephemeral too); "off": none.
    agent_off = options["agent-listen"] == AGENT_OFF
    agent_addr = (None if agent_off else options["agent-listen"]) or \
        _host_port(host, AGENT_PORT if port else 0)
    agent_host, agent_port = split_addr(agent_addr if not agent_addr.isdigit()
                                        else _host_port(host, int(agent_addr)), AGENT_PORT)
    advertised_host = advertise.rpartition(":")[0].strip("[]")
    agent_advertise = options["agent-advertise-addr"] or _host_port(
        advertised_host if agent_host in (host, "0.0.0.0", "::") else agent_host, agent_port)
    agent_endpoint = listen_endpoint(reactor, _host_port(agent_host, agent_port), AGENT_PORT)
    kube = None
    if options["kube-cluster"]:
        from edgeaccess.kube.kubeconfig import load_agent_config

        kube = (options["kube-cluster"], options["kube-labels"],
                load_agent_config(options["kubeconfig"]))
    return NodeService(
        kube=kube, serve_ssh=not options["no-ssh"],
        data_dir=Path(options["data-dir"]).absolute(),
        auth_server=options["auth-server"], token=options["token"],
        ca_pin=options["ca-pin"], nodename=options["nodename"], labels=options["labels"],
        listen=endpoint.listen, advertise_addr=advertise, reactor=reactor,
        heartbeat_interval=options["heartbeat-interval"], env_allow=env_allow,
        resume_budget=options.get("resume-budget", 60.0),
        apps=options.get("app") or [],
        agent_listen=None if agent_off else agent_endpoint.listen,
        agent_advertise=None if agent_off else agent_advertise)


#: ``--agent-listen off``: no agent port.
AGENT_OFF = "off"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
