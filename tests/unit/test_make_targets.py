"""The README's ``make`` commands are the Makefile's targets, and ``make check`` is a part of ``make test``.

The Makefile promises that every command in README.md is one of its targets. ``make check`` is the
quick loop; ``make test`` is the proof CI runs, so the quick loop must run nothing it does not:
lint (CI runs it first), then tiers ``make test`` runs on Airflow 3.3, narrowed.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()


def rule(target: str) -> tuple[str, str]:
    """A target's prerequisites and its recipe."""
    found = re.search(rf"^{re.escape(target)}:(.*)\n((?:\t.*\n)*)", MAKEFILE, flags=re.MULTILINE)
    assert found, f"Makefile: no target {target}"
    return found.group(1), found.group(2)


def test_every_make_command_the_readme_shows_is_a_makefile_target():
    shown = set(re.findall(r"(?:^|`)make\s+([a-z][\w.-]*)", README, flags=re.MULTILINE))
    targets = set(re.findall(r"^([a-z][\w.-]*):", MAKEFILE, flags=re.MULTILINE))
    assert {"lint", "check", "test", "demo"} <= shown
    assert shown <= targets, shown - targets


def test_make_check_lints_then_runs_the_unit_and_integration_tiers_on_3_3_without_the_slow_tests():
    prerequisites, recipe = rule("check")
    assert prerequisites.split()[0] == "lint"
    assert "$(call venv,3.3)/installed" in prerequisites
    assert recipe.count("pytest") == 1
    assert "tools/airflow-env.sh 3.3 " in recipe
    assert "USAGE_AGG_PG_DRIVERS=psycopg " in recipe
    assert recipe.strip().endswith('-m "not slow" tests/unit tests/integration $(PYTEST_ARGS)')


def test_make_test_runs_every_tier_on_3_3_so_all_that_make_check_runs():
    assert "$(addprefix test-,$(ENVIRONMENTS))" in rule("test")[0]
    assert re.search(r"^AIRFLOW_VERSIONS \?= 3\.3 ", MAKEFILE, flags=re.MULTILINE)
    assert not re.search(r"^PYTEST_ARGS_3\.3 ", MAKEFILE, flags=re.MULTILINE)  # no tier left out on 3.3
