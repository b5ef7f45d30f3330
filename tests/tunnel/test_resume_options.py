"""``--resume-budget`` on both daemons: parsed, bounded, off with 0, from YAML too."""

from __future__ import annotations

import pytest
from twisted.python import usage

from edgeaccess.config import parse_seconds
from edgeaccess.node.tap import Options as NodeOptions
from edgeaccess.proxy.tap import Options as ProxyOptions

NODE = ["--data-dir", "/tmp/n", "--auth-server", "proxy:3080", "--nodename", "n1"]
PROXY = ["--data-dir", "/tmp/p", "--cluster-name", "c1"]


@pytest.mark.parametrize("text, seconds", [
    ("60", 60.0), ("60s", 60.0), ("2m", 120.0), ("1.5", 1.5), (" 90S ", 90.0), ("0", 0.0),
])
def test_durations_are_read_in_seconds_or_minutes(text, seconds):
    assert parse_seconds(text, "resume-budget", high=3600) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-1", "nan", "2h", "3601", "inf"])
def test_bad_durations_name_the_option(text):
    with pytest.raises(usage.UsageError, match="--resume-budget"):
        parse_seconds(text, "resume-budget", high=3600)


@pytest.mark.parametrize("make, base", [(NodeOptions, NODE), (ProxyOptions, PROXY)])
def test_both_daemons_default_to_60_seconds_and_take_the_flag(make, base):
    options = make()
    options.parseOptions(base)
    assert options["resume-budget"] == 60.0
    options = make()
    options.parseOptions([*base, "--resume-budget", "2m"])
    assert options["resume-budget"] == 120.0
    with pytest.raises(usage.UsageError):
        make().parseOptions([*base, "--resume-budget", "forever"])


def test_the_budget_comes_from_the_config_file_too(tmp_path):
    config = tmp_path / "node.yaml"
    config.write_text("resume-budget: 0\n")
    options = NodeOptions()
    options.parseOptions([*NODE, "--config", str(config)])
    assert options["resume-budget"] == 0.0
