"""The web UI's pages in memory (StubTreq over the proxy's Klein app): the
login form and its CSRF cookie, sessions by cookie, security headers, escaping,
CSRF and Origin checks, static files, admin permissions."""

from __future__ import annotations

import json
import re

import pytest
import treq
from treq.testing import StubTreq

from authkit import PASSWORD, add_user, resolve
from edgeaccess.proxy.web import ProxyWeb
from edgeaccess.web.app import WebUI
from edgeaccess.web.sessions import COOKIE_NAME, WebSessionStore

HOST = "proxy.example:3080"
ORIGIN = f"https://{HOST}"


class Browser:
    """StubTreq with a cookie jar of our own and the proxy's Host header."""

    def __init__(self, resource) -> None:
        self.resource = resource
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, *, data=None, origin: str | None = ORIGIN,
                cookies: dict | None = None):
        headers = {"host": HOST}
        if origin is not None:
            headers["origin"] = origin
        jar = dict(self.cookies if cookies is None else cookies)
        if jar:
            headers["cookie"] = "; ".join(f"{k}={v}" for k, v in jar.items())
        stub = StubTreq(self.resource)  # a fresh one: no cookie jar but ours
        d = stub.request(method, f"https://{HOST}{path}", headers=headers, data=data,
                              allow_redirects=False)
        out = []
        d.addCallback(lambda resp: treq.content(resp).addCallback(
            lambda body: out.append((resp, body))))
        d.addErrback(out.append)
        stub.flush()
        assert out, "no response"
        if not isinstance(out[0], tuple):
            out[0].raiseException()
        resp, body = out[0]
        for header in resp.headers.getRawHeaders("set-cookie", []):
            name, _, rest = header.partition("=")
            value = rest.split(";", 1)[0]
            if value:
                self.cookies[name] = value
            else:
                self.cookies.pop(name, None)
        return resp, body.decode("utf-8")

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, data, **kw):
        return self.request("POST", path, data=data, **kw)


@pytest.fixture
def ui(auth, clock):
    return WebUI(auth, WebSessionStore(auth, clock), opener=None, clusters=None,
                 addresses=lambda: {"web": HOST}, clock=clock)


@pytest.fixture
def browser(auth, ui):
    return Browser(ProxyWeb(auth, lambda: {"web": HOST, "ssh": "x:3023"}, "proxy.example",
                            None, ui=ui).resource())


