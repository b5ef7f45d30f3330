"""What the two command-line clients share: tables, errors, exit codes."""

from __future__ import annotations

import json
import sys

from edgeaccess import errors


def print_table(headers: list[str], rows: list[list], out=None) -> None:
    out = out or sys.stdout
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
        if n == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


def print_json(value, out=None) -> None:
    out = out or sys.stdout
    out.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def run(main_function, argv) -> int:
    """Run a command; turn our errors into one line on stderr and exit 1."""
    try:
        return main_function(argv) or 0
    except errors.EdgeError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except BrokenPipeError:
        return 1
    except OSError as e:
        sys.stderr.write(f"error: {e.strerror or e}: {getattr(e, 'filename', '') or ''}\n")
        return 1


def format_labels(labels: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items()))
