"""Every test carries its tier's marker, taken from its folder (tests/<tier>/).

tests/conftest.py marks each collected test with the folder it is in, so no test file has to
remember to, and a tier can be chosen with ``-m`` (``-m unit``, ``-m "integration and not slow"``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

from tests.conftest import ROOT, TESTS, TIERS, pytest_collection_modifyitems


def declared_markers() -> set[str]:
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    return {line.split(":", 1)[0] for line in ini["markers"]}


class Collected:
    """What the hook reads of a collected test: its path; and what it does to it: add markers."""

    def __init__(self, path):
        self.path = path
        self.markers: list[str] = []

    def add_marker(self, marker: str) -> None:
        self.markers.append(marker)


def test_every_folder_of_tests_is_a_declared_tier():
    folders = {path.relative_to(TESTS).parts[0] for path in TESTS.rglob("test_*.py")}
    assert folders == set(TIERS)
    assert {*TIERS, "slow"} <= declared_markers()


def test_every_test_file_gets_its_folders_marker():
    items = [Collected(path) for path in sorted(TESTS.rglob("test_*.py"))]
    pytest_collection_modifyitems(None, items)
    wrong = [
        f"{item.path.relative_to(TESTS)}: {item.markers}"
        for item in items
        if item.markers != [item.path.relative_to(TESTS).parts[0]]
    ]
    assert wrong == []


def test_pytest_selects_a_tier_by_its_marker_without_the_slow_tests_and_with_one_driver():
    """The hook marks the tests before ``-m`` deselects (a file of each of two tiers, collected only);
    USAGE_AGG_PG_DRIVERS narrows the integration tier's drivers."""
    files = ["tests/unit/test_keys.py", "tests/integration/test_windows.py"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "integration and not slow", *files],
        cwd=ROOT, env={**os.environ, "USAGE_AGG_PG_DRIVERS": "psycopg"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert collected, done.stdout[-3000:]
    assert all(line.startswith("tests/integration/test_windows.py::") for line in collected), collected
    assert not [line for line in collected if "in_every_zone" in line]  # marked slow
    assert not [line for line in collected if "[psycopg2" in line]
    assert [line for line in collected if "[psycopg" in line]
