"""What Airflow's own CLI shows of the provider, and ``airflow usage-agg`` (Airflow 3).

Each command runs as an operator types it, in this environment's Airflow, against the real
services: ``airflow config list``, ``airflow providers ...``, and the ``usage-agg`` commands
through both entry points, the console script and (Airflow 3) ``airflow usage-agg``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from airflow import __version__ as AIRFLOW_VERSION
from packaging.version import Version

from tests.e2e.test_usage_agg_cli import DAY, aggregated, usage_agg  # noqa: F401  (a fixture)
from usage_agg import DESCRIPTION, config

AIRFLOW_V3 = Version(AIRFLOW_VERSION).major >= 3

#: As README.md shows them.
README_COMMANDS = {
    "config 3": "airflow config list --section usage_agg --include-descriptions --show-values",
    "config 2": "airflow config list --section usage_agg --include-descriptions",
    "notifications": "airflow providers notifications",
    "status": f"airflow usage-agg status {DAY}",
    "health": "airflow usage-agg health",
}


def airflow(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        ["airflow", *args], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def readme_command(name: str, *extra: str, **kwargs) -> subprocess.CompletedProcess:
    return airflow(*shlex.split(README_COMMANDS[name])[1:], *extra, **kwargs)


def test_readme_shows_these_commands():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for command in README_COMMANDS.values():
        assert command in readme, command


def test_airflow_config_list_shows_the_section_with_its_defaults_and_the_airflow_settings():
    env = {option.env: "" for option in config.OPTIONS}  # the older names unset: the section alone
    env["AIRFLOW__USAGE_AGG__TABLE"] = "billing.from_airflow_env"
    shown = readme_command("config 3" if AIRFLOW_V3 else "config 2", env=env).stdout
    values = dict(re.findall(r"^(\w+) = (.*)$", shown, flags=re.MULTILINE))
    expected = {option.name: option.default for option in config.OPTIONS}
    assert values == {**expected, "table": "billing.from_airflow_env"}
    assert "[usage_agg]" in shown
    assert "Schedule of the DAG usage_aggregation" in shown  # each option's description comes along


def test_airflow_lists_the_notifier():
    assert "usage_agg.alerts.UsageAlertNotifier" in readme_command("notifications").stdout
    shown = readme_command("notifications", "--output", "json").stdout
    assert {"notification_class_name": "usage_agg.alerts.UsageAlertNotifier"} in json.loads(shown)


def test_airflow_shows_the_description_as_written():
    shown = airflow("providers", "list", "--output", "json").stdout
    providers = {entry["package_name"]: entry for entry in json.loads(shown)}
    assert providers["usage-agg"]["description"] == DESCRIPTION


@pytest.mark.skipif(not AIRFLOW_V3, reason="Airflow 2 has no provider CLI commands: the console script alone")
def test_airflow_usage_agg_answers_as_the_console_script_does(aggregated, usage_env):
    for name in ("status", "health"):
        for extra in ([], ["--json"]):
            through_airflow = readme_command(name, *extra, check=False)
            console_script = usage_agg(*shlex.split(README_COMMANDS[name])[2:], *extra)
            assert through_airflow.returncode == console_script.returncode, through_airflow.stderr[-3000:]
            assert through_airflow.stdout == console_script.stdout
    assert "IN SYNC" in readme_command("status").stdout


@pytest.mark.skipif(not AIRFLOW_V3, reason="Airflow 2 has no provider CLI commands: the console script alone")
def test_airflow_usage_agg_errors_are_one_line_with_exit_status_2(usage_env):
    done = airflow("usage-agg", "status", "2025-13-01", check=False)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith("usage-agg: date: ")
    assert "Traceback" not in done.stdout + done.stderr
    help_text = airflow("usage-agg", "--help").stdout
    assert "status" in help_text and "health" in help_text
    status_help = " ".join(airflow("usage-agg", "status", "--help").stdout.split())
    assert "default: USAGE_AGG_TABLE, else table of the usage_agg config section, else merchant_usage" in status_help


def imported_modules(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run the console script with Python's import-time report; the names of the modules it imported."""
    done = usage_agg(*args, env={"PYTHONPROFILEIMPORTTIME": "1"})
    modules = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", done.stderr, flags=re.MULTILINE))
    assert "usage_agg.cli" in modules  # the report is there, and read
    return done, modules


@pytest.mark.parametrize("args", [["--help"], ["status", "--help"], ["health", "--help"]])
def test_usage_agg_help_imports_no_airflow(args):
    done, modules = imported_modules(*args)
    assert done.returncode == 0 and "usage: usage-agg" in done.stdout
    assert not {module for module in modules if module.split(".")[0] == "airflow"}
    if args != ["--help"]:  # where each setting's default comes from
        shown = " ".join(done.stdout.split())
        assert "default: USAGE_AGG_REDIS_CONN_ID, else redis_conn_id of the usage_agg config section, else usage_redis" in shown


def test_a_usage_agg_command_does_import_airflow(usage_env):
    """The check above can see Airflow: a real command imports it."""
    done, modules = imported_modules("status", "not-a-date")
    assert done.returncode == 2
    assert "airflow.providers_manager" in modules or "airflow.configuration" in modules
