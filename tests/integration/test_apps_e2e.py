"""Web application access end to end: a real proxy whose public host is
``edge.localhost``, a node behind a reverse tunnel publishing apps (the demo
app, one that misbehaves, one that is down), ``edge apps``, curl with app
certificates (verified strictly against the cluster CA, names under
``*.edge.localhost``), and a WebSocket client.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509

from edgeaccess.devcluster import join_node, run_edge, stop_process, wait_for
from tests.apps.appkit import (
    PUBLIC_HOST,
    WebSocketClient,
    app_login,
    browser_trusting_web_ca,
    curl,
    edge_login,
    start_bad_app,
    start_demo_app,
    start_proxy,
    tls_socket,
    web_listen,
    web_port,
)
from tests.integration.steps import (
    app_post_streams_byte_exact,
    app_websocket_echoes,
    browser_app_session_ended_by_ui_logout,
)

#: The proxy's --app-timeouts response=... here (the default is 60 s).
SLOW_APP_TIMEOUT = 8

ROLE = """\
kind: role
version: v1
metadata: {name: webonly}
spec:
  allow: {app_labels: {team: web}}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("apps")
    # Requests to demo and bad are audited (app.request), those to secret not.
    proxy = start_proxy(base, "apps", "--app-request-audit", "demo,bad",
                        "--app-timeouts", f"response={SLOW_APP_TIMEOUT}s")
    demo = bad = node = None
    try:
        demo, demo_port = start_demo_app(proxy)
        bad, bad_port = start_bad_app()
        apps = [f"name=demo,uri=http://127.0.0.1:{demo_port},labels=team:web",
                f"name=secret,uri=http://127.0.0.1:{demo_port},labels=team:ops",
                f"name=bad,uri=http://127.0.0.1:{bad_port},labels=team:web",
                "name=down,uri=http://127.0.0.1:1,labels=team:web"]
        node, _ = join_node(proxy, base, "appnode", tunnel=True, auth_server=web_listen(proxy),
                            extra_args=[a for app in apps for a in ("--app", app)])
        role = base / "role.yaml"
        role.write_text(ROLE)
        proxy.edgectl("create", "-f", str(role))
        proxy.add_user("alice", "alice-password-1", roles=("access",))
        proxy.add_user("bob", "bob-password-1", roles=("webonly",))
        alice = edge_login(proxy, base / "alice", "alice", "alice-password-1")
        bob = edge_login(proxy, base / "bob", "bob", "bob-password-1")
        yield {"proxy": proxy, "alice": alice, "bob": bob, "demo_port": demo_port,
               "base": base, "node": node}
    finally:
        if node is not None:
            node.stop()
        stop_process(demo)
        stop_process(bad)
        proxy.stop()


@pytest.fixture(scope="module")
def demo(cluster):
    """alice's app certificate for ``demo``."""
    return app_login(cluster["alice"], "demo")


