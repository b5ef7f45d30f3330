"""Start of the TLS-routing ``ProxyCommand`` (``edgeaccess/client/tlsroute.py``).

``python -m benchmarks tls-route-start [--runs 60] [--script PATH]``

ssh waits for the ``ProxyCommand`` at every connection. One run is the whole
life of the command as ssh starts it (``python -I -S tlsroute.py ...``):
interpreter start, imports, TCP connect, mutual TLS 1.3 handshake with the
proxy checks, one 8-byte round trip, exit. Against a standard-library TLS
server on 127.0.0.1 (in a thread of this process), the variants run
interleaved in one session so machine load hits them alike:

- ``interpreter``: ``python -I -S -c pass`` (the floor);
- ``fast``: the command as ``edge`` writes it (CPython's ``_ssl``/``_socket``:
  the ``cpython-tls-route`` reach of :mod:`edgeaccess.internals`);
- ``stock``: with ``--stock`` (``ssl`` and ``socket``: the reach's fallback);
- ``script``: ``--script PATH`` (e.g. an older tlsroute.py), if given.

Prints one JSON object: median and p90 wall milliseconds and the median CPU
milliseconds (user + system, less sensitive to a loaded machine) of each
variant.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from edgeaccess.client import tlsroute
from edgeaccess.pki.keys import generate_private_key, private_key_pem
from edgeaccess.pki.x509ca import (Identity, certificate_pem, create_ca,
                                   issue_identity_certificate)

ALPN = "edge-ssh/1"
PAYLOAD = b"SSH-2.0\n"


def _pki(directory: Path) -> dict[str, str]:
    import ipaddress
    from datetime import datetime, timedelta, timezone

    now = datetime.now(timezone.utc)
    ca_key, ca_cert = create_ca("root", now)
    paths = {"ca": directory / "ca.pem"}
    paths["ca"].write_bytes(certificate_pem(ca_cert))
    for label, identity, ips in (
            ("proxy", Identity(kind="proxy", name="proxy.bench", cluster="root"), ["127.0.0.1"]),
            ("user", Identity(kind="user", name="bench", cluster="root"), [])):
        key = generate_private_key()
        cert = issue_identity_certificate(
            ca_key, ca_cert, key.public_key(), identity, now=now, ttl=timedelta(hours=1),
            dns_names=(), ip_addresses=[ipaddress.ip_address(ip) for ip in ips])
        paths[f"{label}_key"] = directory / f"{label}.key"
        paths[f"{label}_cert"] = directory / f"{label}.crt"
        paths[f"{label}_key"].write_bytes(private_key_pem(key))
        paths[f"{label}_cert"].write_bytes(certificate_pem(cert))
    return {name: str(path) for name, path in paths.items()}


def _serve(listener: socket.socket, context: ssl.SSLContext) -> None:
    """Echo one read per connection, then close (the proxy ends the stream)."""
    while True:
        try:
            raw, _ = listener.accept()
        except OSError:
            return
        try:
            with context.wrap_socket(raw, server_side=True) as conn:
                conn.sendall(conn.recv(1024))
        except (OSError, ssl.SSLError):
            pass


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks tls-route-start")
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--script", help="another tlsroute.py to compare (e.g. main's)")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        pki = _pki(Path(directory))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(pki["proxy_cert"], pki["proxy_key"])
        context.load_verify_locations(cafile=pki["ca"])
        context.verify_mode = ssl.CERT_REQUIRED
        context.set_alpn_protocols([ALPN])
        listener = socket.create_server(("127.0.0.1", 0), backlog=16)
        threading.Thread(target=_serve, args=(listener, context), daemon=True).start()
        arguments = ["--ca", pki["ca"], "--cert", pki["user_cert"], "--key", pki["user_key"],
                     "--verify-host", "127.0.0.1", "--alpn", ALPN, "--cluster", "root",
                     "--servername", "node.root",
                     "--connect", f"127.0.0.1:{listener.getsockname()[1]}"]
        python = [sys.executable, "-I", "-S"]
        variants = {"interpreter": python + ["-c", "pass"],
                    "fast": python + [tlsroute.__file__] + arguments,
                    "stock": python + [tlsroute.__file__] + arguments + ["--stock"]}
        if options.script:
            variants["script"] = python + [options.script] + arguments
        times: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(options.runs):
            for name, command in variants.items():
                used = _children_cpu()
                started = time.perf_counter()
                result = subprocess.run(command, input=PAYLOAD, capture_output=True,
                                        timeout=60)
                times[name].append((time.perf_counter() - started) * 1000)
                cpu[name].append((_children_cpu() - used) * 1000)
                if name != "interpreter" and (result.returncode, result.stdout) != (0, PAYLOAD):
                    print(f"{name} failed: {result.stderr.decode()}", file=sys.stderr)
                    return 1
        listener.close()
    print(json.dumps({name: {"median_ms": round(statistics.median(values), 1),
                             "p90_ms": round(sorted(values)[int(len(values) * 0.9)], 1),
                             "cpu_median_ms": round(statistics.median(cpu[name]), 1)}
                      for name, values in times.items()}, indent=1))
    return 0
