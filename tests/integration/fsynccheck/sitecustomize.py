"""Loaded (through ``PYTHONPATH``) by every Python process that
``test_audit_e2e.py`` starts: with ``EDGE_TEST_FSYNC_DIR`` set, each
``os.fsync`` made on the process's main thread (where twistd runs the
reactor) is written with its stack to ``EDGE_TEST_FSYNC_DIR/fsync-PID.log``.
The test then fails if any of them came from the audit code."""

import os
import threading
import traceback

_directory = os.environ.get("EDGE_TEST_FSYNC_DIR")
if _directory:
    _real_fsync = os.fsync

    def _checked_fsync(fd):
        if threading.current_thread() is threading.main_thread():
            with open(os.path.join(_directory, f"fsync-{os.getpid()}.log"), "a") as log:
                log.write("".join(traceback.format_stack()) + "\n====\n")
        return _real_fsync(fd)

    os.fsync = _checked_fsync
