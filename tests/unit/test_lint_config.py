"""The lint habit holds together: CI runs it, and the pre-commit hooks run the same versions.

`make lint` installs ruff and mypy at the Makefile's pins; .pre-commit-config.yaml pins them
again for its hooks. A bump in one place only would let the two disagree about what is clean.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAKEFILE = (ROOT / "Makefile").read_text()
PRE_COMMIT = (ROOT / ".pre-commit-config.yaml").read_text()


def makefile_pin(name: str) -> str:
    found = re.search(rf"^{name}_VERSION := (\S+)$", MAKEFILE, flags=re.MULTILINE)
    assert found, f"Makefile: no {name}_VERSION"
    return found.group(1)


def test_pre_commit_pins_the_versions_make_lint_installs():
    for tool in ("ruff", "mypy"):
        pins = set(re.findall(rf'"{tool}==([^"]+)"', PRE_COMMIT))
        assert pins == {makefile_pin(tool.upper())}, tool


def test_make_lint_runs_ruff_and_mypy_over_plugins_dags_and_the_example():
    recipe = MAKEFILE.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    for command in ("ruff check plugins dags example_dags", "ruff format --check plugins dags example_dags", "mypy --python-executable"):
        assert command in recipe, command
    mypy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert mypy["files"] == ["plugins/usage_agg", "dags", "example_dags"]
    assert not mypy.get("ignore_missing_imports"), "name the untyped module in an override instead"


def test_ci_lints_before_it_tests():
    lines = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith("make ")]
    assert lines.index("make lint") < lines.index("make test")


def test_make_mutation_copies_every_file_the_unit_and_integration_tests_read():
    """mutmut runs those tiers in a copy of the tree: a file they read that is not copied fails
    its clean run before any mutant (as the Makefile's own pins once did)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    read = {"pyproject.toml", *project["project"]["license-files"]}
    for tier in ("tests", "tests/unit", "tests/integration"):
        for test_file in (ROOT / tier).glob("*.py"):
            read |= {name.split("/")[0] for name in re.findall(r'ROOT / "([\w./-]+)"', test_file.read_text())}
    recipe = MAKEFILE.split("\nmutation:", 1)[1].split("\n\n", 1)[0]
    copied = set(recipe.split("cp -r ", 2)[2].split("build/mutation/", 1)[0].replace("\\\n", " ").split())
    assert read - {"pyproject.toml", "tests"} <= set(project["tool"]["mutmut"]["also_copy"])  # mutmut copies those
    assert read <= copied
