"""What the package says about itself holds: its metadata, its type information, its changelog.

The metadata is pyproject.toml's [project] table; the changelog relates the package version
(usage_agg.__version__) to the schema version it writes (usage_agg.schema.SCHEMA_VERSION).
Both versions are read from the sources, not from an installed copy.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
PACKAGE = ROOT / "plugins" / "usage_agg"
CHANGELOG = (ROOT / "CHANGELOG.md").read_text()


def constant(path: Path, name: str):
    """A module-level constant, read from the source without importing it."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path.name}: no {name}")


PACKAGE_VERSION = constant(PACKAGE / "__init__.py", "__version__")
SCHEMA_VERSION = constant(PACKAGE / "schema.py", "SCHEMA_VERSION")


def test_classifiers_say_airflow_provider_and_typed():
    classifiers = set(PROJECT["classifiers"])
    assert {"Framework :: Apache Airflow", "Framework :: Apache Airflow :: Provider", "Typing :: Typed"} <= classifiers


def test_python_classifiers_fit_requires_python_and_name_its_floor():
    allowed = SpecifierSet(PROJECT["requires-python"])
    pythons = [c.rsplit(" :: ", 1)[1] for c in PROJECT["classifiers"] if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert pythons, "no Python version classifier"
    assert all(Version(p) in allowed for p in pythons), pythons
    floor = min(Version(s.version) for s in allowed if s.operator == ">=")
    assert f"{floor.major}.{floor.minor}" in pythons


def test_py_typed_ships_in_the_package():
    assert (PACKAGE / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["usage_agg"]


def test_license_file_is_the_license_named():
    assert PROJECT["license"] == "Apache-2.0"
    for name in PROJECT["license-files"]:
        text = (ROOT / name).read_text()
        assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_project_urls_are_the_repository():
    homepage = PROJECT["urls"]["Homepage"]
    assert all(url.startswith(homepage) for url in PROJECT["urls"].values()), PROJECT["urls"]
    assert {"Documentation", "Changelog", "Source", "Issues"} <= set(PROJECT["urls"])


def test_entry_points_name_what_exists():
    provider = PROJECT["entry-points"]["apache_airflow_provider"]["provider_info"]
    script = PROJECT["scripts"]["usage-agg"]
    for reference in (provider, script):
        module, _, function = reference.partition(":")
        source = ROOT / "plugins" / Path(*module.split(".")).with_suffix(".py")
        if not source.exists():
            source = source.with_suffix("") / "__init__.py"
        names = {n.name for n in ast.parse(source.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert function in names, reference


def test_changelog_relates_the_package_version_to_the_schema_version_it_writes():
    rows = re.findall(r"^\| (\d+\.\d+\.\d+)[^|]* \| (\d+) \|", CHANGELOG, flags=re.MULTILINE)
    assert (PACKAGE_VERSION, str(SCHEMA_VERSION)) in rows, f"no row '| {PACKAGE_VERSION} | {SCHEMA_VERSION} |'"


def test_changelog_says_what_every_schema_version_added():
    described = {int(v) for v in re.findall(r"^\| (\d+) \| ", CHANGELOG, flags=re.MULTILINE)}
    assert described == set(range(1, SCHEMA_VERSION + 1))


def test_changelog_has_an_unreleased_section_first():
    sections = re.findall(r"^## \[([^\]]+)\]", CHANGELOG, flags=re.MULTILINE)
    assert sections and sections[0] == "Unreleased"
