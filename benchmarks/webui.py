"""Web UI: page paint times and web terminal keystroke echo, measured in Chromium.

``python -m benchmarks webui [--runs 20] [--keys 100] [--nodes 1000]`` starts a
proxy, a tunnelled node and a LAN node (real processes, loopback), then drives
Debian's Chromium with Playwright:

``login-page``
    first contentful paint of ``/`` for a visitor without a session (a new
    page each run; the browser's own ``paint`` timing, from navigation start);
``nodes-page``
    first contentful paint and load end of ``/web/`` listing ``--nodes``
    nodes (records written to the proxy's backend as heartbeats would write
    them, so the page renders that many rows);
``browser-floor``
    the baseline of the same run: first paint of a one-line page that
    Playwright hands to Chromium itself (no network, no server);
``static-file``
    another baseline of the same run: fetch of a small static file from the page
    (TLS, HTTP and the browser, nothing of ours);
``echo-tunnel`` / ``echo-lan``
    keystroke echo in the web terminal: from the key's message leaving the page
    to the echoed output arriving in it (``window.edgeTerminal.latencies``,
    measured with ``performance.now()``), one key at a time, to the tunnelled
    node and, as the same-run baseline, to the LAN node.

Prints one JSON object per measure (p50, p95, max in milliseconds) and the
goals (<= 300 ms for the pages, p95 <= 25 ms for the tunnelled echo).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from edgeaccess.devcluster import ProxyProcess, join_node

PASSWORD = "bench-web-password"


def _percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"n": len(values), "p50_ms": round(statistics.median(ordered), 2),
            "p95_ms": round(p95, 2), "max_ms": round(ordered[-1], 2)}


def _add_nodes(proxy: ProxyProcess, count: int) -> None:
    """``count`` node records in the proxy's SQLite backend (what heartbeats store)."""
    now = datetime.now(timezone.utc)
    db = sqlite3.connect(proxy.data_dir / "backend.sqlite3", timeout=30)
    with db:
        (revision,) = db.execute("SELECT value FROM revision_counter").fetchone()
        rows = []
        for i in range(count):
            node_id = str(uuid.uuid4())
            record = {"name": f"bench-{i:04d}", "uuid": node_id, "cluster": proxy.cluster,
                      "address": f"127.0.0.1:{20000 + i}", "version": "bench",
                      "labels": {"env": ["dev", "prod", "staging"][i % 3],
                                 "rack": f"r{i % 40}", "team": f"t{i % 7}"},
                      "last_heartbeat": now.isoformat().replace("+00:00", "Z")}
            rows.append((f"/nodes/{node_id}", json.dumps(record).encode(),
                         (now + timedelta(minutes=5)).timestamp(), revision + i + 1))
        db.executemany("INSERT INTO items (key, value, expires, revision) VALUES (?, ?, ?, ?)",
                       rows)
        db.execute("UPDATE revision_counter SET value = ?", (revision + count,))
    db.close()


def _paint(page) -> float:
    """First contentful paint, from navigation start (the entry appears once
    the frame is painted)."""
    return _wait(page, "(performance.getEntriesByName('first-contentful-paint')[0] || {})"
                       ".startTime", 10)


