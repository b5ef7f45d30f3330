"""Node-to-auth calls: the blocking client (a TLS handshake per call) against
the persistent :class:`~edgeaccess.clusterclient.ClusterClient`.

``python -m benchmarks cluster-client [--calls N]`` starts a real proxy
(temp dir, ephemeral ports), joins a node, then makes ``N`` role fetches
(``GET /v1/nodes/roles`` with the node's certificate, what every heartbeat
does) each way, one after the other, and prints one JSON object per way:
calls per second and the client process's CPU seconds per call.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks cluster-client")
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args(argv)

    from edgeaccess.devcluster import ProxyProcess, join_node
    from edgeaccess.httpclient import Client
    from edgeaccess.pki import keys, x509ca

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        proxy = ProxyProcess(base / "proxy", base / "proxy.log", cluster="bench").start()
        try:
            node, _ = join_node(proxy, base, "n1")
            node.stop()
            data = node.data_dir
            addr = proxy.addr("auth")
            ca_pem = (data / "ca.pem").read_text()

            blocking = Client(addr, default_port=3025, ca_pem=ca_pem, cluster="bench",
                              cert_file=str(data / "tls.crt"), key_file=str(data / "tls.key"))
            blocking.get("/v1/nodes/roles")
            started, cpu = time.perf_counter(), _cpu()
            for _ in range(args.calls):
                blocking.get("/v1/nodes/roles")
            results = [{"client": "blocking (handshake per call)",
                        "calls_per_s": args.calls / (time.perf_counter() - started),
                        "client_cpu_ms_per_call": 1000 * (_cpu() - cpu) / args.calls}]

            from twisted.internet import defer, task

            from edgeaccess import clusterclient

            key = keys.load_private_key((data / "tls.key").read_bytes())
            cert = x509ca.load_certificate_pem((data / "tls.crt").read_bytes())

            async def persistent(reactor):
                client = clusterclient.connect(
                    reactor, addr, ca_certs=x509ca.load_certificates_pem(ca_pem.encode()),
                    cluster="bench", credentials=lambda: (key, cert))
                await client.get_json("/v1/nodes/roles")
                started, cpu = time.perf_counter(), _cpu()
                for _ in range(args.calls):
                    await client.get_json("/v1/nodes/roles")
                results.append({"client": "ClusterClient (persistent pool)",
                                "calls_per_s": args.calls / (time.perf_counter() - started),
                                "client_cpu_ms_per_call": 1000 * (_cpu() - cpu) / args.calls})
                await client.close()

            task.react(lambda reactor: defer.Deferred.fromCoroutine(persistent(reactor)))
        except SystemExit:
            pass
        finally:
            proxy.stop()
    for result in results:
        print(json.dumps({"benchmark": "cluster-client", "calls": args.calls,
                          **{k: round(v, 2) if isinstance(v, float) else v
                             for k, v in result.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
