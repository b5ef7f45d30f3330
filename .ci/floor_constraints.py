"""Print a pip constraints file pinning every dependency setup.cfg declares
at its floor (``name >= X`` becomes ``name==X``).

``make test-floor`` installs the project with it (``pip install --constraint``)
and runs the unit tests: the floors setup.cfg promises are then the versions
the tests ran on. It reads ``install_requires`` and every extra, so a new
dependency is covered as soon as it is declared; a dependency declared
without a ``>=`` floor is an error (it would promise every version).

``--extras`` prints the names of every extra (comma-separated), for the
install; ``--check`` (run by the floor venv's Python after the install) confirms that
every dependency is installed at exactly its floor.

Standard library only (it runs before anything is installed).
"""

from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

#: ``name[extras] >= 1.2`` plus further specifiers (``, < 2``) and a marker.
_REQUIREMENT = re.compile(
    r"""^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*
        (?P<specifiers>[^;]*)(;.*)?$""",
    re.VERBOSE,
)
_FLOOR = re.compile(r">=\s*(?P<version>[0-9][A-Za-z0-9.+!-]*)")


def extras(setup_cfg: Path) -> list[str]:
    """The names of the extras setup.cfg declares."""
    parser = configparser.ConfigParser()
    parser.read(setup_cfg, encoding="utf-8")
    if not parser.has_section("options.extras_require"):
        return []
    return [name for name, _ in parser.items("options.extras_require")]


def requirements(setup_cfg: Path) -> list[str]:
    """Every requirement line of ``install_requires`` and of every extra."""
    parser = configparser.ConfigParser()
    parser.read(setup_cfg, encoding="utf-8")
    lines = parser.get("options", "install_requires", fallback="").splitlines()
    if parser.has_section("options.extras_require"):
        for _, value in parser.items("options.extras_require"):
            lines.extend(value.splitlines())
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def floor_pins(lines: list[str]) -> list[str]:
    """``name==floor`` for each requirement (names normalized, duplicates
    with different floors refused)."""
    pins: dict[str, str] = {}
    for line in lines:
        match = _REQUIREMENT.match(line)
        if match is None:
            raise ValueError(f"cannot read requirement {line!r}")
        floor = _FLOOR.search(match["specifiers"])
        if floor is None:
            raise ValueError(f"requirement without a >= floor: {line!r}")
        name = re.sub(r"[-_.]+", "-", match["name"]).lower()
        version = floor["version"]
        if pins.get(name, version) != version:
            raise ValueError(f"two floors for {name}: {pins[name]} and {version}")
        pins[name] = version
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def _release(version: str) -> tuple[int, ...]:
    """``"8.0"`` and ``"8.0.0"`` compare equal; anything non-numeric stays text."""
    parts = [int(p) if p.isdigit() else p for p in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)  # type: ignore[arg-type]


def check_installed(pins: list[str]) -> list[str]:
    """Where the running interpreter's installed versions differ from the pins."""
    from importlib import metadata

    wrong = []
    for pin in pins:
        name, floor = pin.split("==")
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{name}: not installed (floor {floor})")
            continue
        if _release(installed) != _release(floor):
            wrong.append(f"{name}: {installed} installed, floor {floor}")
    return wrong


def main(argv: list[str]) -> int:
    args = argv[1:]
    check = "--check" in args
    list_extras = "--extras" in args
    args = [a for a in args if a not in ("--check", "--extras")]
    setup_cfg = Path(args[0]) if args else Path("setup.cfg")
    if list_extras:
        print(",".join(extras(setup_cfg)))
        return 0
    try:
        pins = floor_pins(requirements(setup_cfg))
    except ValueError as error:
        print(f"{setup_cfg}: {error}", file=sys.stderr)
        return 1
    if check:
        wrong = check_installed(pins)
        for line in wrong:
            print(f"not at its floor: {line}", file=sys.stderr)
        if not wrong:
            print(f"{len(pins)} dependencies installed at their floors: {' '.join(pins)}")
        return 1 if wrong else 0
    print(f"# generated from {setup_cfg} by .ci/floor_constraints.py: do not edit")
    print("\n".join(pins))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
