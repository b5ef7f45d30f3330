"""App assertions with two proxies on one PostgreSQL database, end to end.

Two ``twistd edgeproxy`` processes (A, B) share a throw-away PostgreSQL
(edgeaccess.devpostgres) and one CA key (``--ca-key-file``); the app
assertion keys are sealed with it in the shared backend
(edgeaccess.apps.jwt). A tunnelled node joined through A publishes the demo
app, which verifies every ``Edge-Jwt-Assertion`` against A's JWKS. A user
reaches the app through A and through B with curl and app certificates:
both assertions verify and name the same key; a rotation made through B
(``edgectl apps rotate-jwt-key``) is what A signs with next.
"""

from __future__ import annotations

import json
import os

import pytest

from edgeaccess.devcluster import ProxyProcess, join_node, stop_process, wait_for
from edgeaccess.devpostgres import BIN, PostgresServer
from tests.apps.appkit import PUBLIC_HOST, app_login, curl, edge_login, start_demo_app, web_listen

pytestmark = pytest.mark.skipif(not os.path.exists(BIN), reason="PostgreSQL 15 is not installed")

CLUSTER = "apps-ha"
PASSWORD = "apps-ha-pass-1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from edgeaccess.pki import castore

    base = tmp_path_factory.mktemp("apps-ha")
    ca_key = base / "ca.key"
    ca_key.write_bytes(castore.format_ca_key(os.urandom(32)))
    ca_key.chmod(0o600)
    database = PostgresServer()
    proxies: dict[str, ProxyProcess] = {}
    demo = node = None
    try:
        url = database.create_database()
        for name in ("a", "b"):
            proxies[name] = ProxyProcess(
                base / name, base / f"{name}.log", cluster=CLUSTER,
                extra_args=["--backend", url, "--ca-key-file", str(ca_key),
                            "--public-addr", PUBLIC_HOST, "--tunnel-public-addr", "127.0.0.1"])
            proxies[name].start()
        a, b = proxies["a"], proxies["b"]
        for proxy in (a, b):
            wait_for(lambda: "joined, tunnel address" in proxy.log(), 20,
                     f"proxy {proxy.directory.name} to see the other", proxy.process)
        demo, demo_port = start_demo_app(a)
        node, _ = join_node(a, base, "appnode", tunnel=True, auth_server=web_listen(a),
                            extra_args=["--app", f"name=demo,uri=http://127.0.0.1:{demo_port}"])
        wait_for(lambda: "tunnel up from node:appnode" in b.log(), 30,
                 "the node's tunnel to proxy b", node.process)
        a.add_user("alice", PASSWORD, roles=("access",))
        homes = {name: edge_login(proxy, base / f"alice-{name}", "alice", PASSWORD)
                 for name, proxy in proxies.items()}
        yield {"a": a, "b": b, "homes": homes, "ca_key": ca_key}
    except Exception:
        for proxy in proxies.values():
            print(proxy.log()[-4000:])
        raise
    finally:
        if node is not None:
            node.stop()
        stop_process(demo)
        for proxy in proxies.values():
            proxy.stop()
        database.stop()


def whoami(config: dict) -> dict:
    result = curl(config, "/api/whoami")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assertion_kid(answer: dict) -> str:
    import jwt

    (token,) = {k.lower(): v for k, v in answer["headers"].items()}["edge-jwt-assertion"]
    return jwt.get_unverified_header(token)["kid"]


def test_both_proxies_sign_with_the_one_sealed_key_and_follow_a_rotation(cluster):
    a, b = cluster["a"], cluster["b"]
    configs = {name: app_login(home, "demo") for name, home in cluster["homes"].items()}
    assert configs["b"]["url"].endswith(f":{web_listen(b).rpartition(':')[2]}")
    answers = {name: whoami(config) for name, config in configs.items()}
    for name, answer in answers.items():
        # The app checks against A's JWKS only: B's assertion verifies too.
        assert answer["verified"] is True, (name, answer)
        assert answer["claims"]["sub"] == "alice" and answer["claims"]["iss"] == CLUSTER
    kid = assertion_kid(answers["a"])
    assert assertion_kid(answers["b"]) == kid
    # One proxy created the key (sealed), the other loaded it.
    created = [p for p in (a, b) if "created the app assertion signing key" in p.log()]
    assert len(created) == 1
    assert [k["kid"] for k in b.edgectl_json("apps", "jwt-keys")] == [kid]

    rotated = b.edgectl_json("apps", "rotate-jwt-key")
    new_kid = rotated["kid"]
    assert new_kid != kid

    def a_signs_with_the_new_key():
        answer = whoami(configs["a"])
        return answer if assertion_kid(answer) == new_kid else None

    answer = wait_for(a_signs_with_the_new_key, 30, "proxy a to sign with the rotated key",
                      interval=0.5)
    assert answer["verified"] is True
    for proxy in (a, b):
        assert "cannot load the app assertion keys" not in proxy.log()
