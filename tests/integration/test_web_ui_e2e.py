"""The web UI end to end: real ``edgeproxy`` processes (a root and a leaf that
trusts it), a tunnelled node and a LAN node in the root, a tunnelled node in
the leaf, and Debian's Chromium driven by Playwright (never a downloaded
browser).

Covered: the web port verified by the browser (and refused untrusted), login
right and wrong, the node list (labels with ``<script>`` rendered as text),
apps and Kubernetes clusters the roles allow (filter, leaf, launch link),
web terminals to a tunnelled node and to a leaf node (DOM and recording),
resize reaching the PTY, recording playback and download, audit filters and
export, CSRF and cross-origin WebSocket refused, no CSP violation on any
page, logout, a lock and a password change ending an open terminal,
phone-sized pages. Every page is
screenshotted into the test's temp dir (``EDGE_SCREENSHOTS=DIR`` writes them
there instead, e.g. ``docs/images``).

The browser verifies the web port's certificate: it trusts the root's web CA
(ECDSA P-256, in an NSS database of its own home, see tests/browser.py) and
ignores no certificate error; a browser that does not trust it gets no page.
Python's own client below checks the same port against the cluster's Ed25519
CA (through the web CA's link).
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import ssl
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from edgeaccess.devcluster import NodeProcess, ProxyProcess, join_node, wait_for
from edgeaccess.pki import x509ca

sys.path.insert(0, str(Path(__file__).parent))
from test_trusted_clusters_e2e import trust_yaml  # noqa: E402

playwright_api = pytest.importorskip("playwright.sync_api")
sys.path.insert(0, str(Path(__file__).parents[1]))
import browser as browsers  # noqa: E402  (tests/browser.py)

CHROMIUM = browsers.CHROMIUM
PASSWORD = "web-ui-e2e-password"
XSS = "<script>window.__xss=1</script>"

pytestmark = pytest.mark.skipif(browsers.available() is not None,
                                reason=str(browsers.available()))


WEB_ONLY_ROLE = """kind: role
version: v1
metadata: {name: web-only}
spec:
  allow:
    logins: [root]
    node_labels: {env: dev}
    app_labels: {team: web}
    kubernetes_labels: {env: prod}
    kubernetes_groups: [viewers]
"""


def _unused_kubeconfig(base: Path) -> Path:
    """A Kubernetes agent's kubeconfig whose API is never asked (only listed)."""
    path = base / "unused-kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "never-used"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    return path


class World:
    def __init__(self, base: Path) -> None:
        self.base = base
        # Apps are listed under a name browsers resolve (*.edge.localhost).
        self.root = ProxyProcess(base / "root", base / "root.log", cluster="root",
                                 extra_args=["--apps-domain", "edge.localhost"])
        self.leaf = ProxyProcess(base / "leaf", base / "leaf.log", cluster="leaf")
        self.nodes: list[NodeProcess] = []

    def start(self) -> None:
        root, leaf = self.root, self.leaf
        root.start()
        leaf.start()
        root.add_user("alice", PASSWORD, roles=("access",), logins=("root",))
        root.add_user("audrey", PASSWORD, roles=("access", "auditor"), logins=("root",))
        roles = self.base / "web-only.yaml"
        roles.write_text(WEB_ONLY_ROLE)
        root.edgectl("create", "-f", str(roles))
        root.add_user("wendy", PASSWORD, roles=("web-only",), logins=("root",))
        # tnode also publishes apps and a Kubernetes cluster (listed, never
        # dialled here); its config file carries a label only a file can.
        config = self.base / "tnode.yaml"
        config.write_text(json.dumps({
            "kube-cluster": "dev-k8s", "kubeconfig": str(_unused_kubeconfig(self.base)),
            "kube-labels": {"env": "dev", "note": XSS}}))
        node, _ = join_node(root, self.base, "tnode", tunnel=True, labels="env=dev",
                            extra_args=["--config", str(config),
                                        "--app", "name=grafana,uri=http://127.0.0.1:9,"
                                                 "labels=team:web",
                                        "--app", "name=billing,uri=http://127.0.0.1:9,"
                                                 "labels=team:finance"])
        self.nodes.append(node)
        lan, _ = join_node(root, self.base, "lannode", labels="env=prod,team=web")
        self.nodes.append(lan)
        token = root.edgectl_json("tokens", "add", "--type", "trusted_cluster")["token"]
        trust = self.base / "trust.yaml"
        trust.write_text(trust_yaml(name="root", token=token, pin=root.pin(),
                                    web=root.addr("web"), tunnel=root.addr("tunnel")))
        leaf.edgectl("create", "-f", str(trust))
        leaf_node, _ = join_node(leaf, self.base, "leafnode", tunnel=True, labels="env=leaf",
                                 extra_args=["--app", "name=leafapp,uri=http://127.0.0.1:9,"
                                                      "labels=team:web"])
        self.nodes.append(leaf_node)
        wait_for(lambda: "trusted root clusters: ['root']" in leaf_node.log(), 30,
                 "the leaf node to learn the root's CA", leaf_node.process, interval=0.1)
        wait_for(lambda: "leaf cluster leaf is online" in root.log(), 30,
                 "the leaf's tunnel to the root", root.process, interval=0.1)

    def stop(self) -> None:
        for process in (*self.nodes, self.leaf, self.root):
            process.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name} ---\n{p.log()[-3000:]}"
                         for p in (self.root, self.leaf, *self.nodes))

    @property
    def url(self) -> str:
        return f"https://{self.root.addr('web')}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = World(tmp_path_factory.mktemp("webui"))
    try:
        world.start()
    except Exception as e:
        logs = world.logs()
        world.stop()
        pytest.fail(f"the clusters did not come up: {e}\n{logs}")
    yield world
    world.stop()