def whoami(config, *args) -> dict:
    result = curl(config, "/api/whoami", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_apps_ls_lists_what_the_roles_allow(cluster):
    result = run_edge(cluster["alice"], "apps", "ls", "--format", "json")
    assert result.returncode == 0, result.stderr
    apps = {a["name"]: a for a in json.loads(result.stdout)}
    assert set(apps) == {"demo", "secret", "bad", "down"}
    port = web_port(cluster["proxy"])
    assert apps["demo"]["public_addr"] == f"https://demo.{PUBLIC_HOST}:{port}"
    assert apps["demo"]["labels"] == {"team": "web"}
    result = run_edge(cluster["bob"], "apps", "ls", "--format", "json")
    assert sorted(a["name"] for a in json.loads(result.stdout)) == ["bad", "demo", "down"]


def test_curl_with_app_certificate_reaches_app_with_verified_identity(cluster, demo):
    assert demo["url"] == f"https://demo.{PUBLIC_HOST}:{web_port(cluster['proxy'])}"
    answer = whoami(demo)
    assert answer["verified"] is True, answer
    claims = answer["claims"]
    assert claims["sub"] == claims["username"] == "alice"
    assert claims["roles"] == ["access"]
    assert claims["iss"] == "apps"
    assert claims["aud"] == f"http://127.0.0.1:{cluster['demo_port']}"
    assert claims["nbf"] <= claims["iat"] < claims["exp"] <= claims["iat"] + 600
    headers = answer["headers"]
    assert headers["X-Forwarded-For"] == ["127.0.0.1"]
    assert headers["X-Forwarded-Proto"] == ["https"]
    assert headers["X-Forwarded-Host"] == [demo["url"].removeprefix("https://")]
    assert headers["Host"] == [f"127.0.0.1:{cluster['demo_port']}"]


def test_forged_identity_headers_are_dropped(demo):
    answer = whoami(demo, "-H", "Edge-Jwt-Assertion: forged.token.here",
                    "-H", "X-Forwarded-For: 203.0.113.9", "-H", "X-Forwarded-User: admin",
                    "-H", "x-forwarded-proto: http")
    assert answer["verified"] is True
    headers = {k.lower(): v for k, v in answer["headers"].items()}
    assert len(headers["edge-jwt-assertion"]) == 1
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["https"]
    assert "x-forwarded-user" not in headers


def test_5mb_post_streams_both_ways_byte_exact(cluster, demo, tmp_path):
    app_post_streams_byte_exact(demo, tmp_path)
    # Chunked request body too (curl streams it from stdin).
    body = os.urandom(5 * 1024 * 1024)
    result = subprocess.run(
        ["curl", "-sS", "--cacert", demo["ca"], "--cert", demo["cert"], "--key", demo["key"],
         "-H", "transfer-encoding: chunked", "--data-binary", "@-", demo["url"] + "/api/echo"],
        input=body, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == body


def test_download_streams(demo, tmp_path):
    size = 64 * 1024 * 1024 + 17
    out = tmp_path / "big.bin"
    result = curl(demo, f"/api/bytes/{size}", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size == size
    expected = (bytes(range(256)) * 256)
    with out.open("rb") as f:
        assert f.read(len(expected)) == expected


def test_websocket_echo_through_the_proxy(cluster, demo):
    app_websocket_echoes(cluster["proxy"], "demo", demo, "hello app", os.urandom(300 * 1024))


def test_redirect_to_the_apps_own_uri_is_rewritten(demo):
    result = curl(demo, "/api/redirect", "-D", "-", "-o", "/dev/null")
    head = result.stdout.decode()
    assert " 302 " in head.splitlines()[0]
    assert f"location: {demo['url']}/api/landed".lower() in head.lower()
    result = curl(demo, "/api/redirect", "-L")
    assert result.stdout == b"landed\n"


def test_user_without_matching_app_labels_is_refused(cluster, tmp_path):
    result = run_edge(cluster["bob"], "apps", "login", "secret")
    assert result.returncode != 0
    assert "secret" in result.stderr and "not allow" in result.stderr
    # bob's certificate for demo does not open secret.
    bob_demo = app_login(cluster["bob"], "demo")
    assert whoami(bob_demo)["claims"]["roles"] == ["webonly"]
    url = bob_demo["url"].replace("://demo.", "://secret.")
    result = curl(bob_demo, "/api/whoami", "-i", url=url)
    text = result.stdout.decode()
    assert text.startswith("HTTP/1.1 403"), text
    assert "this certificate is for app demo, not secret" in text
    assert "certificate of bob for app demo used on app secret" in cluster["proxy"].log()


def test_unknown_app_and_missing_certificate_get_clear_pages(cluster, demo):
    port = web_port(cluster["proxy"])
    base = ["curl", "-sS", "-i", "--cacert", demo["ca"]]
    result = subprocess.run(base + [f"https://nope.{PUBLIC_HOST}:{port}/"],
                            capture_output=True, timeout=30)
    assert result.stdout.startswith(b"HTTP/1.1 404"), result.stdout
    assert b"no app named nope" in result.stdout
    # No certificate, not a GET: a program is told to log in to the app.
    result = subprocess.run(base + ["-X", "POST", f"https://demo.{PUBLIC_HOST}:{port}/"],
                            capture_output=True, timeout=30)
    assert result.stdout.startswith(b"HTTP/1.1 401"), result.stdout
    # A user's own certificate is no app certificate.
    home = cluster["alice"]
    result = subprocess.run(base + ["--cert", str(home / "tls.crt"), "--key",
                                    str(home / "tls.key"), f"https://demo.{PUBLIC_HOST}:{port}/"],
                            capture_output=True, timeout=30)
    assert result.stdout.startswith(b"HTTP/1.1 403"), result.stdout


def test_forged_host_is_refused(cluster, demo):
    port = web_port(cluster["proxy"])
    result = curl(demo, "/api/whoami", "-i", "-H", f"Host: secret.{PUBLIC_HOST}:{port}")
    assert result.stdout.startswith(b"HTTP/1.1 421"), result.stdout
    # An app host on a connection made for the web UI.
    result = subprocess.run(
        ["curl", "-sS", "-i", "--cacert", demo["ca"], "-H", f"Host: demo.{PUBLIC_HOST}:{port}",
         f"https://{PUBLIC_HOST}:{port}/v1/ping"], capture_output=True, timeout=30)
    assert result.stdout.startswith(b"HTTP/1.1 421"), result.stdout
    # The web UI itself still answers on the public host.
    result = subprocess.run(["curl", "-sS", "--cacert", demo["ca"],
                             f"https://{PUBLIC_HOST}:{port}/v1/ping"],
                            capture_output=True, timeout=30)
    assert json.loads(result.stdout)["cluster_name"] == "apps"


def test_huge_header_is_refused(cluster, demo):
    result = curl(demo, "/api/whoami", "-i", "-H", "X-Big: " + "a" * 70000)
    assert result.stdout.startswith(b"HTTP/1.1 431"), result.stdout[:200]
    assert "app demo: bad request from 127.0.0.1: message head too large" in \
        cluster["proxy"].log()
    assert whoami(demo)["verified"] is True  # nothing else is affected


def test_bad_apps_get_clear_errors_and_nothing_else_is_affected(cluster):
    bad = app_login(cluster["alice"], "bad")
    result = curl(bad, "/garbage", "-i")
    assert result.stdout.startswith(b"HTTP/1.1 502"), result.stdout
    assert b"invalid response" in result.stdout
    result = curl(bad, "/midbody", "-o", "/dev/null")
    assert result.returncode != 0  # curl: transfer closed with outstanding data
    assert curl(bad, "/fine").stdout == b"ok\n"
    down = app_login(cluster["alice"], "down")
    result = curl(down, "/", "-i")
    assert result.stdout.startswith(b"HTTP/1.1 502"), result.stdout
    assert b"app down is unreachable from its node" in result.stdout
    assert "app bad answered garbage" in cluster["proxy"].log()
    assert "app bad closed the connection in the middle of a response" in \
        cluster["proxy"].log()
    assert "app down is unreachable" in cluster["node"].log()


def test_a_slow_app_gets_a_504_and_nothing_else_waits(cluster):
    bad = app_login(cluster["alice"], "bad")
    slow = subprocess.Popen(
        ["curl", "-sS", "-i", "--max-time", "60", "--cacert", bad["ca"], "--cert", bad["cert"],
         "--key", bad["key"], bad["url"] + "/slow"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        # Meanwhile the same app answers other requests.
        assert curl(bad, "/fine").stdout == b"ok\n"
        out, err = slow.communicate(timeout=60)
    finally:
        stop_process(slow)
    assert out.startswith(b"HTTP/1.1 504"), (out, err)
    assert b"app bad did not answer in time" in out
    assert f"app bad did not answer within {float(SLOW_APP_TIMEOUT)}s" in cluster["proxy"].log()


def test_logout_ends_access_and_closes_websockets(cluster):
    home = cluster["base"] / "carol"
    cluster["proxy"].add_user("carol", "carol-password-1", roles=("access",))
    edge_login(cluster["proxy"], home, "carol", "carol-password-1")
    config = app_login(home, "demo")
    # Keep copies: logout deletes the files, and a copy must be refused too.
    kept = home / "kept"
    kept.mkdir()
    for name in ("cert", "key"):
        copy = kept / Path(config[name]).name
        copy.write_bytes(Path(config[name]).read_bytes())
        config[name] = str(copy)
    host = f"demo.{PUBLIC_HOST}:{web_port(cluster['proxy'])}"
    sock = tls_socket(cluster["proxy"], f"demo.{PUBLIC_HOST}", config)
    try:
        ws = WebSocketClient(sock, host)
        ws.send_text("before")
        assert ws.receive() == "before"
        result = run_edge(home, "apps", "logout", "demo")
        assert result.returncode == 0, result.stderr
        assert "demo" in result.stdout
        sock.settimeout(10)
        with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
            ws.send_text("after")
            ws.receive()
    finally:
        sock.close()
    result = curl(config, "/api/whoami", "-i")
    assert result.stdout.startswith(b"HTTP/1.1 403"), result.stdout
    assert b"session has ended" in result.stdout


def test_a_lock_ends_open_app_connections_and_refuses_new_ones(cluster):
    home = cluster["base"] / "dave"
    cluster["proxy"].add_user("dave", "dave-password-1", roles=("access",))
    edge_login(cluster["proxy"], home, "dave", "dave-password-1")
    config = app_login(home, "demo")
    host = f"demo.{PUBLIC_HOST}:{web_port(cluster['proxy'])}"
    sock = tls_socket(cluster["proxy"], f"demo.{PUBLIC_HOST}", config)
    try:
        ws = WebSocketClient(sock, host)
        ws.send_text("before the lock")
        assert ws.receive() == "before the lock"
        locked_at = time.monotonic()  # edgectl's own start-up included
        cluster["proxy"].edgectl("lock", "--user", "dave", "--message", "incident 7")
        ws.wait_closed(15)
        print(f"\nMEASURED lock -> app WebSocket closed: {time.monotonic() - locked_at:.2f} s")
    finally:
        sock.close()
    assert "of dave: locked: incident 7" in cluster["proxy"].log()
    result = curl(config, "/api/whoami", "-i")
    assert result.stdout.startswith(b"HTTP/1.1 403"), result.stdout
    assert b"incident 7" in result.stdout


def test_app_sessions_are_audited(cluster, demo):
    # alice's demo session (the fixture's) starts; one of hers for secret ends here.
    app_login(cluster["alice"], "secret")
    result = run_edge(cluster["alice"], "apps", "logout", "secret")
    assert result.returncode == 0, result.stderr

    def found():
        events = cluster["proxy"].edgectl_json("audit", "search", "--type", "app.session.start")
        return [e for e in events if e.get("user") == "alice" and e.get("app") == "demo"]

    events = wait_for(found, 20, "app.session.start of alice")
    assert events[0]["remote_addr"] == "127.0.0.1"
    assert events[0]["success"] is True

    def ended():
        events = cluster["proxy"].edgectl_json("audit", "search", "--type", "app.session.end")
        return [e for e in events if e.get("user") == "alice" and e.get("app") == "secret"
                and e.get("reason") == "logout"]

    wait_for(ended, 20, "app.session.end of alice's secret session by logout")


# --- the browser flow (Chromium driven by Playwright) ---------------------------------


@pytest.fixture(scope="module")
def browser(cluster, tmp_path_factory):
    """Chromium that verifies the web port's certificate (the cluster's web CA)."""
    yield from browser_trusting_web_ca(cluster["proxy"], tmp_path_factory)


def test_browser_launches_the_app_through_the_web_session(cluster, browser):
    port = web_port(cluster["proxy"])
    ui = f"https://{PUBLIC_HOST}:{port}"
    app = f"https://demo.{PUBLIC_HOST}:{port}"
    # Chromium trusts the cluster's web CA only; no certificate error is ignored.
    context = browser.new_context()
    try:
        cookie, _ = browser_app_session_ended_by_ui_logout(
            context, ui, app, "alice", "alice-password-1", "/?from=browser")
        assert cookie["domain"] == f"demo.{PUBLIC_HOST}"
        assert not [c for c in context.cookies(f"https://secret.{PUBLIC_HOST}:{port}")
                    if c["name"].startswith("__Host-edge-app")]  # host-only
    finally:
        context.close()
    assert any(e.get("method") == "web" and e.get("user") == "alice" for e in
               cluster["proxy"].edgectl_json("audit", "search", "--type", "app.session.start"))


def test_a_browser_that_does_not_trust_the_web_ca_refuses_the_app_host(cluster, browser,
                                                                         tmp_path):
    from tests import browser as chromium

    untrusting = chromium.launch(browser.browser_type, chromium.nss_home(tmp_path, []))
    try:
        page = untrusting.new_page()
        with pytest.raises(Exception, match="ERR_CERT_AUTHORITY_INVALID"):
            page.goto(f"https://demo.{PUBLIC_HOST}:{web_port(cluster['proxy'])}/")
    finally:
        untrusting.close()


def test_browser_launch_refuses_a_state_it_did_not_set(cluster, demo):
    port = web_port(cluster["proxy"])
    result = subprocess.run(
        ["curl", "-sS", "-i", "--cacert", demo["ca"],
         f"https://demo.{PUBLIC_HOST}:{port}/__edge/launch?state=abc&token=xyz&path=/"],
        capture_output=True, timeout=30)
    assert result.stdout.startswith(b"HTTP/1.1 403"), result.stdout
    assert b"state mismatch" in result.stdout
    # Without a cookie a browser is sent to the launcher with a state cookie.
    result = subprocess.run(
        ["curl", "-sS", "-i", "--cacert", demo["ca"], f"https://demo.{PUBLIC_HOST}:{port}/x"],
        capture_output=True, timeout=30)
    head = result.stdout.decode()
    assert head.startswith("HTTP/1.1 302")
    assert f"Location: https://{PUBLIC_HOST}:{port}/web/launch/demo?state=" in head
    assert "Set-Cookie: __Host-edge-app-state=" in head and "HttpOnly" in head


# --- audit of requests, sessions ending on their own, key rotation -----------------


def test_requests_are_audited_for_the_apps_switched_on(cluster, demo):
    secret = app_login(cluster["alice"], "secret")
    assert curl(secret, "/api/whoami").returncode == 0
    bad = app_login(cluster["alice"], "bad")
    assert curl(bad, "/garbage", "-i").stdout.startswith(b"HTTP/1.1 502")
    result = curl(demo, "/api/whoami?token=hidden", "-X", "GET")
    assert result.returncode == 0, result.stderr
    result = curl(demo, "/api/whoami", "-i", "-H",
                  f"Host: secret.{PUBLIC_HOST}:{web_port(cluster['proxy'])}")
    assert result.stdout.startswith(b"HTTP/1.1 421")

    def found():
        events = cluster["proxy"].edgectl_json("audit", "search", "--type", "app.request")
        return [e for e in events if e.get("user") == "alice"] if \
            any(e.get("status") == 421 for e in events) else None

    events = wait_for(found, 20, "app.request events of alice")
    assert "secret" not in {e["app"] for e in events}  # not switched on for secret
    assert any(e["app"] == "bad" and e["path"] == "/garbage" and e["status"] == 502
               for e in events)
    ok = [e for e in events if e["path"] == "/api/whoami" and e["status"] == 200]
    assert ok and ok[0]["method"] == "GET" and ok[0]["remote_addr"] == "127.0.0.1"
    assert ok[0]["session_id"] and ok[0]["app_cluster"] == "apps"
    assert not any("hidden" in json.dumps(e) for e in events)  # no query strings
    assert any(e["status"] == 421 for e in events)


def test_app_sessions_end_on_expiry_and_on_a_role_change_with_their_connections(cluster):
    """Two sessions with an open WebSocket each, ended at once (waited for
    together): alice's, by its expiry timer (nothing is sent on it); bob's, by
    a change of his role that no longer allows the app. Each end is audited
    with its reason."""
    proxy = cluster["proxy"]
    bob = app_login(cluster["bob"], "demo")
    sockets = []
    try:
        clients = {}
        for name in ("bob", "alice"):
            if name == "bob":
                app, config = "demo", bob
            else:  # its 15 s start now (the CLI alone may take seconds here)
                app = "secret"
                config = expiring = app_login(cluster["alice"], "secret", ttl="15s")
            sock = tls_socket(proxy, f"{app}.{PUBLIC_HOST}", config)
            sockets.append(sock)
            clients[name] = WebSocketClient(sock, f"{app}.{PUBLIC_HOST}:{web_port(proxy)}")
            clients[name].send_text("while allowed")
            assert clients[name].receive() == "while allowed"
        role = cluster["base"] / "webonly-changed.yaml"
        role.write_text(ROLE.replace("team: web", "team: nothing"))
        proxy.edgectl("create", "-f", str(role), "--force")
        try:
            clients["bob"].wait_closed(15)
        finally:
            role.write_text(ROLE)
            proxy.edgectl("create", "-f", str(role), "--force")
        clients["alice"].wait_closed(30)
    finally:
        for sock in sockets:
            sock.close()

    def ended():
        found = {e["user"]: e for e in proxy.edgectl_json(
            "audit", "search", "--type", "app.session.end") if e.get("user") in ("alice", "bob")
            and e.get("app") in ("secret", "demo") and e.get("reason") != "logout"}
        return found if len(found) == 2 else None

    events = wait_for(ended, 20, "app.session.end of alice and bob")
    assert events["alice"]["reason"] == "expired" and events["alice"]["app"] == "secret"
    assert events["bob"]["reason"] == "roles changed: they no longer allow app demo"
    # The app certificate expires with its session (its notAfter may trail the
    # session's expiry by the moments the CLI took to fetch it): once past it,
    # the handshake refuses it.
    not_after = x509.load_pem_x509_certificate(
        Path(expiring["cert"]).read_bytes()).not_valid_after_utc.timestamp()
    wait_for(lambda: time.time() > not_after + 1, 30, "the app certificate's notAfter")
    result = curl(expiring, "/api/whoami", "-i")
    assert result.returncode != 0 and b"certificate expired" in result.stderr, result
    result = curl(bob, "/api/whoami", "-i")
    assert result.stdout.startswith(b"HTTP/1.1 403"), result.stdout


def test_jwt_key_rotation_keeps_old_assertions_verifiable(cluster, demo):
    import jwt

    before = whoami(demo)
    old_token = before["headers"]["Edge-Jwt-Assertion"][0]
    old_kid = jwt.get_unverified_header(old_token)["kid"]
    rotated = cluster["proxy"].edgectl_json("apps", "rotate-jwt-key")
    new_kid = rotated["kid"]
    assert new_kid != old_kid
    assert {k["kid"]: k["status"] for k in rotated["keys"]} == {
        old_kid: "retired", new_kid: "signing"}

    def new_assertion():
        answer = whoami(demo)
        token = answer["headers"]["Edge-Jwt-Assertion"][0]
        return answer if jwt.get_unverified_header(token)["kid"] == new_kid else None

    answer = wait_for(new_assertion, 20, "assertions signed with the new key")
    assert answer["verified"] is True  # the app fetched the JWKS again for the new kid
    result = subprocess.run(["curl", "-sS", "--cacert", demo["ca"],
                             f"https://{PUBLIC_HOST}:{web_port(cluster['proxy'])}"
                             "/.well-known/jwks.json"], capture_output=True, timeout=30)
    jwks = {k["kid"]: k for k in json.loads(result.stdout)["keys"]}
    assert set(jwks) == {old_kid, new_kid}
    claims = jwt.decode(old_token, jwt.PyJWK(jwks[old_kid]).key, algorithms=["ES256"],
                        audience=f"http://127.0.0.1:{cluster['demo_port']}")
    assert claims["username"] == "alice"
    text = cluster["proxy"].edgectl("apps", "jwt-keys").stdout
    assert old_kid in text and "retired" in text and new_kid in text
    rotation = cluster["proxy"].edgectl_json("audit", "search", "--type",
                                             "app.jwt_key.rotated")
    assert rotation and rotation[-1]["kid"] == new_kid
