"""``edge``: the user's client.

``edge login`` trades a password for short-lived certificates and writes
a profile that plain OpenSSH uses (``ssh -F $EDGE_HOME/ssh_config
LOGIN@NODE.CLUSTER``); the other commands read that profile.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone

from cryptography.hazmat.primitives import serialization

from edgeaccess import cli, errors
from edgeaccess.client import profile as profiles
from edgeaccess.httpclient import Client, fetch_pinned_ca, split_addr
from edgeaccess.pki import keys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge", description="Log in to an edgeaccess cluster "
                                "and reach its nodes with OpenSSH.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    login = sub.add_parser("login", help="log in and get short-lived certificates")
    login.add_argument("--proxy", required=True, help="proxy web address HOST[:3080]")
    login.add_argument("--user", help="user name (default: your local user name)")
    login.add_argument("--auth", default="local", help="local (default) or a connector name")
    login.add_argument("--password-stdin", action="store_true",
                       help="read the password from the first line of stdin")
    trust = login.add_mutually_exclusive_group()
    trust.add_argument("--insecure", action="store_true",
                       help="do not verify the proxy's certificate (tests only)")
    trust.add_argument("--ca-pin", help="sha256:HEX pin of the cluster CA (edgectl status)")
    login.add_argument("--ttl", help="certificate lifetime, e.g. 8h (capped by your roles)")
    _add_routing_flags(login)

    sub.add_parser("status", help="show the current login")
    sub.add_parser("logout", help="delete the keys and certificates of the profile")
    config = sub.add_parser("config", help="print the ssh_config for OpenSSH (the routing "
                            "flags switch it, and the profile, to that mode first)")
    _add_routing_flags(config)
    ls = sub.add_parser("ls", help="list the nodes you may reach")
    ls.add_argument("--cluster", help="cluster name (default: the one logged in to)")
    ls.add_argument("--format", choices=("text", "json"), default="text")
    clusters = sub.add_parser("clusters", help="list clusters")
    clusters.add_argument("--format", choices=("text", "json"), default="text")
    ssh = sub.add_parser("ssh", help="ssh to a node: edge ssh LOGIN@NODE [COMMAND...]")
    ssh.add_argument("--cluster", help="cluster of the node")
    ssh.add_argument("-t", action="store_true", help="force a terminal")
    ssh.add_argument("target", help="LOGIN@NODE")
    ssh.add_argument("command_args", nargs=argparse.REMAINDER)
    scp = sub.add_parser("scp", help="copy files: edge scp [-r] SRC DST (LOGIN@NODE:PATH)")
    scp.add_argument("--cluster", help="cluster of the node")
    scp.add_argument("-r", action="store_true", help="copy directories")
    scp.add_argument("paths", nargs="+")
    from edgeaccess.audit.cli import add_edge_play
    from edgeaccess.kube.cli import add_edge_kube

    add_edge_play(sub)
    add_edge_kube(sub)
    from edgeaccess.apps.cli import add_edge_apps

    add_edge_apps(sub)
    return p


def _add_routing_flags(parser: argparse.ArgumentParser) -> None:
    routing = parser.add_mutually_exclusive_group()
    routing.add_argument(
        "--tls-routing", dest="tls_routing", action="store_const", const=True,
        help="reach nodes with a ProxyCommand opening a TLS stream to the proxy's "
             "tunnel port (ALPN edge-ssh/1): no SSH hop at the proxy")
    routing.add_argument(
        "--proxy-jump", dest="tls_routing", action="store_const", const=False,
        help="reach nodes with ProxyJump through the proxy's SSH port (the default)")


def main(argv=None) -> int:
    return cli.run(_main, argv)


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    home = profiles.edge_home()
    if args.command == "login":
        return _login(args, home)
    if args.command == "logout":
        from edgeaccess.kube.cli import remove_kube_logins

        for name in remove_kube_logins(home):
            sys.stdout.write(f"Removed kubeconfig context {name}.\n")
        import shutil

        shutil.rmtree(home / "apps", ignore_errors=True)  # app certificates (edge apps)
        if profiles.remove(home):
            sys.stdout.write(f"Logged out (removed the keys and certificates in {home}).\n")
        else:
            sys.stdout.write("Not logged in.\n")
        return 0
    profile = _require_profile(home)
    if args.command == "status":
        valid = datetime.fromisoformat(profile.valid_before.replace("Z", "+00:00"))
        now = datetime.now(timezone.utc)
        state = ("EXPIRED" if valid <= now else
                 f"valid for {_human(valid - now)}")
        sys.stdout.write(
            f"Proxy:        {profile.proxy}\n"
            f"User:         {profile.username}\n"
            f"Cluster:      {profile.cluster}\n"
            f"Roles:        {', '.join(profile.roles)}\n"
            f"Logins:       {', '.join(profile.logins) or '(none)'}\n"
            f"Valid until:  {profile.valid_before} [{state}]\n")
        return 0 if valid > now else 1
    if args.command == "config":
        if args.tls_routing is not None and args.tls_routing != profile.tls_routing:
            profile.tls_routing = args.tls_routing
            text = profiles.write_ssh_config(home, profile)
            profiles.write_profile(home, profile)
        else:
            text = (home / "ssh_config").read_text()
        sys.stdout.write(text)
        return 0
    if args.command == "ls":
        path = "/v1/nodes"
        if args.cluster and args.cluster != profile.cluster:
            path = f"/v1/clusters/{args.cluster}/nodes"
        nodes = _client(home, profile).get(path)
        if args.format == "json":
            cli.print_json(nodes)
        else:
            cli.print_table(["Node", "Address", "Labels"], [
                [n["name"], n["address"], cli.format_labels(n["labels"])] for n in nodes])
        return 0
    if args.command == "clusters":
        clusters = [{"name": profile.cluster, "kind": "root", "status": "online"}]
        try:
            clusters += _client(home, profile).get("/v1/clusters")
        except errors.NotFound:
            pass
        if args.format == "json":
            cli.print_json(clusters)
        else:
            cli.print_table(["Cluster", "Kind", "Status"],
                            [[c["name"], c["kind"], c["status"]] for c in clusters])
        return 0
    if args.command == "kube":
        from edgeaccess.kube.cli import run_edge_kube

        if args.kube_command != "credentials":
            _check_valid(profile)
        return run_edge_kube(args, home, profile, _client(home, profile))
    _check_valid(profile)
    if args.command == "apps":
        from edgeaccess.apps.cli import run_edge_apps

        return run_edge_apps(args, home, profile, _client(home, profile))
    if args.command == "play":
        from edgeaccess.audit.cli import run_edge_play

        return run_edge_play(args, _client(home, profile))
    if args.command == "ssh":
        login, at, node = args.target.rpartition("@")
        if not at or not login or not node:
            raise errors.BadRequest("edge ssh takes LOGIN@NODE")
        cluster = args.cluster or profile.cluster
        _check_node(home, profile, cluster, node)
        argv = ["ssh", "-F", str(home / "ssh_config")]
        if args.t:
            argv.append("-t")
        argv += [f"{login}@{node}.{cluster}", *args.command_args]
        _exec(argv)
    if args.command == "scp":
        cluster = args.cluster or profile.cluster
        argv = ["scp", "-F", str(home / "ssh_config")] + (["-r"] if args.r else [])
        argv += [_scp_path(p, cluster) for p in args.paths]
        _exec(argv)
    raise errors.BadRequest(f"unknown command {args.command}")


def _check_node(home, profile, cluster: str, node: str) -> None:
    """One clear line for an unknown node, instead of OpenSSH's several."""
    path = "/v1/nodes" if cluster == profile.cluster else f"/v1/clusters/{cluster}/nodes"
    try:
        nodes = _client(home, profile).get(path)
    except (errors.ClusterOffline, errors.NotFound):
        raise
    except errors.EdgeError:
        return  # let OpenSSH try and report; the proxy decides in the end
    if not any(node in (n.get("name"), n.get("uuid")) for n in nodes):
        raise errors.NotFound(f"node {node} not found in cluster {cluster} "
                              f"(or your roles do not allow it); see edge ls")


