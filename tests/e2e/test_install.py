"""README "Install into an existing Airflow", as written: the built wheel, not the checkout.

The wheel is built from the sources, installed into a clean virtualenv with Airflow alone
(pinned by this Airflow version's constraints file), an empty dags folder gets only the
loader file the README shows, and the hourly DAG runs with ``airflow dags test`` against the
real services, configured through the provider's ``[usage_agg]`` section.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from airflow import __version__ as AIRFLOW_VERSION
from packaging.version import Version

from tests.conftest import PG_DATABASE, PG_HOST, PG_PORT, PG_USER, REDIS_HOST, REDIS_PORT
from tests.unit.test_constraints import CONSTRAINTS, pins
from usage_agg import __version__
from usage_agg.tracking import track_usage

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SERIES = f"{Version(AIRFLOW_VERSION).major}.{Version(AIRFLOW_VERSION).minor}"
WHEEL = f"usage_agg-{__version__}-py3-none-any.whl"

#: As README.md shows them (for Airflow 3.3; for 2.11 the README names what changes).
BUILD = "uv build --wheel --out-dir dist"
VENV = "python3 -m venv airflow-venv"
INSTALL = (
    f'uv pip install --python airflow-venv/bin/python "apache-airflow==3.3.2" dist/{WHEEL} -c constraints/airflow-3.3.txt'
)
DAGS_TEST = "airflow dags test usage_aggregation 2025-11-02T00:00:00+00:00"


def loader_file() -> str:
    """The loader file exactly as the README shows it (the block after its marker)."""
    section = README.split("<!-- the loader file -->", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert found, "README: no python block after the loader file's marker"
    return textwrap.dedent(found.group(1)).strip() + "\n"  # the block is indented in a list item


def test_readme_shows_these_commands():
    for command in (BUILD, VENV, INSTALL, DAGS_TEST):
        assert command in README, command
    assert "apache-airflow==2.11.2" in README and "constraints/airflow-2.11.txt" in README


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{command}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``uv build --wheel`` in a copy of the sources (a checkout's own build/ can hold stale modules)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("plugins", "dags"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    run(shlex.split(BUILD), cwd=source)
    built = source / "dist" / WHEEL
    with zipfile.ZipFile(built) as archive:
        names = set(archive.namelist())
    # packages are listed in pyproject.toml, not found: every module of the package and every DAG file is in
    expected = {f"usage_agg/{p.relative_to(ROOT / 'plugins/usage_agg').as_posix()}" for p in (ROOT / "plugins/usage_agg").rglob("*.py")}
    expected |= {f"usage_agg/dags/{p.name}" for p in (ROOT / "dags").glob("*.py")}
    expected.add("usage_agg/sql/schema.sql")
    expected.add("usage_agg/py.typed")  # PEP 561: type checkers use the package's own annotations
    assert expected <= names, sorted(expected - names)
    return built


@pytest.fixture(scope="module")
def clean_airflow(tmp_path_factory, wheel) -> Path:
    """A new virtualenv with only Airflow (this version, pinned by its constraints file) and the wheel."""
    where = tmp_path_factory.mktemp("install")
    (where / "dist").mkdir()
    shutil.copy(wheel, where / "dist" / WHEEL)
    (where / "constraints").mkdir()
    shutil.copy(CONSTRAINTS / f"airflow-{SERIES}.txt", where / "constraints")
    run([sys.executable, *shlex.split(VENV)[1:]], cwd=where)
    airflow_pin = pins(CONSTRAINTS / f"airflow-{SERIES}.txt")["apache-airflow"]
    install = INSTALL.replace("3.3.2", airflow_pin).replace("airflow-3.3.txt", f"airflow-{SERIES}.txt")
    run([shutil.which("uv") or "uv", *shlex.split(install)[1:]], cwd=where, env={**os.environ, "VIRTUAL_ENV": ""})
    return where / "airflow-venv"


def test_the_clean_virtualenv_holds_airflow_and_the_wheel_only(clean_airflow):
    listed = run([str(clean_airflow / "bin/python"), "-m", "pip", "list", "--format", "json"])
    installed = {entry["name"].lower(): entry["version"] for entry in json.loads(listed.stdout)}
    assert installed["usage-agg"] == __version__
    for test_tool in ("pytest", "hypothesis", "check-jsonschema", "playwright"):
        assert test_tool not in installed, test_tool
    where = run([str(clean_airflow / "bin/python"), "-c", "import usage_agg; print(usage_agg.__file__)"], cwd="/")
    assert Path(where.stdout.strip()).is_relative_to(clean_airflow)


def test_the_hourly_dag_runs_from_an_empty_dags_folder_with_the_loader_file(clean_airflow, tmp_path, redis_client, pg_schema, query):
    for merchant in ("acme_electronics_2024", "globex"):
        for day, amount in (("2025-11-01", 10), ("2025-11-02", 20)):
            track_usage(redis_client, merchant, "queries", amount, usage_date=day)
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "usage_agg_dags.py").write_text(loader_file())
    db = redis_client.connection_pool.connection_kwargs["db"]
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("USAGE_AGG", "AIRFLOW", "PYTHON", "VIRTUAL_ENV"))  # nothing of the test's own Airflow
    }
    env.update(
        PATH=f"{clean_airflow / 'bin'}:{env.get('PATH', '')}",
        AIRFLOW_HOME=str(tmp_path / "airflow-home"),
        AIRFLOW__CORE__DAGS_FOLDER=str(dags),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__USAGE_AGG__TABLE=f"{pg_schema}.merchant_usage",  # the provider's config section
        AIRFLOW_CONN_USAGE_REDIS=json.dumps({"conn_type": "redis", "host": REDIS_HOST, "port": REDIS_PORT, "extra": {"db": db}}),
        AIRFLOW_CONN_USAGE_POSTGRES=json.dumps(
            {"conn_type": "postgres", "host": PG_HOST, "port": PG_PORT, "login": PG_USER, "schema": PG_DATABASE}
        ),
    )
    airflow = str(clean_airflow / "bin/airflow")
    run([airflow, "db", "migrate"], env=env, cwd=tmp_path)
    done = run([airflow, *shlex.split(DAGS_TEST)[1:]], env=env, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert "Completed. Records aggregated: 2, Errors: 0" in output
    assert sorted(query(f"SELECT merchant_id, usage_date::text, quantity FROM {pg_schema}.merchant_usage")) == [
        ("acme_electronics_2024", "2025-11-01", 10),
        ("acme_electronics_2024", "2025-11-02", 20),
        ("globex", "2025-11-01", 10),
        ("globex", "2025-11-02", 20),
    ]