def _wait(page, expression: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(expression)
        time.sleep(0.005)


def _echo(page, url: str, target: str, keys: int) -> list[float]:
    page.goto(f"{url}/web/ssh/{target}")
    page.wait_for_selector("#term-status.connected", timeout=30000)
    # The shell is up when its prompt has painted.
    _wait(page, "window.edgeTerminal.text().trim().length > 0")
    page.keyboard.type("cat\n")
    time.sleep(0.5)
    page.evaluate("window.edgeTerminal.latencies.length = 0")
    for i in range(keys):
        page.keyboard.press("x")
        _wait(page, f"window.edgeTerminal.latencies.length >= {i + 1}")
    latencies = page.evaluate("window.edgeTerminal.latencies.slice()")
    page.close()  # the web terminal ends with its page
    return latencies[:keys]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks webui")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=1000)
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="bench-webui-"))
    proxy = ProxyProcess(base / "proxy", base / "proxy.log", cluster="bench")
    nodes = []
    try:
        proxy.start()
        proxy.add_user("bench", PASSWORD, roles=("access",), logins=("root",))
        # Node records go straight into the stopped proxy's SQLite file: the
        # running proxy reads nodes from its watch-fed cache, which sees only
        # writes made through the backend.
        proxy.stop()
        _add_nodes(proxy, args.nodes)
        proxy.start()
        nodes.append(join_node(proxy, base, "tnode", tunnel=True, labels="env=dev")[0])
        nodes.append(join_node(proxy, base, "lannode", labels="env=dev")[0])
        url = f"https://{proxy.addr('web')}"
        results = []
        # The browser trusts the cluster's web CA and verifies the page, as a
        # user's would (tests/browser.py: an NSS database in a home of its own).
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import browser as browsers

        with browsers.browser_trusting(base / "browser-home",
                                       [browsers.web_ca_of(proxy)]) as browser:
            anonymous = browser.new_context(viewport={"width": 1280, "height": 800})
            # The browser's own floor in this run: a one-line page handed to
            # Chromium by Playwright (no network, no server).
            floor = []
            for _ in range(args.runs):
                page = anonymous.new_page()
                page.route(url + "/__floor", lambda route: route.fulfill(
                    status=200, content_type="text/html", body="<!doctype html><p>floor"))
                page.goto(url + "/__floor")
                floor.append(_paint(page))
                page.close()
            results.append({"measure": "browser-floor", "what": "first contentful paint of a "
                            "one-line page without network (baseline)", **_percentiles(floor)})
            paints = []
            for _ in range(args.runs):
                page = anonymous.new_page()
                page.goto(url + "/")
                paints.append(_paint(page))
                page.close()
            results.append({"measure": "login-page", "what": "first contentful paint",
                            "goal_ms": 300, **_percentiles(paints)})

            ctx = browser.new_context(viewport={"width": 1280, "height": 800})
            page = ctx.new_page()
            page.goto(url + "/")
            page.fill("#user", "bench")
            page.fill("#password", PASSWORD)
            page.click("#login")
            page.wait_for_selector("#nodes")
            shown = page.locator("#nodes .row[data-node]").count()
            paints, loads, statics, ttfbs = [], [], [], []
            for _ in range(args.runs):
                page = ctx.new_page()
                page.goto(url + "/web/")
                paints.append(_paint(page))
                loads.append(page.evaluate(
                    "performance.getEntriesByType('navigation')[0].loadEventEnd"))
                ttfbs.append(page.evaluate(
                    "performance.getEntriesByType('navigation')[0].responseStart"))
                statics.append(page.evaluate(
                    "(async () => { const t = performance.now();"
                    " await (await fetch('/web/static/player.js', {cache: 'no-store'})).text();"
                    " return performance.now() - t; })()"))
                page.close()
            results.append({"measure": "nodes-page", "what": "first contentful paint",
                            "rows": shown, "goal_ms": 300, **_percentiles(paints)})
            results.append({"measure": "nodes-page-load", "what": "load event end",
                            "rows": shown, **_percentiles(loads)})
            results.append({"measure": "nodes-page-ttfb", "what": "first byte of the page "
                            "(the proxy's part)", "rows": shown, **_percentiles(ttfbs)})
            results.append({"measure": "static-file", "what": "fetch of a small static file "
                            "from the page (baseline)", **_percentiles(statics)})
            for measure, target in (("echo-tunnel", "root@tnode.bench"),
                                    ("echo-lan", "root@lannode.bench")):
                latencies = _echo(ctx.new_page(), url, target, args.keys)
                results.append({"measure": measure, "what": "keystroke echo in the browser",
                                **({"goal_p95_ms": 25} if measure == "echo-tunnel" else {}),
                                **_percentiles(latencies)})
        load = Path("/proc/loadavg").read_text().split()[0]
        for result in results:
            print(json.dumps({**result, "loadavg": float(load)}), flush=True)
        return 0
    finally:
        for node in nodes:
            node.stop()
        proxy.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
