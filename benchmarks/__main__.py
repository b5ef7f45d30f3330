"""``python -m benchmarks <scenario> [options]``: run one benchmark scenario."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    """Dispatch to a scenario module's ``main(argv)``."""
    scenarios = {"ssh": "benchmarks.ssh_throughput", "audit": "benchmarks.audit_ingest"}
    scenarios["audit-session"] = "benchmarks.audit_session_start"  # docs/performance.md
    scenarios["audit-spool"] = "benchmarks.audit_spool"  # docs/performance.md
    scenarios["cluster-client"] = "benchmarks.cluster_client"  # docs/performance.md
    scenarios["fuzz"] = "benchmarks.fuzz"  # docs/security.md "Fuzzing"
    scenarios["kube"] = "benchmarks.kube"  # docs/performance.md "Kubernetes access"
    scenarios["apps"] = "benchmarks.apps"  # docs/performance.md "Web applications"
    scenarios["lan-agents"] = "benchmarks.lan_agents"  # docs/performance.md "LAN agents"
    scenarios["lan-resume"] = "benchmarks.lan_resume"  # docs/performance.md "LAN nodes: SSH ..."
    scenarios.update({  # reverse tunnel (docs/performance.md "Reverse tunnel")
        "tunnel-throughput": "benchmarks.tunnel_throughput",
        "tunnel-latency": "benchmarks.tunnel_latency",
        "tunnel-idle": "benchmarks.tunnel_idle",
        "tunnel-storm": "benchmarks.tunnel_storm",
    })
    scenarios["control-plane"] = "benchmarks.control_plane"  # docs/performance.md
    scenarios["webui"] = "benchmarks.webui"  # docs/performance.md "Web UI"
    scenarios["links"] = "benchmarks.links"  # docs/performance.md "Unstable links"
    scenarios["links-resume"] = "benchmarks.resume_memory"  # docs/performance.md "Resumable channels"
    scenarios["backend-postgres"] = "benchmarks.backend_postgres"  # docs/performance.md
    scenarios["ha"] = "benchmarks.ha"  # docs/performance.md "Several proxies"
    scenarios["ha-state"] = "benchmarks.ha_state"  # docs/performance.md "Several proxies"
    scenarios["tls-route-start"] = "benchmarks.tls_route_start"  # docs/performance.md
    if not argv or argv[0] not in scenarios:
        print(f"usage: python -m benchmarks {{{','.join(scenarios)}}} [options]", file=sys.stderr)
        return 2
    module = __import__(scenarios[argv[0]], fromlist=["main"])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
