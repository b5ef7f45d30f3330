"""Runnable performance scenarios: ``python -m benchmarks <scenario> [options]``.

Each scenario prints one JSON object per result and compares against its
baseline measured in the same run (OpenSSH's sshd for SSH figures), because
absolute times on shared machines drift.  See ``docs/performance.md``.
"""
