"""``edge apps``: list apps, get an app certificate, print how to use it, log out.

An app's files live in ``$EDGE_HOME/apps/CLUSTER/APP/`` (``tls.key``,
``tls.crt``, ``app.json``); the CA is the profile's ``ca.pem``.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from edgeaccess import cli, errors
from edgeaccess.apps.spec import check_app_name
from edgeaccess.pki import keys


def add_edge_apps(sub) -> None:
    """Register ``edge apps`` on the ``edge`` parser's subcommands."""
    apps = sub.add_parser("apps", help="web applications: ls, login, config, logout")
    commands = apps.add_subparsers(dest="apps_command", required=True, metavar="COMMAND")
    ls = commands.add_parser("ls", help="list the apps you may reach")
    ls.add_argument("--cluster", help="a leaf cluster (default: the one logged in to)")
    ls.add_argument("--format", choices=("text", "json"), default="text")
    login = commands.add_parser("login", help="get a certificate for one app")
    login.add_argument("app")
    login.add_argument("--cluster", help="the app's leaf cluster")
    login.add_argument("--ttl", help="app session lifetime, e.g. 1h (default and most: "
                                     "your login's, at most 12h)")
    config = commands.add_parser("config", help="how to reach an app you logged in to")
    config.add_argument("app")
    config.add_argument("--cluster", help="the app's leaf cluster")
    config.add_argument("--format", choices=("text", "json", "uri", "curl"), default="text")
    logout = commands.add_parser("logout", help="end app sessions (all, or one app's)")
    logout.add_argument("app", nargs="?")
    logout.add_argument("--cluster", help="the app's leaf cluster")


def app_dir(home: Path, cluster: str, app: str) -> Path:
    return home / "apps" / cluster / app


def run_edge_apps(args, home: Path, profile, client) -> int:
    cluster = args.cluster or profile.cluster
    command = args.apps_command
    if command == "ls":
        path = "/v1/apps" if cluster == profile.cluster else f"/v1/clusters/{cluster}/apps"
        apps = client.get(path)
        if args.format == "json":
            cli.print_json(apps)
        else:
            cli.print_table(["Application", "Public address", "Labels"], [
                [a["name"], a["public_addr"], cli.format_labels(a.get("labels") or {})]
                for a in apps])
        return 0
    if command == "login":
        return _login(args, home, profile, client, cluster)
    if command == "config":
        return _config(args, home, cluster)
    if command == "logout":
        body = {} if args.app is None else {"app": check_app_name(args.app)}
        answer = client.post("/v1/apps/logout", body)
        base = home / "apps"
        targets = [app_dir(home, cluster, args.app)] if args.app else \
            ([p for c in base.iterdir() for p in c.iterdir()] if base.exists() else [])
        for target in targets:
            shutil.rmtree(target, ignore_errors=True)
        ended = answer.get("ended") or []
        sys.stdout.write(f"Ended {len(ended)} app session(s)"
                         + (f": {', '.join(ended)}" if ended else "") + ".\n")
        return 0
    raise errors.BadRequest(f"unknown command apps {command}")


def _login(args, home: Path, profile, client, cluster: str) -> int:
    name = check_app_name(args.app)
    key = keys.generate_private_key()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    body = {"app": name, "cluster": cluster, "tls_public_key": public}
    if args.ttl:
        body["ttl"] = args.ttl
    answer = client.post("/v1/apps/login", body)
    directory = app_dir(home, cluster, name)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys.write_secret(directory / "tls.key", keys.private_key_pem(key))
    keys.write_public(directory / "tls.crt", answer["certificate"].encode("ascii"))
    info = {"app": name, "cluster": cluster, "url": answer["url"],
            "session_id": answer["session_id"], "valid_before": answer["valid_before"]}
    keys.write_public(directory / "app.json", json.dumps(info, indent=2).encode() + b"\n")
    sys.stdout.write(
        f"Logged in to app {name} (cluster {cluster}): {answer['url']}\n"
        f"Valid until {answer['valid_before']}\n"
        f"Try: {_curl(home, directory, answer['url'])}\n")
    return 0


def _files(home: Path, cluster: str, app: str) -> tuple[dict, Path]:
    directory = app_dir(home, cluster, check_app_name(app))
    try:
        info = json.loads((directory / "app.json").read_text())
    except (FileNotFoundError, ValueError):
        raise errors.NotFound(f"not logged in to app {app} of cluster {cluster}; run "
                              f"edge apps login {app}") from None
    return info, directory


def _curl(home: Path, directory: Path, url: str) -> str:
    return shlex.join(["curl", "--cacert", str(home / "ca.pem"), "--cert",
                       str(directory / "tls.crt"), "--key", str(directory / "tls.key"), url])


def _config(args, home: Path, cluster: str) -> int:
    info, directory = _files(home, cluster, args.app)
    result = {"name": info["app"], "cluster": info["cluster"], "url": info["url"],
              "ca": str(home / "ca.pem"), "cert": str(directory / "tls.crt"),
              "key": str(directory / "tls.key"), "valid_before": info["valid_before"]}
    if args.format == "json":
        cli.print_json(result)
    elif args.format == "uri":
        sys.stdout.write(result["url"] + "\n")
    elif args.format == "curl":
        sys.stdout.write(_curl(home, directory, result["url"]) + "\n")
    else:
        sys.stdout.write(
            f"Name:      {result['name']}\nCluster:   {result['cluster']}\n"
            f"URL:       {result['url']}\nCA:        {result['ca']}\n"
            f"Cert:      {result['cert']}\nKey:       {result['key']}\n"
            f"Valid:     until {result['valid_before']}\n")
    return 0