@pytest.fixture(scope="module")
def browser(world, tmp_path_factory):
    """Chromium trusting the root's web CA (and nothing else of ours)."""
    with browsers.browser_trusting(tmp_path_factory.mktemp("browser-home"),
                                   [browsers.web_ca_of(world.root)]) as chromium:
        yield chromium


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    target = os.environ.get("EDGE_SCREENSHOTS")
    path = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def context(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    yield ctx
    ctx.close()


def wait_js(page, expression: str, timeout: float = 30.0):
    """Poll ``expression`` in the page (Playwright's wait_for_function evals a
    string, which our CSP forbids, as it should)."""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            text = page.evaluate("window.edgeTerminal ? window.edgeTerminal.text() : "
                                 "document.body.innerText")
            raise TimeoutError(f"timed out waiting for {expression}; the page shows:\n"
                               f"{text.rstrip()[-2000:]}")
        time.sleep(0.05)


def log_in(page, world, user="alice", password=PASSWORD):
    page.goto(world.url + "/")
    page.fill("#user", user)
    page.fill("#password", password)
    page.click("#login")


def open_terminal(page, world, target: str):
    page.goto(f"{world.url}/web/ssh/{target}")
    page.wait_for_selector("#term-status.connected", timeout=30000)


def terminal_text(page) -> str:
    return page.evaluate("window.edgeTerminal.text()")


def run(page, command: str, marker: str, timeout: float = 30.0) -> str:
    page.keyboard.type(command + "\n")
    wait_js(page, f"window.edgeTerminal.text().includes({json.dumps(marker)})", timeout)
    return terminal_text(page)


def recording_of(world, page, proxy, user: str, marker: str) -> str:
    """The .cast of the user's session that printed ``marker`` (waits for upload)."""
    def find():
        for event in proxy.edgectl_json("audit", "search", "--since", "1h",
                                        "--type", "session.end"):
            if event.get("user") != user or not event.get("session_id"):
                continue
            response = page.request.get(
                f"{world.url}/web/recordings/{event['session_id']}.cast")
            if response.ok and marker in response.text():
                return response.text()
        return None

    return wait_for(find, 30, f"a recording with {marker!r}", interval=0.3)


# --- the web port's certificate ------------------------------------------------------

def test_the_browser_verifies_the_web_port_and_refuses_it_untrusted(world, browser, tmp_path):
    """The page loads in a browser trusting the web CA (no certificate error
    ignored); one that trusts nothing of ours gets no page."""
    page = browser.new_page()
    try:
        response = page.goto(world.url + "/")
        assert response.ok and page.is_visible("#login-form")
        assert response.security_details()["subjectName"] == "127.0.0.1"
        # What an operator downloads to trust is the web CA that edgectl shows.
        pem = page.request.get(world.url + "/v1/cluster/web_ca.pem")
        assert pem.ok and pem.headers["content-type"] == "application/x-pem-file"
        assert pem.text() == browsers.web_ca_of(world.root).read_text()
        fingerprint = x509ca.fingerprint(x509ca.load_certificate_pem(pem.body()))
        assert world.root.edgectl_json("status")["fingerprints"]["web_ca"] == fingerprint
    finally:
        page.close()
    untrusting = browsers.launch(browser.browser_type, browsers.nss_home(tmp_path / "home", []))
    try:
        page = untrusting.new_page()
        with pytest.raises(playwright_api.Error, match="ERR_CERT_AUTHORITY_INVALID"):
            page.goto(world.url + "/")
    finally:
        untrusting.close()


# --- login --------------------------------------------------------------------------

def test_wrong_password_keeps_the_form_and_says_so(world, context, shots):
    page = context.new_page()
    log_in(page, world, password="not the password")
    assert page.inner_text("#login-error") == "Invalid user name or password."
    assert page.is_visible("#login-form")
    assert not any(c["name"] == "__Host-edge-session" for c in context.cookies())
    page.screenshot(path=str(shots / "login.png"))


def filter_by_labels(page, labels: str, section: str) -> None:
    """Type ``labels`` in the filter box, apply it, and wait for ``section`` again."""
    page.fill("#filter", labels)
    page.click("#filters button")
    page.wait_for_selector(section)


def test_login_lists_the_nodes_with_labels_as_text(world, context, shots):
    page = context.new_page()
    started = time.monotonic()
    page.goto(world.url + "/")
    print(f"\nMEASURED login page load: {1000 * (time.monotonic() - started):.0f} ms")
    log_in(page, world)
    page.wait_for_selector("#nodes")
    rows = page.locator("#nodes .row[data-node]")
    names = sorted(rows.nth(i).get_attribute("data-node") for i in range(rows.count()))
    assert names == ["lannode", "tnode"]
    assert "team=web" in page.locator('#nodes .row[data-node="lannode"]').inner_text()
    assert "online" in page.locator('#nodes .row[data-node="tnode"]').inner_text()
    cookie = [c for c in context.cookies() if c["name"] == "__Host-edge-session"][0]
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    page.screenshot(path=str(shots / "nodes.png"))
    filter_by_labels(page, "env=prod", "#nodes")
    assert page.locator("#nodes .row[data-node]").count() == 1
    assert page.locator('#nodes .row[data-node="lannode"]').count() == 1
    # The leaf cluster is selectable and lists its node.
    page.goto(world.url + "/web/?cluster=leaf")
    assert page.locator('#nodes .row[data-node="leafnode"]').count() == 1
    assert "leaf" in page.locator('#nodes .row[data-node="leafnode"]').inner_text()


def test_apps_and_kube_clusters_the_roles_allow_are_listed_and_filtered(world, context,
                                                                       shots):
    page = context.new_page()
    log_in(page, world)
    page.wait_for_selector("#apps")
    apps = page.locator("#apps tr[data-name]")
    assert [apps.nth(i).get_attribute("data-name") for i in range(apps.count())] == \
        ["billing", "grafana"]
    port = world.root.addr("web").rpartition(":")[2]
    link = page.locator('#apps tr[data-name="grafana"] a')
    assert link.get_attribute("href") == f"https://grafana.edge.localhost:{port}/"
    assert "team=web" in page.inner_text('#apps tr[data-name="grafana"]')
    kube = page.locator('#kube tr[data-name="dev-k8s"]')
    assert "edge kube login dev-k8s" in kube.inner_text()
    assert XSS in kube.inner_text()  # the label, as text
    assert page.evaluate("window.__xss") is None
    page.screenshot(path=str(shots / "resources.png"), full_page=True)
    # The app host is on the web certificate (*.edge.localhost) the browser
    # verifies; the launch comes back to it (the app itself listens nowhere).
    launched = page.context.new_page()
    response = launched.goto(link.get_attribute("href"))
    assert launched.url.startswith(f"https://grafana.edge.localhost:{port}/"), launched.url
    assert response is not None and response.status in (502, 503, 504), response.status
    launched.close()
    # The label filter applies to every section.
    filter_by_labels(page, "team=web", "#apps")
    assert page.locator("#apps tr[data-name]").count() == 1
    assert page.locator("#kube tr[data-name]").count() == 0
    # A leaf's apps and Kubernetes clusters, asked as the user.
    page.goto(world.url + "/web/?cluster=leaf")
    assert page.locator('#apps tr[data-name="leafapp"]').count() == 1
    assert page.locator('#apps tr[data-name="leafapp"] a').get_attribute("href") == \
        f"https://leafapp.edge.localhost:{port}/"
    # The leaf answered (it has no Kubernetes cluster), it did not fail.
    assert page.locator("#kube tr[data-name]").count() == 0
    assert page.locator("#section-kube .error").count() == 0
    assert "No Kubernetes clusters you may reach" in page.inner_text("#section-kube")


def test_a_role_limited_user_sees_only_the_apps_and_clusters_it_allows(world, browser):
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        log_in(page, world, user="wendy")
        page.wait_for_selector("#apps")
        assert page.locator("#apps tr[data-name]").all_inner_texts()[0].startswith("grafana")
        assert page.locator("#apps tr[data-name]").count() == 1  # not billing (team: finance)
        assert page.locator("#kube tr[data-name]").count() == 0  # dev-k8s is env: dev
        assert "No Kubernetes clusters you may reach" in page.inner_text("#section-kube")
        assert page.locator("#nodes .row[data-node]").count() == 1  # tnode only (env: dev)
    finally:
        ctx.close()


def test_script_in_user_input_and_role_text_is_inert(world, browser):
    """Node labels with ``<script>`` (which nodes' command lines refuse but a
    heartbeat could carry) are covered in tests/web/test_web_pages.py; here a
    reflected user name and an editor's role description."""
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        log_in(page, world, user=XSS, password="x")
        assert page.input_value("#user") == XSS
        assert page.evaluate("window.__xss") is None
        role = (f"kind: role\nversion: v1\nmetadata: {{name: xss, description: '{XSS}'}}\n"
                "spec: {allow: {logins: [nobody]}}\n")
        path = world.base / "xss-role.yaml"
        path.write_text(role)
        world.root.edgectl("create", "-f", str(path), "--force")
        world.root.add_user("ed2", PASSWORD, roles=("editor",))
        log_in(page, world, user="ed2")
        page.goto(world.url + "/web/admin/roles")
        assert XSS in page.inner_text("#roles")
        assert page.evaluate("window.__xss") is None
    finally:
        ctx.close()


def test_phone_sized_pages_do_not_overflow(world, browser, shots):
    ctx = browser.new_context(viewport={"width": 390, "height": 844},
                              is_mobile=True, has_touch=True)
    try:
        page = ctx.new_page()
        log_in(page, world)
        page.wait_for_selector("#nodes")
        page.wait_for_selector("#apps")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        # Apps and Kubernetes rows fit the phone too (no sideways scrolling inside).
        assert page.evaluate("[...document.querySelectorAll('section.extra .scroll')]"
                             ".every(e => e.scrollWidth <= e.clientWidth + 1)")
        page.screenshot(path=str(shots / "nodes-phone.png"), full_page=True)
        # Every other page fits the phone's width too (wide tables scroll in their box).
        page.context.clear_cookies()
        log_in(page, world, user="audrey")
        page.wait_for_selector("#nodes")
        for path in ("/web/sessions", "/web/recordings", "/web/audit",
                     "/web/ssh/root@tnode.root"):
            page.goto(world.url + path)
            assert page.evaluate(
                "document.documentElement.scrollWidth <= window.innerWidth + 1"), path
            if "/ssh/" in path:
                # The whole terminal is on screen (its last row is where you type).
                page.wait_for_selector("#term-status.connected", timeout=30000)
                bottom = page.evaluate("document.querySelector('#terminal')"
                                       ".getBoundingClientRect().bottom")
                assert bottom <= page.evaluate("window.innerHeight") + 1, bottom
            page.screenshot(path=str(shots / f"phone-{path.split('/')[2]}.png"))
    finally:
        ctx.close()


def test_static_files_have_types_nosniff_and_no_listing(world, context):
    page = context.new_page()
    for path, kind in (("/web/static/app.css", "text/css"),
                       ("/web/static/vendor/xterm.js", "text/javascript")):
        response = page.request.get(world.url + path)
        assert response.ok and response.headers["content-type"].startswith(kind)
        assert response.headers["x-content-type-options"] == "nosniff"
    assert page.request.get(world.url + "/web/static/vendor/").status == 404


# --- web terminal --------------------------------------------------------------------

def test_terminal_runs_a_command_on_a_tunnelled_node_and_is_recorded(world, context, shots):
    page = context.new_page()
    log_in(page, world)
    open_terminal(page, world, "root@tnode.root")
    text = run(page, "echo web-$((6*7))-ok", "web-42-ok")
    assert "web-42-ok" in page.inner_text(".xterm-rows")
    page.screenshot(path=str(shots / "terminal.png"))
    # Paste goes through as input too.
    # (bash's bracketed paste keeps a pasted newline as text: Enter runs it)
    page.evaluate("window.edgeTerminal.term.paste('echo pasted-$((2+3))')")
    page.keyboard.press("Enter")
    wait_js(page, "window.edgeTerminal.text().includes('pasted-5')")
    page.keyboard.type("exit 7\n")
    page.wait_for_selector("#term-status.closed", timeout=30000)
    assert page.inner_text("#term-status") == "exited with status 7"
    assert "[exit status 7]" in terminal_text(page)
    cast = recording_of(world, page, world.root, "alice", "web-42-ok")
    header = json.loads(cast.splitlines()[0])
    assert header["version"] == 2
    ends = [e for e in world.root.edgectl_json("audit", "search", "--since", "1h",
                                               "--type", "session.end")
            if e.get("user") == "alice" and e.get("exit_status") == 7]
    assert ends and ends[-1]["node"] == "tnode"
    assert text


def test_resize_reaches_the_pty(world, context):
    page = context.new_page()
    log_in(page, world)
    open_terminal(page, world, "root@tnode.root")
    page.set_viewport_size({"width": 700, "height": 420})
    wait_js(page, "window.edgeTerminal.term.cols < 90")
    cols, rows = page.evaluate("[window.edgeTerminal.term.cols, window.edgeTerminal.term.rows]")
    # Let the resize message go before asking (the PTY answers what it has).
    time.sleep(0.3)
    run(page, "echo size=$(stty size)=", f"size={rows} {cols}=")


def test_terminal_to_a_leaf_node_through_the_root(world, context):
    page = context.new_page()
    log_in(page, world)
    open_terminal(page, world, "root@leafnode.leaf")
    run(page, "echo leaf-$((40+2))", "leaf-42")
    page.keyboard.type("exit\n")
    page.wait_for_selector("#term-status.closed", timeout=30000)
    # Audited and recorded in the leaf (audit records of a leaf stay there).
    def recorded():
        return [e for e in world.leaf.edgectl_json("audit", "search", "--since", "1h",
                                                   "--type", "session.end")
                if e.get("user") == "alice" and e.get("node") == "leafnode"
                and e.get("recorded")]
    wait_for(recorded, 30, "the leaf's session.end", interval=0.3)


def test_a_login_the_roles_do_not_allow_is_refused_by_the_node(world, context):
    page = context.new_page()
    log_in(page, world)
    page.goto(f"{world.url}/web/ssh/nobody@tnode.root")
    page.wait_for_selector("#term-status.closed", timeout=30000)
    assert "refused" in page.inner_text("#term-status")


def test_logout_ends_an_open_terminal(world, context):
    page = context.new_page()
    log_in(page, world)
    open_terminal(page, world, "root@tnode.root")
    run(page, "echo before-logout", "before-logout")
    other = context.new_page()
    other.goto(world.url + "/web/")
    other.click("#logout")
    other.wait_for_selector("#login-form")
    page.wait_for_selector("#term-status.closed", timeout=10000)
    assert "web session ended: logged out" in page.inner_text("#term-status")
    # The session is gone server-side too.
    assert page.request.get(world.url + "/web/", max_redirects=0).status == 303


@contextmanager
def terminal_of_a_new_user(world, browser, user: str, marker: str):
    """A user of the test's own (the test ends their web session), logged in
    in a browser context of their own, with a terminal open on tnode that
    echoed ``marker``: yields its page."""
    world.root.add_user(user, PASSWORD, roles=("access",), logins=("root",))
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        log_in(page, world, user=user)
        open_terminal(page, world, "root@tnode.root")
        run(page, f"echo {marker}", marker)
        yield page
    finally:
        ctx.close()


def test_a_password_change_ends_the_web_session_and_its_open_terminal(world, browser):
    with terminal_of_a_new_user(world, browser, "changer", "before-change") as page:
        world.root.edgectl("users", "set-password", "changer", "--password-stdin",
                           input="a brand new password\n")
        page.wait_for_selector("#term-status.closed", timeout=15000)
        assert "password was changed" in page.inner_text("#term-status")
        assert page.request.get(world.url + "/web/", max_redirects=0).status == 303
        log_in(page, world, user="changer", password="a brand new password")
        page.wait_for_selector("#nodes")


def test_every_page_runs_under_the_csp_without_a_violation(world, context):
    """script-src 'self' and no inline script anywhere: Chromium reports
    every blocked script, style or connection on the console."""
    page = context.new_page()
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text)
            if "Content Security Policy" in m.text else None)
    page.goto(world.url + "/")
    log_in(page, world, user="audrey")
    page.wait_for_selector("#nodes")
    for path in ("/web/?cluster=leaf", "/web/sessions", "/web/recordings", "/web/audit"):
        response = page.goto(world.url + path)
        assert response.ok, path
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp.split(
            "style-src")[0], (path, csp)
    open_terminal(page, world, "root@tnode.root")
    run(page, "echo csp-ok", "csp-ok")
    page.goto(world.url + "/web/recordings")
    first = page.locator("#recordings a.button").first
    if first.count():
        first.click()
        page.wait_for_selector(".ap-player", timeout=30000)
    assert violations == []


