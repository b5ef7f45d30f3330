""".ci/floor_constraints.py: the constraints ``make test-floor`` installs with."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load():
    spec = importlib.util.spec_from_file_location(
        "floor_constraints", ROOT / ".ci" / "floor_constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAMPLE = """\
[options]
install_requires =
    twisted[tls,conch] >= 26.10.0
    zope.interface >= 8.0
    PyYAML>=6.0.1, <7
    psycopg[binary] >= 3.2 ; python_version >= "3.11"

[options.extras_require]
test =
    pytest >= 8.0.0
postgres =
    psycopg >= 3.2
"""


def test_every_floor_of_every_section_becomes_a_pin(tmp_path):
    module = load()
    setup_cfg = tmp_path / "setup.cfg"
    setup_cfg.write_text(SAMPLE)
    pins = module.floor_pins(module.requirements(setup_cfg))
    assert pins == ["psycopg==3.2", "pytest==8.0.0", "pyyaml==6.0.1", "twisted==26.10.0",
                    "zope-interface==8.0"]
    assert module.extras(setup_cfg) == ["test", "postgres"]


@pytest.mark.parametrize("line, error", [
    ("klein", "without a >= floor"),
    ("klein < 25", "without a >= floor"),
    ("klein == 24.8.0", "without a >= floor"),
])
def test_a_dependency_without_a_floor_is_refused(line, error):
    module = load()
    with pytest.raises(ValueError, match=error):
        module.floor_pins([line])


def test_two_different_floors_for_one_dependency_are_refused():
    module = load()
    with pytest.raises(ValueError, match="two floors for psycopg"):
        module.floor_pins(["psycopg >= 3.2", "psycopg[binary] >= 3.1"])


def test_the_project_s_setup_cfg_pins_what_this_venv_may_check(capsys):
    module = load()
    assert module.main(["floor_constraints.py", str(ROOT / "setup.cfg")]) == 0
    pins = capsys.readouterr().out.splitlines()[1:]
    assert "twisted==26.10.0" in pins and any(p.startswith("cryptography==") for p in pins)
    # --check compares with what is installed: every pinned package is there.
    wrong = module.check_installed(pins)
    assert all("installed, floor" in line for line in wrong), wrong
