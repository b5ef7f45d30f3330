"""edgeaccess.devcluster: the daemons it starts die with whoever started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The intermediate parent: starts a long sleeper the way devcluster starts
#: twistd (``_Process._spawn``) from a thread that then ends (as a test's
#: thread pool does), prints its pid once that thread is gone, then waits to
#: be killed.
PARENT = """
import os, sys, threading, time
from pathlib import Path
from edgeaccess.devcluster import _Process
child = _Process(Path(sys.argv[1]), Path(sys.argv[1]) / "child.log")
ids = []
def spawn():
    ids.append(threading.get_native_id())
    child._spawn([sys.executable, "-c", "import time; time.sleep(120)"])
thread = threading.Thread(target=spawn)
thread.start()
thread.join()
while os.path.exists(f"/proc/self/task/{ids[0]}"):
    time.sleep(0.01)
print(child.process.pid, flush=True)
time.sleep(120)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's reaper may be slow to reap)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_child_dies_when_its_parent_is_killed(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)],
                              stdout=subprocess.PIPE, cwd=ROOT)
    child = None
    try:
        child = int(parent.stdout.readline())
        assert _running(child), "the child died with the thread that started it"
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        deadline = time.monotonic() + 30
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(child), "the child outlived its killed parent"
    finally:
        parent.kill()
        parent.wait()
        if child is not None and _running(child):
            os.kill(child, signal.SIGKILL)
