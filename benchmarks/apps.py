"""``python -m benchmarks apps``: web app access against the app itself and a C path.

The app is an ``nginx`` serving ``/small`` (3 bytes) and a 256 MiB file. Three
routes to it, measured in one run:

- ``direct``: the app's own port;
- ``edge``: the proxy's web port (TLS with the app certificate, SNI
  ``bench.edge.localhost``) -> reverse tunnel -> a tunnelled node -> the app;
- ``c-path``: ``nginx`` as TLS reverse proxy (client certificate required,
  keep-alive upstream) -> a ``stunnel4`` client/server pair (TLS 1.3, mutual
  certificates: the tunnel's stand-in) -> the app.

``wrk`` cannot present client certificates, so on both TLS routes it talks
plain HTTP to a local ``stunnel4`` client that opens the TLS connection with
the app certificate (the same extra hop on both). Request rate and latency
come from ``wrk --latency`` (``-c 1``: latency; ``-c 16``: rate); the download
from ``curl`` (its own TLS, app certificate). One JSON line per result.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from benchmarks._tunnel_env import MIB, cpu_seconds, emit, free_port, wait_port
from edgeaccess.devcluster import ProxyProcess, join_node, run_edge, stop_process

PUBLIC_HOST = "edge.localhost"
APP = "bench"


def _nginx(directory: Path, name: str, server: str) -> subprocess.Popen:
    conf = directory / f"{name}.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {directory / name}.pid;
error_log {directory / name}.error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  client_body_temp_path {directory}/{name}-body;
  proxy_temp_path {directory}/{name}-proxy;
  fastcgi_temp_path {directory}/{name}-fcgi;
  uwsgi_temp_path {directory}/{name}-uwsgi;
  scgi_temp_path {directory}/{name}-scgi;
  {server}
}}
""")
    return subprocess.Popen(["nginx", "-c", str(conf), "-p", str(directory)],
                            stderr=open(directory / f"{name}.log", "wb"))