def test_a_lock_ends_the_web_session_and_its_open_terminal(world, browser):
    with terminal_of_a_new_user(world, browser, "lockme", "before-lock") as page:
        started = time.monotonic()
        world.root.edgectl("lock", "--user", "lockme", "--ttl", "10m",
                           "--message", "maintenance window")
        page.wait_for_selector("#term-status.closed", timeout=10000)
        print(f"\nMEASURED lock to closed web terminal: {time.monotonic() - started:.2f} s")
        assert page.request.get(world.url + "/web/", max_redirects=0).status == 303
        log_in(page, world, user="lockme")
        assert "maintenance window" in page.inner_text("#login-error")


# --- recordings and audit --------------------------------------------------------------

def test_recording_list_player_and_download(world, context, shots):
    page = context.new_page()
    log_in(page, world)
    open_terminal(page, world, "root@tnode.root")
    run(page, "echo replay-$((3*3))-me", "replay-9-me")
    page.keyboard.type("exit\n")
    page.wait_for_selector("#term-status.closed", timeout=30000)
    recording_of(world, page, world.root, "alice", "replay-9-me")
    page.goto(world.url + "/web/recordings")
    page.screenshot(path=str(shots / "recordings.png"))
    link = page.locator("#recordings a.button").first
    link.click()
    page.wait_for_selector(".ap-player", timeout=30000)
    page.locator(".ap-player").click()  # play
    wait_js(page, "document.querySelector('#player').innerText.includes('replay-9-me')", 30)
    page.screenshot(path=str(shots / "player.png"))
    with page.expect_download() as download:
        page.click("#download")
    assert download.value.suggested_filename.endswith(".cast")