def csrf_of(body: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', body).group(1)


def log_in(browser, user="alice", password=PASSWORD):
    _, form = browser.get("/")
    return browser.post("/web/login", {"user": user, "password": password,
                                       "csrf": csrf_of(form)})


def test_login_form_then_session_cookie(auth, browser):
    add_user(auth, "alice")
    resp, body = browser.get("/")
    assert resp.code == 200 and 'id="login-form"' in body
    assert "default-src 'none'; script-src 'self'" in resp.headers.getRawHeaders(
        "content-security-policy")[0]
    assert resp.headers.getRawHeaders("x-content-type-options") == ["nosniff"]
    resp, _ = log_in(browser)
    assert resp.code == 303 and resp.headers.getRawHeaders("location") == ["/web/"]
    cookie = [h for h in resp.headers.getRawHeaders("set-cookie")
              if h.startswith(COOKIE_NAME.decode())][0]
    for attribute in ("Secure", "HttpOnly", "SameSite=lax", "Path=/"):
        assert attribute in cookie
    resp, body = browser.get("/web/")
    assert resp.code == 200 and 'id="nodes"' in body and ">alice<" in body
    # Logged in, / goes to the resources page.
    assert browser.get("/")[0].headers.getRawHeaders("location") == ["/web/"]


def test_wrong_password_shows_the_form_again(auth, browser):
    add_user(auth, "alice")
    resp, body = log_in(browser, password="nope")
    assert resp.code == 401
    assert "Invalid user name or password." in body and 'id="login-form"' in body
    assert COOKIE_NAME.decode() not in browser.cookies


def test_login_without_the_forms_csrf_cookie_is_refused(auth, browser):
    add_user(auth, "alice")
    _, form = browser.get("/")
    resp, body = browser.post("/web/login", {"user": "alice", "password": PASSWORD,
                                             "csrf": csrf_of(form)}, cookies={})
    assert resp.code == 403 and COOKIE_NAME.decode() not in browser.cookies


def test_pages_need_a_session(browser):
    for path in ("/web/", "/web/recordings", "/web/sessions", "/web/admin/users"):
        resp, _ = browser.get(path)
        assert resp.code == 303 and resp.headers.getRawHeaders("location") == ["/"], path


def test_logout_needs_the_csrf_token_and_ends_the_session(auth, browser):
    add_user(auth, "alice")
    log_in(browser)
    _, page = browser.get("/web/")
    token = csrf_of(page)
    resp, _ = browser.post("/web/logout", {"csrf": "forged"})
    assert resp.code == 403
    resp, _ = browser.post("/web/logout", {"csrf": token}, origin="https://evil.example")
    assert resp.code == 403
    assert browser.get("/web/")[0].code == 200
    resp, _ = browser.post("/web/logout", {"csrf": token})
    assert resp.code == 303
    assert browser.get("/web/")[0].code == 303


def test_node_labels_and_names_are_escaped(auth, browser):
    add_user(auth, "alice")
    auth.backend.put("/nodes/0a0b", b'{"name": "n1", "uuid": "0a0b", '
                             b'"address": "127.0.0.1:1", "cluster": "unit", "version": "", '
                             b'"last_heartbeat": "2027-01-15T08:00:00Z", '
                             b'"labels": {"x": "<script>alert(1)</script>"}}')
    log_in(browser)
    _, body = browser.get("/web/")
    assert "<script>alert(1)</script>" not in body
    assert "x=&lt;script&gt;alert(1)&lt;/script&gt;" in body


def test_static_directories_are_not_listed(browser):
    # (Files themselves, their types and headers: tests/integration/test_web_ui_e2e.py;
    # static.File streams through a producer StubTreq does not run.)
    for path in ("/web/static/", "/web/static/vendor/", "/web/static/../app.py"):
        assert browser.get(path)[0].code == 404, path


def test_admin_pages_are_for_editors(auth, browser):
    add_user(auth, "alice")
    add_user(auth, "ed", roles=("editor",))
    log_in(browser)
    assert browser.get("/web/admin/users")[0].code == 403
    browser.cookies.clear()
    log_in(browser, "ed")
    resp, body = browser.get("/web/admin/users")
    assert resp.code == 200 and 'data-user="alice"' in body
    resp, body = browser.post("/web/admin/users/add", {"csrf": csrf_of(body),
                                                        "name": "<b>x</b>", "roles": "access"})
    assert resp.code == 400 and "<b>x</b>" not in body
    resp, body = browser.post("/web/admin/users/add", {"csrf": csrf_of(body), "name": "newbie",
                                                        "roles": "access", "logins": "ubuntu"})
    assert resp.code == 200
    assert re.search(r"https://proxy\.example:3080/web/signup/[0-9a-f]{32}", body)
    assert resolve(auth.get_user("newbie"))["logins"] == ["ubuntu"]


def test_role_yaml_is_validated_like_edgectl_create(auth, browser):
    add_user(auth, "ed", roles=("editor",))
    log_in(browser, "ed")
    _, body = browser.get("/web/admin/roles")
    bad = "kind: role\nversion: v1\nmetadata: {name: dev}\nspec: {allow: {logins: 5}}\n"
    resp, body = browser.post("/web/admin/roles/save", {"csrf": csrf_of(body), "yaml": bad})
    assert resp.code == 400 and 'id="admin-error"' in body
    good = "kind: role\nversion: v1\nmetadata: {name: dev}\nspec: {allow: {logins: [dev]}}\n"
    resp, _ = browser.post("/web/admin/roles/save", {"csrf": csrf_of(body), "yaml": good})
    assert resp.code == 303
    assert [r.name for r in resolve(auth.get_roles(["dev"]))] == ["dev"]


def test_unknown_pages_and_wrong_methods_are_404_and_405(browser):
    resp, body = browser.get("/web/no-such-page")
    assert resp.code == 404 and resp.headers.getRawHeaders("content-type")[0].startswith(
        "text/html")
    assert browser.request("PUT", "/web/login")[0].code == 405


def test_the_login_form_offers_the_ldap_connectors(auth, browser):
    resolve(auth.upsert_resource({
        "kind": "ldap_connector", "version": "v1", "metadata": {"name": "corp"},
        "spec": {"url": "ldap://127.0.0.1:1", "bind_dn": "cn=edge", "bind_password": "x",
                 "user_search": {"base_dn": "dc=example", "filter": "(uid={username})"},
                 "group_search": {"base_dn": "dc=example", "filter": "(member={user_dn})",
                                  "name_attribute": "cn"},
                 "groups_to_roles": [{"group": "ops", "roles": ["access"]}]}}))
    _, body = browser.get("/")
    assert 'id="connector"' in body and '<option value="corp"' in body


def test_the_session_list_ends_another_session(auth, ui):
    add_user(auth, "alice")
    resource = ProxyWeb(auth, lambda: {"web": HOST, "ssh": "x:3023"}, "proxy.example",
                        None, ui=ui).resource()
    laptop, phone = Browser(resource), Browser(resource)
    log_in(laptop)
    log_in(phone)
    _, body = laptop.get("/web/sessions")
    assert body.count("<tr>") == 3  # the header and both sessions
    other = re.search(r'name="id" value="([0-9a-f]{64})"', body).group(1)
    resp, _ = laptop.post("/web/sessions/revoke", {"csrf": csrf_of(body), "id": other})
    assert resp.code == 303
    assert phone.get("/web/")[0].code == 303  # logged out
    assert laptop.get("/web/")[0].code == 200


def test_audit_time_range_type_and_user_filters_and_paging(auth, clock, ui):
    from edgeaccess.audit.log import AuditLog

    auth.audit = AuditLog(auth.backend, auth.cluster_name, clock)
    add_user(auth, "audrey", roles=("auditor",))
    for i in range(60):  # one a minute from 08:00 (the fake clock's start)
        auth.audit.emit("exec", user="bob" if i % 2 else "carol", command=f"cmd-{i}")
        clock.advance(60)
    browser = Browser(ProxyWeb(auth, lambda: {"web": HOST, "ssh": "x:3023"}, "proxy.example",
                               None, ui=ui).resource())
    log_in(browser, "audrey")
    _, body = browser.get("/web/audit?type=exec&user=bob&since=2027-01-15T08:10:00"
                          "&until=2027-01-15T08:29:59")
    assert "10 matching events" in body
    assert re.findall(r"command=cmd-(\d+)", body) == [str(n) for n in range(29, 10, -2)]
    assert "Chain verified" in body
    _, body = browser.get("/web/audit?type=exec")
    assert "60 matching events, showing 1–50" in body and 'id="audit-older"' in body
    _, body = browser.get("/web/audit?type=exec&offset=50")
    assert "showing 51–60" in body and 'id="audit-newer"' in body
    resp, body = browser.get("/web/audit.json?type=exec&user=carol")
    events = json.loads(body)
    assert len(events) == 30 and {e["user"] for e in events} == {"carol"}


def test_editor_locks_a_user_from_the_admin_page_and_their_session_ends(auth, clock):
    from edgeaccess.web.sessions import lock_check_for

    ui = WebUI(auth, WebSessionStore(auth, clock, lock_check=lock_check_for(auth)),
               opener=None, clusters=None, addresses=lambda: {"web": HOST}, clock=clock,
               lock_source=auth)
    resource = ProxyWeb(auth, lambda: {"web": HOST, "ssh": "x:3023"}, "proxy.example",
                        None, ui=ui).resource()
    add_user(auth, "alice")
    add_user(auth, "ed", roles=("editor",))
    alice, ed = Browser(resource), Browser(resource)
    log_in(alice)
    log_in(ed, "ed")
    _, body = ed.get("/web/admin/locks")
    resp, _ = ed.post("/web/admin/locks/add", {"csrf": csrf_of(body), "kind": "user",
                                               "name": "alice", "ttl": "1h",
                                               "message": "<b>maintenance</b>"})
    assert resp.code == 303
    _, body = ed.get("/web/admin/locks")
    assert "user alice" in body and "&lt;b&gt;maintenance&lt;/b&gt;" in body
    assert alice.get("/web/")[0].code == 303  # her session ended
    lock_id = re.search(r'name="id" value="([0-9a-f]+)"', body).group(1)
    assert ed.post("/web/admin/locks/rm", {"csrf": csrf_of(body), "id": lock_id})[0].code == 303
    resp, _ = log_in(alice)
    assert resp.code == 303
