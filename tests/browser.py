"""Debian's Chromium driven by Playwright, trusting exactly the CAs a test names.

Chromium on Linux takes the certificates a user trusts from the NSS database
under ``$HOME/.pki/nssdb``: :func:`nss_home` makes a throw-away home whose
database trusts the given CA certificates for TLS servers (``certutil -A -t
C,,``, from Debian's ``libnss3-tools``), and :func:`launch` starts the browser
with that home. No certificate error is ignored: a page loads only when its
chain verifies against those CAs (an empty list trusts nothing of ours).
Playwright's own request client (Node.js) is given the same CAs.

Typical use, one browser per test module::

    @pytest.fixture(scope="module")
    def browser(world, tmp_path_factory):
        with browser_trusting(tmp_path_factory.mktemp("nss"), [web_ca_of(world.root)]) as b:
            yield b

A cluster's web CA is ``DATA_DIR/ca/web_ca.crt`` (:func:`web_ca_of`), also
served at ``/v1/cluster/web_ca.pem`` and fingerprinted in ``edgectl status``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Iterator

CHROMIUM = "/usr/lib/chromium/chromium"
CERTUTIL = shutil.which("certutil") or "/usr/bin/certutil"


def available() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not os.path.exists(CHROMIUM):
        return "Debian's chromium is not installed"
    if not os.path.exists(CERTUTIL):
        return "certutil (libnss3-tools) is not installed"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    return None


def web_ca_of(proxy) -> Path:
    """The web CA certificate of a :class:`edgeaccess.devcluster.ProxyProcess`."""
    return Path(proxy.data_dir) / "ca" / "web_ca.crt"


def nss_home(directory: Path, ca_files: Iterable[Path | str]) -> Path:
    """A home directory whose NSS database trusts ``ca_files`` (PEM) as TLS CAs."""
    directory.mkdir(parents=True, exist_ok=True)
    nssdb = directory / ".pki" / "nssdb"
    nssdb.mkdir(parents=True, exist_ok=True)
    db = f"sql:{nssdb}"
    subprocess.run([CERTUTIL, "-d", db, "-N", "--empty-password"], check=True,
                   capture_output=True, timeout=60)
    for number, ca_file in enumerate(ca_files):
        subprocess.run([CERTUTIL, "-d", db, "-A", "-t", "C,,", "-n", f"edge-ca-{number}",
                        "-i", str(ca_file)], check=True, capture_output=True, timeout=60)
    return directory


def launch(browser_type, home: Path, args: Iterable[str] = ()):
    """Chromium with ``home`` as its HOME (its NSS trust), never ignoring
    certificate errors.

    :param browser_type: Playwright's ``p.chromium``, or ``browser.browser_type``
        of a running one (one Playwright per thread: a second browser with
        another trust is launched from the first one's type).
    """
    env = {**os.environ, "HOME": str(home)}
    return browser_type.launch(executable_path=CHROMIUM, env=env, args=["--no-sandbox", *args])


@contextlib.contextmanager
def playwright_trusting(directory: Path, ca_files: Iterable[Path | str]) -> Iterator:
    """Playwright whose own HTTP client (``page.request``, ``context.request``:
    Node.js, not the browser) trusts ``ca_files`` too (``NODE_EXTRA_CA_CERTS``,
    read once when its driver starts)."""
    from playwright.sync_api import sync_playwright

    bundle = directory / "node-extra-ca.pem"
    directory.mkdir(parents=True, exist_ok=True)
    bundle.write_text("".join(Path(f).read_text() for f in ca_files))
    saved = os.environ.get("NODE_EXTRA_CA_CERTS")
    os.environ["NODE_EXTRA_CA_CERTS"] = str(bundle)
    try:
        manager = sync_playwright()
        p = manager.__enter__()
    finally:
        if saved is None:
            os.environ.pop("NODE_EXTRA_CA_CERTS", None)
        else:
            os.environ["NODE_EXTRA_CA_CERTS"] = saved
    try:
        yield p
    finally:
        manager.__exit__(None, None, None)


@contextlib.contextmanager
def browser_trusting(directory: Path, ca_files: Iterable[Path | str]) -> Iterator:
    """A running Chromium that trusts ``ca_files`` and nothing else of ours
    (and so does Playwright's request client, see :func:`playwright_trusting`)."""
    ca_files = list(ca_files)
    home = nss_home(directory, ca_files)
    with playwright_trusting(directory, ca_files) as p:
        chromium = launch(p.chromium, home)
        try:
            yield chromium
        finally:
            chromium.close()
