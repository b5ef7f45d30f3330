"""Command-line pieces: ``edgectl audit search|verify`` and ``edge play``."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from urllib.parse import quote, urlencode

from edgeaccess import cli, errors
from edgeaccess.audit.http import parse_since
from edgeaccess.audit.recording import check_session_id, parse_cast

#: Longest pause ``edge play`` keeps between two frames (at speed 1).
MAX_IDLE = 5.0


def add_edgectl_audit(sub) -> None:
    """Add ``audit search`` and ``audit verify`` to edgectl's subcommands."""
    audit = sub.add_parser("audit", help="search and verify the audit log").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    search = audit.add_parser("search", help="find audit events")
    search.add_argument("--since", help="from this long ago (1h, 30m) or an RFC 3339 time")
    search.add_argument("--until", help="up to this long ago or an RFC 3339 time")
    search.add_argument("--type", action="append", default=[],
                        help="event type (repeatable; 'session.' matches a family)")
    search.add_argument("--user", help="user name")
    search.add_argument("--node", help="node name or id")
    search.add_argument("--session", help="session id")
    search.add_argument("--limit", type=int, help="at most this many (the newest)")
    audit.add_parser("verify", help="check the hash chain of the audit log")


def run_edgectl_audit(args, client, as_json: bool) -> int:
    """Run ``edgectl audit ACTION``; returns the exit status."""
    out = sys.stdout
    if args.action == "verify":
        result = client.get("/v1/audit/verify")
        if as_json:
            cli.print_json(result)
        elif result["ok"]:
            out.write(f"The audit chain is intact: {result['events']} events, "
                      f"head at {result['head_seq']}.\n")
        if not result["ok"]:
            first = result["first_problem"]
            if not as_json:
                for problem in result["problems"][:20]:
                    out.write(f"{problem['kind']} at {problem['seq']}: {problem['message']}\n")
            raise errors.EdgeError(f"the audit chain is broken at event {first['seq']} "
                                   f"({first['kind']}): {first['message']}")
        return 0
    now = datetime.now(timezone.utc)
    query = []
    if args.since:
        query.append(("since", parse_since(args.since, now)))
    if args.until:
        query.append(("until", parse_since(args.until, now)))
    for name in ("user", "node", "session", "limit"):
        value = getattr(args, name)
        if value is not None:
            query.append((name, str(value)))
    query += [("type", t) for t in args.type]
    found = client.get("/v1/audit/events" + (f"?{urlencode(query)}" if query else ""))
    if as_json:
        cli.print_json(found)
        return 0
    cli.print_table(["Time", "Event", "User", "Node", "Session", "Details"], [
        [e.get("time", ""), e.get("event", ""), e.get("user") or "", e.get("node") or "",
         (e.get("session_id") or "")[:8], _details(e)] for e in found])
    return 0


_SHOWN = {"id", "event", "time", "cluster", "user", "node", "node_id", "session_id"}


def _details(event: dict) -> str:
    parts = []
    for key in sorted(event):
        if key in _SHOWN:
            continue
        value = event[key]
        parts.append(f"{key}={value if isinstance(value, str) else json.dumps(value)}")
    return " ".join(parts)[:120]


def add_edge_play(sub) -> None:
    """Add ``edge play SESSION_ID [--speed N] [--format cast]``."""
    play = sub.add_parser("play", help="replay a recorded session")
    play.add_argument("session_id")
    play.add_argument("--speed", type=float, default=1.0, help="replay speed (default 1)")
    play.add_argument("--format", choices=("text", "cast"), default="text",
                      help="cast: write the asciicast v2 recording to stdout")


def run_edge_play(args, client, sleep=time.sleep, out=None) -> int:
    """Fetch the recording from the proxy and replay (or dump) it."""
    out = out or sys.stdout
    check_session_id(args.session_id)
    if not args.speed > 0:
        raise errors.BadRequest("--speed must be more than 0")
    answer = client.get(f"/v1/recordings/{quote(args.session_id, safe='')}")
    cast = answer["cast"]
    if args.format == "cast":
        out.write(cast)
        out.flush()
        return 0
    _header, frames = parse_cast(cast.encode("utf-8"))
    previous = 0.0
    for when, kind, data in frames:
        if kind != "o":
            continue
        delay = min(max(0.0, float(when) - previous), MAX_IDLE) / args.speed
        previous = float(when)
        if delay > 0:
            out.flush()
            sleep(delay)
        out.write(data)
    out.flush()
    if not answer.get("complete"):
        sys.stderr.write("\r\n(the recording is not complete yet)\r\n")
    return 0
