"""Test servers that run as scripts of their own (a real process each).

The script listens on an ephemeral 127.0.0.1 port and prints ``PORT N``
(:func:`serve_on_ephemeral_port`); the test starts it and reads that line
(:func:`start_script`), then stops it with ``devcluster.stop_process``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from edgeaccess.devcluster import stop_process

REPO = Path(__file__).resolve().parent.parent


def start_script(script: Path, config: Path, what: str,
                 log: Callable[[], str] = lambda: "") -> tuple[subprocess.Popen, int]:
    """Run ``script config`` and return the process and the port it printed."""
    process = subprocess.Popen([sys.executable, str(script), str(config)],
                               stdout=subprocess.PIPE,
                               env=dict(os.environ, PYTHONPATH=str(REPO)))
    line = process.stdout.readline().decode()  # blocks until listening
    if not line.startswith("PORT "):
        stop_process(process)
        raise RuntimeError(f"{what} did not start: {line!r} {log()}")
    return process, int(line.split()[1])


def serve_on_ephemeral_port(reactor, factory) -> None:
    """In a server script: listen on 127.0.0.1:0, print ``PORT N``, run the reactor."""
    from twisted.internet.endpoints import TCP4ServerEndpoint

    def listening(port) -> None:
        sys.stdout.write(f"PORT {port.getHost().port}\n")
        sys.stdout.flush()

    TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory).addCallbacks(
        listening, lambda f: (print(f, file=sys.stderr), reactor.stop())
    )
    reactor.run()
