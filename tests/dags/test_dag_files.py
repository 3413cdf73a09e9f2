"""The DAG files shipped in the package, loaded by the README's loader file with Airflow's own loader.

The wheel test (``tests/e2e/test_install.py``) runs one of them from a clean install; this checks
the loader on its own: what it finds, that each parse is fresh, and what Airflow records.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dags.conftest import AIRFLOW_V3, DAGS_FOLDER
from tests.e2e.test_install import loader_file
from usage_agg import dag_files

DAG_IDS = {"usage_aggregation", "usage_aggregation_merchant", "usage_expiry_check"}


def dagbag_of(folder: Path):
    try:
        from airflow.dag_processing.dagbag import DagBag  # Airflow 3
    except ImportError:
        from airflow.models.dagbag import DagBag  # Airflow 2
    return DagBag(dag_folder=str(folder), safe_mode=True)


@pytest.fixture
def loader_folder(tmp_path) -> Path:
    (tmp_path / "usage_agg_dags.py").write_text(loader_file())
    return tmp_path


def test_the_installed_package_ships_the_repositorys_dag_files():
    shipped = {path.name: path.read_text() for path in dag_files.dag_files()}
    assert shipped == {path.name: path.read_text() for path in DAGS_FOLDER.glob("*.py")}


def test_airflow_loads_every_dag_from_the_loader_file_alone(loader_folder):
    bag = dagbag_of(loader_folder)
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == DAG_IDS
    for dag_id in DAG_IDS:  # the file Airflow parses again to run a task is the loader
        assert Path(bag.get_dag(dag_id).fileloc) == loader_folder / "usage_agg_dags.py"


def test_each_parse_runs_the_dag_files_afresh(loader_folder, monkeypatch):
    monkeypatch.delenv("USAGE_AGGREGATION_SCHEDULE", raising=False)
    monkeypatch.setenv("AIRFLOW__USAGE_AGG__SCHEDULE", "*/10 * * * *")
    first = dagbag_of(loader_folder).get_dag("usage_aggregation")
    monkeypatch.setenv("AIRFLOW__USAGE_AGG__SCHEDULE", "*/30 * * * *")
    second = dagbag_of(loader_folder).get_dag("usage_aggregation")
    schedules = [dag.schedule if AIRFLOW_V3 else dag.schedule_interval for dag in (first, second)]
    assert schedules == ["*/10 * * * *", "*/30 * * * *"]
    assert first is not second


def test_the_loader_loads_only_the_dags_asked_for():
    assert set(dag_files.load_dags("usage_expiry_check")) == {"usage_expiry_check"}
    with pytest.raises(LookupError, match="ships no DAG nightly; it ships usage_aggregation, "):
        dag_files.load_dags("nightly")
