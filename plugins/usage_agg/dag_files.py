"""The DAG files shipped in the package, for any Airflow's dags folder.

The wheel holds the repository's ``dags/*.py`` as ``usage_agg/dags/`` (one definition of each
DAG). A dags folder needs only this file (README, "Install into an existing Airflow")::

    # Airflow DAGs of the usage-agg provider (usage_aggregation, usage_aggregation_merchant, usage_expiry_check)
    from usage_agg.dag_files import load_dags; globals().update(load_dags())  # noqa: E702

Each call runs the DAG files afresh, as Airflow runs a DAG file on each parse (a cached import
would keep the settings and the state of the first parse).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

FOLDER = Path(__file__).resolve().parent / "dags"


def dag_files() -> list[Path]:
    files = sorted(FOLDER.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no DAG files in {FOLDER}: usage-agg must be installed from its wheel or sdist")
    return files


def load_dags(*dag_ids: str) -> dict:
    """``{name: DAG}`` of every DAG the shipped files define (or only of ``dag_ids``), for a module's globals."""
    from airflow.providers.common.compat.sdk import DAG

    found: dict = {}
    for path in dag_files():
        # A name of its own per file and load, as Airflow's DagBag gives each DAG file.
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
        name = f"usage_agg_dag_file_{digest}_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        found.update({value.dag_id: value for value in vars(module).values() if isinstance(value, DAG)})
    missing = set(dag_ids) - set(found)
    if missing:
        raise LookupError(f"usage-agg ships no DAG {', '.join(sorted(missing))}; it ships {', '.join(sorted(found))}")
    return {dag_id: dag for dag_id, dag in found.items() if not dag_ids or dag_id in dag_ids}
