"""Shared pieces of the daemons' command lines: listen addresses, config files."""

from __future__ import annotations

import yaml
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.python import usage

from edgeaccess.httpclient import split_addr


def listen_endpoint(reactor, addr: str, default_port: int, tls_options=None,
                    backlog: int = 50):
    """A server endpoint for ``HOST:PORT`` (``:PORT``, ``PORT`` or ``HOST``).

    :param backlog: the kernel's queue of connections not yet accepted; the
        tunnel port wants a large one, or a reconnect storm of thousands of
        agents loses SYNs and sends agents into long backoffs.
    """
    addr = addr.strip()
    if addr.isdigit():
        addr = f"0.0.0.0:{addr}"
    elif addr.startswith(":"):
        addr = "0.0.0.0" + addr
    host, port = split_addr(addr, default_port)
    if tls_options is not None:
        return SSL4ServerEndpoint(reactor, port, tls_options, backlog=backlog, interface=host)
    if ":" in host:
        return TCP6ServerEndpoint(reactor, port, backlog=backlog, interface=host)
    return TCP4ServerEndpoint(reactor, port, backlog=backlog, interface=host)


def apply_config_file(options: usage.Options, path: str, keys) -> None:
    """Fill options not given on the command line from a YAML file whose
    keys are the long option names (``data-dir`` or ``data_dir``)."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise usage.UsageError(f"cannot read --config {path}: {e.strerror}")
    except yaml.YAMLError as e:
        raise usage.UsageError(f"--config {path} is not valid YAML: {e}")
    if not isinstance(data, dict):
        raise usage.UsageError(f"--config {path} must be a mapping of option: value")
    for raw_key, value in data.items():
        key = str(raw_key).replace("_", "-")
        if key not in keys:
            raise usage.UsageError(f"--config {path}: unknown option {raw_key!r}")
        if options.get(key) in (None, options.defaults.get(key)):
            options[key] = value if not isinstance(value, (list, dict)) else value


def parse_seconds(value: object, option: str, low: float = 0.0, high: float = 86400.0) -> float:
    """Seconds from ``60``, ``60s``, ``2m`` or ``1.5`` (an option's value).

    :raises usage.UsageError: naming ``--option`` unless it is a duration
        between ``low`` and ``high`` seconds.
    """
    text = str(value).strip().lower()
    scale = 1.0
    if text.endswith("m"):
        text, scale = text[:-1], 60.0
    elif text.endswith("s"):
        text = text[:-1]
    try:
        seconds = float(text) * scale
    except ValueError:
        raise usage.UsageError(f"--{option} must be a duration such as 60s or 2m") from None
    if not low <= seconds <= high:  # also refuses nan
        raise usage.UsageError(f"--{option} must be between {low:g}s and {high:g}s")
    return seconds
