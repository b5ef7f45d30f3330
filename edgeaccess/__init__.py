"""edgeaccess: secure access to servers, Kubernetes clusters and web apps behind NAT."""

__version__ = "0.1.0"