def test_audit_filters_paging_export_and_verdict(world, context, shots):
    page = context.new_page()
    log_in(page, world, user="audrey")
    page.goto(world.url + "/web/audit")
    assert page.locator("#verdict").count(), page.inner_text("body")
    assert "Chain verified" in page.inner_text("#verdict")
    page.fill("#audit-type", "user.login")
    page.fill("#audit-user", "alice")
    page.click("#audit-apply")
    page.wait_for_selector("#audit")
    types = page.locator("#audit td.event-type").all_inner_texts()
    users = page.locator("#audit tbody tr td:nth-child(3)").all_inner_texts()
    assert types and set(types) == {"user.login"} and set(users) == {"alice"}
    page.screenshot(path=str(shots / "audit.png"))
    exported = page.request.get(world.url + "/web/audit.json?type=user.login&user=alice")
    events = exported.json()
    assert len(events) == len(types) and {e["user"] for e in events} == {"alice"}
    # Paging: 50 per page, newest first.
    page.goto(world.url + "/web/audit")
    summary = page.inner_text("#audit-summary")
    total = int(summary.split()[0])
    if total > 50:
        page.click("#audit-older")
        assert "showing 51" in page.inner_text("#audit-summary")
    # Plain users have no audit page.
    plain = context.browser.new_context()
    try:
        other = plain.new_page()
        log_in(other, world)
        assert other.request.get(world.url + "/web/audit").status == 403
    finally:
        plain.close()


