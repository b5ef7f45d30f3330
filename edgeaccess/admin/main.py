"""``edgectl``: the administrator's client.

Talks to the auth API with an admin identity: on the auth host with
``--data-dir DIR`` (the identity the proxy wrote there), or anywhere with
``--auth-server ADDR --identity FILE``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgeaccess import cli, errors
from edgeaccess.httpclient import Client, split_addr

KIND_ALIASES = {
    "role": "role", "roles": "role",
    "connector": "ldap_connector", "connectors": "ldap_connector",
    "ldap_connector": "ldap_connector", "ldap_connectors": "ldap_connector",
    "trusted_cluster": "trusted_cluster", "trusted_clusters": "trusted_cluster",
    "tc": "trusted_cluster",
    "user": "user", "users": "user",
    "token": "token", "tokens": "token",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgectl", description="Administer an edgeaccess cluster.")
    p.add_argument("--data-dir", "-d", help="auth host data directory (uses its admin identity)")
    p.add_argument("--auth-server", help="auth API address HOST:3025")
    p.add_argument("--identity", "-i", help="identity file (key, certificate, CA) for --auth-server")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    # --format is accepted after the command too (`edgectl status --format json`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--format", choices=("text", "json"), default=argparse.SUPPRESS,
                        help="output format")
    sub = _Sub(p.add_subparsers(dest="command", required=True, metavar="COMMAND"), common)

    sub.add_parser("status", help="cluster name, CA fingerprints and CA pin")

    users = sub.add_parser("users", help="manage local users").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    add = users.add_parser("add", help="create a user; prints a one-time signup URL")
    add.add_argument("name")
    add.add_argument("--roles", required=True, help="comma-separated role names")
    add.add_argument("--logins", default="", help="comma-separated Unix logins")
    sp = users.add_parser("set-password", help="set a user's password")
    sp.add_argument("name")
    sp.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    users.add_parser("ls", help="list users")
    rm = users.add_parser("rm", help="delete a user")
    rm.add_argument("name")

    tokens = sub.add_parser("tokens", help="manage join tokens").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    tadd = tokens.add_parser("add", help="create a join token")
    tadd.add_argument("--type", required=True, choices=("node", "trusted_cluster"))
    tadd.add_argument("--ttl", default="30m", help="lifetime, e.g. 30m, 2h (default 30m)")
    tokens.add_parser("ls", help="list tokens")
    trm = tokens.add_parser("rm", help="delete a token")
    trm.add_argument("token")

    create = sub.add_parser("create", help="create resources from a YAML file")
    create.add_argument("-f", "--filename", required=True, help="YAML file ('-' for stdin)")
    create.add_argument("--force", action="store_true", help="replace existing resources")

    get = sub.add_parser("get", help="show resources")
    get.add_argument("kind", help="roles, users, connectors or trusted_clusters")
    get.add_argument("name", nargs="?")

    rmr = sub.add_parser("rm", help="delete a resource: KIND/NAME")
    rmr.add_argument("target")

    nodes = sub.add_parser("nodes", help="list nodes").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    nodes.add_parser("ls", help="list nodes")

    lock = sub.add_parser("lock", help="lock a user or a node out (prints the lock id)")
    target = lock.add_mutually_exclusive_group(required=True)
    target.add_argument("--user", help="the user to lock")
    target.add_argument("--node", help="the node to lock (name or id)")
    lock.add_argument("--ttl", help="lifetime, e.g. 30m, 8h (default: until removed)")
    lock.add_argument("--message", help="shown to the user when refused or cut off")
    locks = sub.add_parser("locks", help="list or remove locks").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    locks.add_parser("ls", help="list the locks in force")
    lrm = locks.add_parser("rm", help="remove a lock")
    lrm.add_argument("lock_id", metavar="ID")

    apps = sub.add_parser("apps", help="web apps: list or rotate the key that signs app "
                                       "identities (JWT)").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    apps.add_parser("jwt-keys", help="list the keys in the JWKS (kid, signing or retired)")
    apps.add_parser("rotate-jwt-key",
                    help="sign app identities (Edge-Jwt-Assertion) with a new key; the old "
                         "one stays in the JWKS for 15 minutes")

    from edgeaccess.audit.cli import add_edgectl_audit

    add_edgectl_audit(sub)
    return p


class _Sub:
    """Adds the common options to every (sub)command parser."""

    def __init__(self, action, common) -> None:
        self._action = action
        self._common = common

    def add_parser(self, *args, **kwargs):
        parser = self._action.add_parser(*args, parents=[self._common], **kwargs)
        common = self._common
        original = parser.add_subparsers

        def add_subparsers(**kw):
            return _Sub(original(**kw), common)

        parser.add_subparsers = add_subparsers
        return parser


def _client(args) -> Client:
    if args.auth_server:
        if not args.identity:
            raise errors.BadRequest("--auth-server needs --identity FILE")
        identity = Path(args.identity)
        addr = args.auth_server
    elif args.data_dir:
        data_dir = Path(args.data_dir)
        identity = data_dir / "admin" / "identity.pem"
        try:
            runtime = json.loads((data_dir / "runtime.json").read_text())
        except FileNotFoundError:
            raise errors.EdgeError(
                f"{data_dir} has no runtime.json: is `twistd edgeproxy` running with "
                f"--data-dir {data_dir}?")
        host, port = split_addr(runtime["listen"]["auth"], 3025)
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        addr = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    else:
        raise errors.BadRequest("give --data-dir DIR, or --auth-server ADDR --identity FILE")
    try:
        pem = identity.read_text()
    except FileNotFoundError:
        raise errors.EdgeError(f"identity file {identity} not found")
    certs = pem[pem.find("-----BEGIN CERTIFICATE-----"):]
    blocks = certs.split("-----END CERTIFICATE-----")
    ca_pem = "-----END CERTIFICATE-----".join(blocks[1:]).strip()
    if not ca_pem:
        raise errors.EdgeError(f"identity file {identity} holds no CA certificate")
    # The server must be a proxy of our own identity's cluster.
    from edgeaccess.pki import x509ca

    try:
        own = x509ca.identity_from_certificate(
            x509ca.load_certificate_pem((blocks[0] + "-----END CERTIFICATE-----").encode()))
    except ValueError as e:
        raise errors.EdgeError(f"identity file {identity} holds no cluster identity ({e})")
    return Client(addr, default_port=3025, ca_pem=ca_pem + "\n", cluster=own.cluster,
                  cert_file=str(identity), key_file=str(identity))


def _read_password(args) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        import getpass

        password = getpass.getpass("New password: ")
        if getpass.getpass("Repeat password: ") != password:
            raise errors.BadRequest("the passwords do not match")
    if not password:
        raise errors.BadRequest("empty password")
    return password


def main(argv=None) -> int:
    return cli.run(_main, argv)


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    client = _client(args)
    as_json = args.format == "json"
    out = sys.stdout
    if args.command == "status":
        status = client.get("/v1/status")
        if as_json:
            cli.print_json(status)
        else:
            out.write(f"Cluster:   {status['cluster_name']}\n")
            out.write(f"CA pin:    {status['ca_pin']}\n")
            for name, fp in sorted(status["fingerprints"].items()):
                out.write(f"{name + ':':<14} {fp}\n")
            if "web_ca" in status["fingerprints"]:
                out.write("(browsers trust the web port with web_ca: the proxy's "
                          "DATA_DIR/ca/web_ca.crt, also at https://PROXY:3080/v1/cluster/"
                          "web_ca.pem; compare the fingerprint)\n")
        return 0
    if args.command == "users":
        return _users(args, client, as_json)
    if args.command == "tokens":
        return _tokens(args, client, as_json)
    if args.command == "create":
        return _create(args, client, as_json)
    if args.command == "get":
        return _get(args, client, as_json)
    if args.command == "rm":
        kind, sep, name = args.target.partition("/")
        if not sep or not name:
            raise errors.BadRequest("rm takes KIND/NAME, e.g. role/dev")
        kind = KIND_ALIASES.get(kind, kind)
        if kind == "user":
            client.request("DELETE", f"/v1/users/{_quote(name)}")
        elif kind == "token":
            client.request("DELETE", f"/v1/tokens/{_quote(name)}")
        else:
            client.request("DELETE", f"/v1/resources/{_quote(kind)}/{_quote(name)}")
        out.write(f"{kind} {name} has been deleted\n")
        return 0
    if args.command == "lock":
        body = {"target": {"user": args.user} if args.user else {"node": args.node}}
        if args.ttl:
            body["ttl"] = args.ttl
        if args.message:
            body["message"] = args.message
        lock = client.post("/v1/locks", body)
        if as_json:
            cli.print_json(lock)
        else:
            out.write(f"{lock['id']}\n")
        return 0
    if args.command == "locks":
        if args.action == "rm":
            client.request("DELETE", f"/v1/locks/{_quote(args.lock_id)}")
            out.write(f"lock {args.lock_id} has been removed\n")
            return 0
        found = client.get("/v1/locks")
        if as_json:
            cli.print_json(found)
        else:
            cli.print_table(
                ["ID", "Target", "Expires", "Message"],
                [[l["id"], " ".join(f"{k}={v}" for k, v in l["target"].items()),
                  l.get("expires") or "never", l["message"]] for l in found])
        return 0
    if args.command == "apps":
        return _apps(args, client, as_json)
    if args.command == "audit":
        from edgeaccess.audit.cli import run_edgectl_audit

        return run_edgectl_audit(args, client, as_json)
    if args.command == "nodes":
        nodes = client.get("/v1/nodes")
        if as_json:
            cli.print_json(nodes)
        else:
            cli.print_table(["Name", "ID", "Address", "Labels", "Last heartbeat"], [
                [n["name"], n["uuid"], n["address"], cli.format_labels(n["labels"]),
                 n["last_heartbeat"]] for n in nodes])
        return 0
    raise errors.BadRequest(f"unknown command {args.command}")


def _apps(args, client, as_json) -> int:
    out = sys.stdout
    if args.action == "rotate-jwt-key":
        answer = client.post("/v1/apps/jwt_keys/rotate", {})
        if as_json:
            cli.print_json(answer)
            return 0
        out.write(f"App identities are now signed with key {answer['kid']}.\n"
                  "The retired key stays in /.well-known/jwks.json until "
                  + ", ".join(k["dropped_after"] for k in answer["keys"] if k["dropped_after"])
                  + "; every proxy follows within 5 seconds.\n")
        return 0
    keys = client.get("/v1/apps/jwt_keys")
    if as_json:
        cli.print_json(keys)
    else:
        cli.print_table(["Key id", "Status", "Retired", "Leaves the JWKS"],
                        [[k["kid"], k["status"], k["retired"] or "", k["dropped_after"] or ""]
                         for k in keys])
    return 0


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _users(args, client, as_json) -> int:
    out = sys.stdout
    if args.action == "add":
        roles = [r.strip() for r in args.roles.split(",") if r.strip()]
        logins = [l.strip() for l in args.logins.split(",") if l.strip()]
        result = client.post("/v1/users", {"name": args.name, "roles": roles, "logins": logins})
        web = _web_addr(args)
        url = f"https://{web}/web/signup/{result['signup_token']}"
        if as_json:
            cli.print_json({"name": args.name, "signup_url": url})
        else:
            out.write(f"User {args.name} has been created. Share this one-time link "
                      f"(valid 1 hour) to set the password:\n{url}\n"
                      f"or set it now: edgectl users set-password {args.name}\n")
    elif args.action == "set-password":
        client.request("PUT", f"/v1/users/{_quote(args.name)}/password",
                       {"password": _read_password(args)})
        out.write(f"Password of user {args.name} has been set\n")
    elif args.action == "ls":
        users = client.get("/v1/users")
        if as_json:
            cli.print_json(users)
        else:
            cli.print_table(["User", "Roles", "Logins", "Password", "Locked"], [
                [u["name"], ",".join(u["roles"]), ",".join(u["logins"]),
                 "set" if u["has_password"] else "not set", "yes" if u["locked"] else "no"]
                for u in users])
    elif args.action == "rm":
        client.request("DELETE", f"/v1/users/{_quote(args.name)}")
        out.write(f"User {args.name} has been deleted\n")
    return 0


def _web_addr(args) -> str:
    if args.data_dir:
        try:
            runtime = json.loads((Path(args.data_dir) / "runtime.json").read_text())
            return runtime["addresses"]["web"]
        except (OSError, KeyError, ValueError):
            pass
    return "PROXY:3080"


def _tokens(args, client, as_json) -> int:
    out = sys.stdout
    if args.action == "add":
        record = client.post("/v1/tokens", {"type": args.type, "ttl": args.ttl})
        status = client.get("/v1/status")
        if as_json:
            cli.print_json(record)
            return 0
        out.write(f"The {args.type} token: {record['token']}\n"
                  f"It expires at {record['expires']}.\n\n")
        if args.type == "node":
            auth = client.host if ":" not in client.host else f"[{client.host}]"
            out.write(
                "Run this on the new node to join the cluster:\n\n"
                f"  twistd -n edgenode --data-dir /var/lib/edgenode --nodename NAME \\\n"
                f"    --auth-server {auth}:{client.port} --token {record['token']} \\\n"
                f"    --ca-pin {status['ca_pin']}\n\n"
                "For a node behind NAT, give the proxy's web address (port 3080) as "
                "--auth-server instead.\n")
        else:
            out.write(f"Use it in the trusted_cluster resource on the leaf, with "
                      f"ca_pin: {status['ca_pin']}\n")
    elif args.action == "ls":
        tokens = client.get("/v1/tokens")
        if as_json:
            cli.print_json(tokens)
        else:
            cli.print_table(["Token", "Type", "Expires"],
                            [[t["token"], t["type"], t["expires"]] for t in tokens])
    elif args.action == "rm":
        client.request("DELETE", f"/v1/tokens/{_quote(args.token)}")
        out.write("Token has been deleted\n")
    return 0


def _create(args, client, as_json) -> int:
    from edgeaccess.identity import kinds, resources  # noqa: F401

    if args.filename == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(args.filename).read_text()
        except FileNotFoundError:
            raise errors.BadRequest(f"file {args.filename} not found")
    docs = resources.parse_documents(text)
    if not docs:
        raise errors.BadResource(f"{args.filename} holds no resource")
    for doc in docs:
        resources.parse_resource(doc)  # validate all before sending any
    for doc in docs:
        result = client.post("/v1/resources", {"resource": doc, "force": args.force})
        sys.stdout.write(f"{result['kind']} {result['name']} has been "
                         f"{'created or replaced' if args.force else 'created'}\n")
    return 0


def _get(args, client, as_json) -> int:
    from edgeaccess.identity import resources

    kind = KIND_ALIASES.get(args.kind)
    if kind is None:
        raise errors.BadRequest(
            f"unknown kind {args.kind!r} (known: roles, users, connectors, trusted_clusters)")
    if kind == "user":
        users = client.get("/v1/users")
        if args.name:
            users = [u for u in users if u["name"] == args.name]
            if not users:
                raise errors.NotFound(f"user {args.name} not found")
        if as_json:
            cli.print_json(users)
        else:
            cli.print_table(["User", "Roles", "Logins"],
                            [[u["name"], ",".join(u["roles"]), ",".join(u["logins"])]
                             for u in users])
        return 0
    if kind == "token":
        return _tokens(argparse.Namespace(action="ls"), client, as_json)
    path = f"/v1/resources/{kind}" + (f"/{_quote(args.name)}" if args.name else "")
    docs = client.get(path)
    if as_json:
        cli.print_json(docs)
    else:
        sys.stdout.write(resources.dump_documents(docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
