"""A pytest plugin that runs the collected tests in another order, to find
tests that rely on state an earlier test made (a user, a role, a session, a
running process).

    .venv/bin/python -m pytest -p no:randomly -p tests.reorder --test-order reverse \\
        tests/integration/test_kube_e2e.py

``--test-order reverse`` runs every test before those that preceded it in
file order (a test that needs an earlier one fails); ``shuffle:SEED`` a
reproducible random order. Run one module at a time: the module's fixtures
are shared by its tests whatever the order, but a reordered session mixes
modules' fixtures.
"""

from __future__ import annotations

import random


def pytest_addoption(parser) -> None:
    parser.addoption("--test-order", default="file",
                     help="file (default), reverse, or shuffle:SEED")


def pytest_collection_modifyitems(config, items) -> None:
    order = config.getoption("--test-order")
    if order == "reverse":
        items.reverse()
    elif order.startswith("shuffle:"):
        random.Random(order.partition(":")[2]).shuffle(items)
    elif order != "file":
        raise ValueError(f"--test-order must be file, reverse or shuffle:SEED, not {order!r}")


def pytest_report_header(config) -> str | None:
    order = config.getoption("--test-order")
    return None if order == "file" else f"test order: {order}"