def test_admin_pages_render_for_an_editor(world, browser, shots):
    world.root.add_user("ed", PASSWORD, roles=("editor",))
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = ctx.new_page()
        log_in(page, world, user="ed")
        page.goto(world.url + "/web/admin/users")
        page.fill("#user-add input[name=name]", "newcomer")
        page.fill("#user-add input[name=roles]", "access")
        page.click("#user-add button")
        assert re.search(r"/web/signup/[0-9a-f]{32}", page.inner_text("#signup-link"))
        page.screenshot(path=str(shots / "admin-users.png"))
        page.goto(world.url + "/web/admin/roles?edit=access")
        assert "kind: role" in page.input_value("#role-yaml")
        page.screenshot(path=str(shots / "admin-roles.png"))
        page.goto(world.url + "/web/admin/tokens")
        page.click("#token-add button")
        assert "--token" in page.inner_text("#new-token")
    finally:
        ctx.close()


# --- safety ------------------------------------------------------------------------------

def test_state_changes_without_the_csrf_token_are_refused(world, context):
    page = context.new_page()
    log_in(page, world)
    page.wait_for_selector("#nodes")
    forged = page.request.post(world.url + "/web/logout", form={"csrf": "forged"},
                               max_redirects=0)
    assert forged.status == 403
    token = page.input_value("form.logout input[name=csrf]")
    other_origin = page.request.post(world.url + "/web/logout", form={"csrf": token},
                                     headers={"origin": "https://evil.example"},
                                     max_redirects=0)
    assert other_origin.status == 403
    port = world.root.addr("web").rpartition(":")[2]
    from_an_app = page.request.post(world.url + "/web/logout", form={"csrf": token},
                                    headers={"origin": f"https://grafana.edge.localhost:{port}"},
                                    max_redirects=0)
    assert from_an_app.status == 403
    assert page.request.get(world.url + "/web/", max_redirects=0).status == 200


