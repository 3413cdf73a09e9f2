"""Run the real DAG files with Airflow's own loader and ``dag.test()``, on either Airflow major."""

from __future__ import annotations

from pathlib import Path

from airflow import __version__ as AIRFLOW_VERSION
from packaging.version import Version

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"
AIRFLOW_V3 = Version(AIRFLOW_VERSION).major >= 3

if not AIRFLOW_V3:
    # Airflow 2.11's dag.test() clears an earlier run of the same logical date through
    # DagRunNote, whose foreign key names FAB's ab_user table; without FAB's models
    # imported SQLAlchemy cannot resolve it (NoReferencedTableError). A webserver
    # imports them anyway; a bare test process must do it itself.
    import airflow.providers.fab.auth_manager.models  # noqa: F401


def load_dagbag():
    try:
        from airflow.dag_processing.dagbag import DagBag  # Airflow 3
    except ImportError:
        from airflow.models.dagbag import DagBag  # Airflow 2
    return DagBag(dag_folder=str(DAGS_FOLDER), safe_mode=True)


def run_dag(dag_id: str, *, logical_date=..., conf: dict | None = None) -> dict[str, str]:
    """Parse the DAG afresh, ``dag.test()`` it, return each task's final state (``task[i]`` if mapped).

    A fresh parse per run, as a worker does: ``dag.test()`` leaves one run's conf in
    the DAG object's params, which would leak into the next run in this process.

    ``logical_date=None`` asks Airflow 3 for a run without a logical date; Airflow 2
    has no such run and uses now, as it would for a manual trigger.
    """
    bag = load_dagbag()
    assert bag.import_errors == {}
    dag = bag.get_dag(dag_id)
    kwargs: dict = {}
    if conf is not None:
        kwargs["run_conf"] = conf
    if logical_date is not ...:
        if AIRFLOW_V3:
            kwargs["logical_date"] = logical_date
        elif logical_date is not None:
            kwargs["execution_date"] = logical_date
    if not AIRFLOW_V3:
        # As Airflow 2's DAG processor does before any run: without the DAG's datasets in the
        # metadata DB, a task's outlet events are dropped ("DatasetModel ... not found").
        dag.sync_to_db()
    dag_run = dag.test(**kwargs)
    return {
        (ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"): str(getattr(ti.state, "value", ti.state))
        for ti in dag_run.get_task_instances()
    }