def _stunnel(directory: Path, name: str, lines: list[str]) -> subprocess.Popen:
    conf = directory / f"{name}.conf"
    conf.write_text("\n".join(["foreground = yes", "pid =", "debug = 3",
                               "sslVersionMin = TLSv1.3", *lines, ""]))
    return subprocess.Popen(["stunnel4", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=open(directory / f"{name}.log", "wb"))


def _identity(proxy: ProxyProcess, directory: Path, label: str, identity, names=()) -> Path:
    from edgeaccess.pki import keys, x509ca

    authority = proxy.authority()
    ca_key, ca_cert = authority.tls_ca_key, authority.tls_ca_cert
    key = keys.generate_private_key()
    cert = x509ca.issue_identity_certificate(
        ca_key, ca_cert, key.public_key(), identity, now=datetime.now(timezone.utc),
        ttl=timedelta(hours=6), dns_names=names)
    keys.write_secret(directory / f"{label}.key", keys.private_key_pem(key))
    keys.write_public(directory / f"{label}.crt", x509ca.certificate_pem(cert))
    return directory / label


def _wrk(url: str, connections: int, seconds: int, host: str) -> dict:
    result = subprocess.run(["wrk", "--latency", "-t", "1", "-c", str(connections), "-d",
                             f"{seconds}s", "-H", f"Host: {host}", url],
                            capture_output=True, text=True,
                            timeout=seconds + 60)
    out = result.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    if rate is None or p50 is None:
        raise RuntimeError(f"wrk failed: {out} {result.stderr}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p50.group(2)]
    return {"requests_per_s": float(rate.group(1)), "p50_ms": float(p50.group(1)) * scale,
            "non_2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else ""}


def _download(url: str, extra: list[str]) -> float:
    result = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{speed_download}",
                             *extra, url], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"curl {url} failed: {result.stderr}")
    return float(result.stdout) / MIB


def _edge_cluster(base: Path, label: str, app_port: int, tree: str | None,
                  extra_args: tuple = ()) -> dict:
    """A proxy, a tunnelled node publishing the app and a logged-in user (the
    daemons run ``tree`` when given: put first on their PYTHONPATH)."""
    saved = os.environ.get("PYTHONPATH")
    if tree:
        os.environ["PYTHONPATH"] = tree + (os.pathsep + saved if saved else "")
    world: dict = {"node": None}
    try:
        proxy = world["proxy"] = ProxyProcess(
            base / f"{label}-proxy", base / f"{label}-proxy.log", cluster="bench",
            extra_args=["--public-addr", PUBLIC_HOST, "--tunnel-public-addr", "127.0.0.1",
                        *extra_args])
        proxy.start()
        web = world["web"] = proxy.runtime()["listen"]["web"]
        world["node"], _ = join_node(proxy, base / label, "appnode", tunnel=True,
                                     auth_server=web,
                                     extra_args=["--heartbeat-interval", "30", "--app",
                                                 f"name={APP},uri=http://127.0.0.1:{app_port}"])
        password = "bench-apps-password-1"
        proxy.add_user("bench", password, roles=("access",))
        home = base / f"{label}-home"
        for command in (["login", "--proxy", web, "--user", "bench", "--password-stdin",
                         "--ca-pin", proxy.pin()], ["apps", "login", APP]):
            result = run_edge(home, *command, input=password + "\n")
            if result.returncode != 0:
                raise RuntimeError(f"edge {command[0]} failed: {result.stderr}")
        world["config"] = json.loads(
            run_edge(home, "apps", "config", APP, "--format", "json").stdout)
        world["ca"] = str(proxy.data_dir / "ca" / "tls_ca.crt")
        return world
    except BaseException:
        _stop_cluster(world)
        raise
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def _stop_cluster(world: dict) -> None:
    if world.get("node") is not None:
        world["node"].stop()
    if world.get("proxy") is not None:
        world["proxy"].stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks apps")
    parser.add_argument("--seconds", type=int, default=8, help="wrk duration per run")
    parser.add_argument("--download", default=256, type=int, help="MiB to download")
    parser.add_argument("--only", choices=("direct", "edge", "c-path", "baseline"),
                        action="append",
                        help="measure only these routes (repeatable; default: all)")
    parser.add_argument("--baseline-tree", metavar="DIR",
                        help="also measure a second proxy and node running the source tree "
                             "DIR (route `baseline`), in the same run")
    parser.add_argument("--profile", metavar="DIR",
                        help="record py-spy profiles of the proxy and node during the edge "
                             "rate run into DIR (py-spy on PATH or beside python)")
    parser.add_argument("--request-audit", action="store_true",
                        help="the proxy audits every app request (--app-request-audit '*')")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-apps-") as tmp:
        base = Path(tmp)
        os.chmod(base, 0o755)  # nginx's workers read the app's files
        processes: list[subprocess.Popen] = []
        clusters: dict[str, dict] = {}
        try:
            www = base / "www"
            www.mkdir()
            with open(www / "big.bin", "wb") as f:
                f.truncate(args.download * MIB)
            app_port = free_port()
            processes.append(_nginx(base, "app", f"""
  server {{ listen 127.0.0.1:{app_port}; root {www};
           location = /small {{ return 200 "ok\\n"; }} }}"""))
            wait_port(app_port, 10, "app nginx", processes[-1])
            proxy_args = ("--app-request-audit", "*") if args.request_audit else ()
            clusters["edge"] = _edge_cluster(base, "edge", app_port, None, proxy_args)
            if args.baseline_tree:
                clusters["baseline"] = _edge_cluster(base, "baseline", app_port,
                                                     args.baseline_tree, proxy_args)
            proxy, config, ca = (clusters["edge"][k] for k in ("proxy", "config", "ca"))

            from edgeaccess.pki import x509ca

            server = _identity(proxy, base, "cpath-server",
                               x509ca.Identity(kind="proxy", name="cpath", cluster="bench"),
                               (f"{APP}.{PUBLIC_HOST}", "localhost"))
            tunnel_server = _identity(proxy, base, "tunnel-server",
                                      x509ca.Identity(kind="proxy", name="t", cluster="bench"),
                                      ("localhost",))
            tunnel_client = _identity(proxy, base, "tunnel-client",
                                      x509ca.Identity(kind="node", name="t", cluster="bench",
                                                      uuid="t"))
            # The C path: nginx TLS reverse proxy -> stunnel client -> stunnel server -> app.
            s_server, s_client, c_nginx = free_port(), free_port(), free_port()
            processes.append(_stunnel(base, "tunnel-server", [
                f"CAfile = {ca}", "verifyChain = yes", "[t]", f"accept = 127.0.0.1:{s_server}",
                f"connect = 127.0.0.1:{app_port}", f"cert = {tunnel_server}.crt",
                f"key = {tunnel_server}.key"]))
            processes.append(_stunnel(base, "tunnel-client", [
                f"CAfile = {ca}", "verifyChain = yes", "[t]", "client = yes",
                f"accept = 127.0.0.1:{s_client}", f"connect = 127.0.0.1:{s_server}",
                f"cert = {tunnel_client}.crt", f"key = {tunnel_client}.key"]))
            processes.append(_nginx(base, "cpath", f"""
  upstream tunnel {{ server 127.0.0.1:{s_client}; keepalive 64; }}
  server {{ listen 127.0.0.1:{c_nginx} ssl;
           ssl_protocols TLSv1.3;
           ssl_certificate {server}.crt; ssl_certificate_key {server}.key;
           ssl_client_certificate {ca}; ssl_verify_client on;
           location / {{ proxy_pass http://tunnel; proxy_http_version 1.1;
                        proxy_set_header Connection ""; proxy_buffering off; }} }}"""))
            # wrk speaks plain HTTP to a stunnel client holding the app certificate.
            targets = {"c-path": (c_nginx, config, ca)}
            for name, cluster in clusters.items():
                targets[name] = (int(cluster["web"].rpartition(":")[2]), cluster["config"],
                                 cluster["ca"])
            fronts = {}
            for name, (target, front_config, front_ca) in targets.items():
                port = free_port()
                processes.append(_stunnel(base, f"front-{name}", [
                    f"CAfile = {front_ca}", "verifyChain = yes",
                    f"checkHost = {APP}.{PUBLIC_HOST}", "[f]", "client = yes",
                    f"accept = 127.0.0.1:{port}", f"connect = 127.0.0.1:{target}",
                    f"sni = {APP}.{PUBLIC_HOST}", f"cert = {front_config['cert']}",
                    f"key = {front_config['key']}"]))
                fronts[name] = port
            for port in (s_server, s_client, c_nginx, *fronts.values()):
                wait_port(port, 10, f"port {port}")
            urls = {"direct": f"http://127.0.0.1:{app_port}",
                    **{name: f"http://127.0.0.1:{port}" for name, port in fronts.items()}}
            # The Host the app host's users send (the proxy refuses any other).
            hosts = {name: f"{APP}.{PUBLIC_HOST}:{targets[name][0]}" for name in clusters}
            hosts["direct"] = hosts["c-path"] = hosts["edge"]
            # Warm up every route (connections, JWT signing, caches).
            for name, url in urls.items():
                _wrk(url + "/small", 4, 1, hosts[name])
            results: dict[str, dict] = {name: {} for name in urls}
            for name, url in urls.items():
                if args.only and name not in args.only:
                    continue
                latency = _wrk(url + "/small", 1, args.seconds, hosts[name])
                cluster = clusters.get(name)
                pids = {} if cluster is None else {
                    "proxy": cluster["proxy"].process.pid, "node": cluster["node"].process.pid}
                spies = []
                if args.profile and name == "edge":
                    spies = [subprocess.Popen(
                        [shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
                         "record", "-r", "250", "-d", str(args.seconds), "-f", "raw",
                         "-o", str(Path(args.profile) / f"apps-{who}.txt"), "-p", str(pid)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        for who, pid in pids.items()]
                before = {who: cpu_seconds(pid) for who, pid in pids.items()}
                rate = _wrk(url + "/small", 16, args.seconds, hosts[name])
                for spy in spies:
                    spy.wait()
                used = {who: cpu_seconds(pid) - before[who] for who, pid in pids.items()}
                requests = rate["requests_per_s"] * args.seconds
                results[name] = {"p50_ms": latency["p50_ms"],
                                 "requests_per_s": rate["requests_per_s"],
                                 "errors": latency["non_2xx"] + rate["non_2xx"],
                                 "socket_errors": rate["socket_errors"]}
                for who in used:
                    results[name][f"{who}_cpu_us_per_request"] = round(
                        used[who] / requests * 1e6, 1)
            curl_tls = ["--cacert", ca, "--cert", config["cert"], "--key", config["key"]]
            downloads = {"direct": (f"http://127.0.0.1:{app_port}/big.bin", []),
                         "c-path": (f"https://{APP}.{PUBLIC_HOST}:{c_nginx}/big.bin", curl_tls)}
            for name, cluster in clusters.items():
                own = cluster["config"]
                downloads[name] = (f"{own['url']}/big.bin",
                                   ["--cacert", cluster["ca"], "--cert", own["cert"], "--key",
                                    own["key"]])
            for name, (url, extra) in downloads.items():
                if not args.only or name in args.only:
                    results[name]["download_mib_s"] = _download(url, extra)
            for name, result in results.items():
                emit({"benchmark": "apps", "path": name, **result,
                      **({"request_audit": True} if args.request_audit and name in clusters
                         else {})})
            emit({"benchmark": "apps", "loadavg": os.getloadavg()})
            if args.only:
                return 0
            direct, cpath = results["direct"], results["c-path"]
            for name in clusters:
                edge = results[name]
                emit({"benchmark": "apps", "summary": True, "path": name,
                      "edge_added_p50_ms": round(edge["p50_ms"] - direct["p50_ms"], 3),
                      "c_path_added_p50_ms": round(cpath["p50_ms"] - direct["p50_ms"], 3),
                      "edge_rate_vs_c_path": round(edge["requests_per_s"]
                                                   / cpath["requests_per_s"], 3),
                      "edge_download_mib_s": round(edge["download_mib_s"], 1),
                      "goals": {"added_p50_ms": "<= 1", "rate_vs_c_path": ">= 0.7",
                                "download_mib_s": ">= 150"}})
        finally:
            for process in reversed(processes):
                stop_process(process)
            for cluster in clusters.values():
                _stop_cluster(cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