def _upgrade(world, cookie: str, origin: str | None) -> str:
    """A raw WebSocket upgrade to the terminal, checking the proxy against the
    cluster CA; returns the HTTP status line."""
    host, port = world.root.addr("web").rsplit(":", 1)
    tls = ssl.create_default_context(
        cafile=str(world.root.data_dir / "ca" / "tls_ca.crt"))
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            tls.wrap_socket(raw, server_hostname=host) as conn:
        lines = ["GET /web/ws/ssh/root@tnode.root HTTP/1.1", f"Host: {host}:{port}",
                 "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
                 "Sec-WebSocket-Version: 13", f"Cookie: __Host-edge-session={cookie}"]
        if origin is not None:
            lines.append(f"Origin: {origin}")
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return conn.recv(4096).split(b"\r\n", 1)[0].decode()


def test_cross_origin_websocket_upgrades_are_refused(world, context):
    page = context.new_page()
    log_in(page, world)
    page.wait_for_selector("#nodes")
    cookie = [c for c in context.cookies() if c["name"] == "__Host-edge-session"][0]["value"]
    assert " 403 " in _upgrade(world, cookie, "https://evil.example") + " "
    # An app's page is same-site (the browser sends the Lax cookie along) but
    # another origin: refused too.
    port = world.root.addr("web").rpartition(":")[2]
    assert " 403 " in _upgrade(world, cookie, f"https://grafana.edge.localhost:{port}") + " "
    assert " 403 " in _upgrade(world, cookie, None) + " "
    assert " 101 " in _upgrade(world, cookie, world.url) + " "
    assert _upgrade(world, "not-a-session-token-at-all", world.url).split()[1] in ("401", "403")
