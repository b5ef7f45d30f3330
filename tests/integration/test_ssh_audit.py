"""``ssh-audit`` (PyPI) against the real node's and the real proxy's SSH ports.

No algorithm may be rated "fail"; every algorithm rated "warn" must be
listed with its reason in the "SSH algorithms (ssh-audit)" section of
docs/security.md, so that the document cannot drift from what we offer.
And plain OpenSSH must still get through with what is left.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeaccess.devcluster import join_node, run_edge

ROOT = Path(__file__).resolve().parents[2]
CATEGORIES = ("kex", "key", "enc", "mac")
DOC_SECTION = "## SSH algorithms (ssh-audit)"


def _ssh_audit() -> str:
    beside_python = Path(sys.executable).parent / "ssh-audit"
    found = str(beside_python) if beside_python.exists() else shutil.which("ssh-audit")
    if found is None:
        pytest.skip("ssh-audit is not installed (pip install '.[test]')")
    return found


@pytest.fixture(scope="module")
def node(proxy, tmp_path_factory):
    process, listed = join_node(proxy, tmp_path_factory.mktemp("node"), "audited",
                                labels="env=audit")
    yield listed["address"]
    process.stop()


def audit(address: str) -> dict:
    """ssh-audit's JSON report of ``HOST:PORT`` (the DoS rate test is skipped)."""
    host, _, port = address.rpartition(":")
    result = subprocess.run(
        [_ssh_audit(), "--json", "--skip-rate-test", "--timeout", "10", "--port", port, host],
        capture_output=True, text=True, timeout=60)
    # Exit codes: 0 good, 2 warnings, 3 failures; 1 is a connection error.
    assert result.returncode in (0, 2, 3), result.stdout + result.stderr
    report = json.loads(result.stdout)
    report["exit_status"] = result.returncode
    return report


def rated(report: dict, level: str) -> dict[str, list[str]]:
    """``{algorithm: [notes]}`` of every algorithm with notes of ``level``."""
    found = {}
    for category in CATEGORIES:
        for entry in report.get(category, []):
            notes = entry.get("notes", {}).get(level)
            if notes:
                found[entry["algorithm"]] = notes
    return found


def documented_section() -> str:
    text = (ROOT / "docs" / "security.md").read_text()
    assert DOC_SECTION in text, f"docs/security.md has no {DOC_SECTION!r} section"
    return text.split(DOC_SECTION, 1)[1].split("\n## ", 1)[0]


@pytest.fixture(scope="module", params=["node", "proxy"])
def report(request, proxy, node):
    address = node if request.param == "node" else proxy.addr("ssh")
    return audit(address)


def test_no_algorithm_is_rated_fail(report):
    failures = rated(report, "fail")
    assert failures == {}, "ssh-audit fails: " + json.dumps(failures, indent=1)
    assert report["exit_status"] != 3


def test_no_known_vulnerabilities_are_reported(report):
    assert report.get("cves", []) == []


def test_every_warning_is_documented_with_its_reason(report):
    section = documented_section()
    undocumented = {alg: notes for alg, notes in rated(report, "warn").items()
                    if f"`{alg}`" not in section}
    assert undocumented == {}, "document these in docs/security.md: " + json.dumps(
        undocumented, indent=1)


def test_only_certificate_capable_ed25519_host_keys_are_offered(report):
    assert [k["algorithm"] for k in report["key"]] == [
        "ssh-ed25519-cert-v01@openssh.com", "ssh-ed25519"]


def test_openssh_still_connects_with_the_remaining_algorithms(proxy, node, tmp_path):
    proxy.add_user("auditor-user", "audit-password-1", logins=("root",))
    home = tmp_path / "edge"
    login = run_edge(home, "login", "--proxy", proxy.addr("web"), "--user", "auditor-user",
                     "--password-stdin", "--ca-pin", proxy.pin(),
                     input="audit-password-1\n")
    assert login.returncode == 0, login.stderr
    result = subprocess.run(
        ["ssh", "-F", str(home / "ssh_config"), "-o", "BatchMode=yes",
         f"root@audited.{proxy.cluster}", "echo", "still-works"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "still-works\n"
