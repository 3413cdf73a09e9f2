"""The floors in pyproject.toml are tested: the lowest environment runs on exactly them.

`make test` runs the unit and DAG tiers in a third environment, `.venv-airflow-lowest`,
installed from `constraints/airflow-lowest.txt`, which `make constraints` resolves with
uv's `--resolution lowest-direct`: every direct dependency at its floor.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.unit.test_constraints import CONSTRAINTS, pins

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: What a user installs: the package and its optional integrations (the test tools are not floors).
EXTRAS = ("statsd", "openlineage", "celery")


def requirements() -> list[Requirement]:
    lines = list(PROJECT["dependencies"])
    for extra in EXTRAS:
        lines += PROJECT["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def floor(requirement: Requirement) -> Version:
    floors = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
    assert len(floors) == 1, f"{requirement}: one >= floor expected"
    return floors[0]


def test_every_dependency_has_a_floor_the_lowest_environment_pins():
    lowest = pins(CONSTRAINTS / "airflow-lowest.txt")
    for requirement in requirements():
        name = requirement.name.lower()
        assert name in lowest, name
        assert Version(lowest[name]) == floor(requirement), f"{requirement} but the lowest environment has {lowest[name]}"


def test_python_requires_is_the_python_every_environment_is_resolved_for():
    python_floor = floor(Requirement(f"python{PROJECT['requires-python']}"))
    makefile = (ROOT / "Makefile").read_text()
    resolved_for = set(re.findall(r"--python-version (\S+)", makefile))
    assert resolved_for == {str(python_floor)}  # the oldest Python allowed is the one the pins are for


ENVIRONMENT = re.fullmatch(r"\.venv-airflow-(.+)", Path(sys.prefix).name)


@pytest.mark.skipif(ENVIRONMENT is None, reason="not one of the Makefile's environments")
def test_this_environment_runs_what_its_constraints_file_pins():
    assert ENVIRONMENT is not None
    pinned = pins(CONSTRAINTS / f"airflow-{ENVIRONMENT.group(1)}.txt")
    for requirement in requirements():
        name = requirement.name.lower()
        assert version(name) == pinned[name], name
    if ENVIRONMENT.group(1) == "lowest":  # and on the oldest Python allowed
        python_floor = floor(Requirement(f"python{PROJECT['requires-python']}"))
        assert Version(f"{sys.version_info.major}.{sys.version_info.minor}") == python_floor