def _scp_path(path: str, cluster: str) -> str:
    """``LOGIN@NODE:PATH`` -> ``LOGIN@NODE.CLUSTER:PATH``; local paths unchanged."""
    head, colon, rest = path.partition(":")
    if not colon or "/" in head or "@" not in head:
        return path
    login, _, node = head.rpartition("@")
    return f"{login}@{node}.{cluster}:{rest}"


def _exec(argv) -> None:
    sys.stdout.flush()
    try:
        os.execvp(argv[0], argv)
    except FileNotFoundError:
        raise errors.EdgeError(f"{argv[0]} not found: install the OpenSSH client")


def _human(delta) -> str:
    minutes = int(delta.total_seconds() // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _require_profile(home):
    profile = profiles.load(home)
    if profile is None:
        raise errors.AuthenticationFailed(f"not logged in (no profile in {home}); run edge login")
    return profile


def _check_valid(profile) -> None:
    valid = datetime.fromisoformat(profile.valid_before.replace("Z", "+00:00"))
    if valid <= datetime.now(timezone.utc):
        raise errors.CertificateInvalid(
            f"your certificates expired at {profile.valid_before}; run edge login again")


def _client(home, profile) -> Client:
    """The logged-in client: only a proxy of the profile's cluster."""
    return Client(profile.proxy, ca_pem=(home / "ca.pem").read_text(), cluster=profile.cluster,
                  cert_file=str(home / "tls.crt"), key_file=str(home / "tls.key"))


def _tls_routing_choice(args, home, proxy: str) -> bool:
    """The flag if given, else the mode of an earlier login to the same proxy."""
    if args.tls_routing is not None:
        return args.tls_routing
    previous = profiles.load(home)
    return bool(previous is not None and previous.proxy == proxy and previous.tls_routing)


def _login(args, home) -> int:
    proxy = args.proxy
    split_addr(proxy, 3080)
    ca_pem = None
    if args.ca_pin:
        ca_pem = fetch_pinned_ca(proxy, args.ca_pin)
    elif not args.insecure:
        previous = profiles.load(home)
        if previous is not None and previous.proxy == proxy and (home / "ca.pem").exists():
            ca_pem = (home / "ca.pem").read_text()
    # With a CA (pinned, or kept from an earlier login) the server must be a
    # proxy of that CA's cluster named by the address dialled, before a
    # byte of the password is sent (edgeaccess.pki.x509ca.check_server_certificate).
    client = Client(proxy, ca_pem=ca_pem, insecure=args.insecure)
    ping = client.get("/v1/ping")
    if client.expected is not None and ping.get("cluster_name") != client.expected.cluster:
        raise errors.CertificateInvalid(
            f"the proxy at {proxy} says it is cluster {ping.get('cluster_name')!r}, "
            f"but its certificate is of cluster {client.expected.cluster!r}")
    user = args.user or os.environ.get("USER") or "root"
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        import getpass

        password = getpass.getpass(f"Password for {user}@{ping['cluster_name']}: ")
    key = keys.generate_private_key()
    tls_public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    body = {"user": user, "password": password, "auth": args.auth,
            "ssh_public_key": keys.public_key_openssh(key).decode(),
            "tls_public_key": tls_public}
    if args.ttl:
        body["ttl"] = args.ttl
    answer = client.post("/v1/login", body)
    if ca_pem is None:
        # --insecure: keep the CA the proxy now vouches for, for later calls.
        ca_pem = "".join(answer["tls_ca"])
    profile = profiles.Profile(
        proxy=proxy, cluster=answer["cluster_name"], username=answer["username"],
        logins=answer["logins"], roles=answer["roles"], valid_before=answer["valid_before"],
        ssh_addr=answer["ssh_addr"], ca_pin=args.ca_pin or "",
        leaf_clusters=[l["name"] for l in answer.get("trusted_clusters", [])],
        tunnel_addr=(ping.get("proxy") or {}).get("tunnel_addr") or "",
        tls_routing=_tls_routing_choice(args, home, proxy))
    if profile.tls_routing and not profile.tunnel_addr:
        raise errors.BadRequest(f"the proxy at {proxy} announces no tunnel address: "
                                "--tls-routing is not available there")
    profiles.save(home, profile, private_key=key, ssh_certificate=answer["ssh_certificate"],
                  tls_certificate=answer["tls_certificate"], ca_pem=ca_pem,
                  host_ca_lines=answer["ssh_host_ca"],
                  leaf_clusters=answer.get("trusted_clusters", []))
    sys.stdout.write(
        f"Logged in as {profile.username} to cluster {profile.cluster} via {proxy}\n"
        f"Roles:  {', '.join(profile.roles)}\n"
        f"Logins: {', '.join(profile.logins) or '(none)'}\n"
        f"Valid until {profile.valid_before}\n"
        f"Try: ssh -F {home / 'ssh_config'} LOGIN@NODE.{profile.cluster}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
