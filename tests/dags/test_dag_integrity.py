"""Both DAG files load under Airflow's own (safe-mode) loader and follow the house rules."""

from __future__ import annotations

import datetime as dt

import pytest

from tests.dags.conftest import AIRFLOW_V3, DAGS_FOLDER, load_dagbag

DAG_IDS = {"usage_aggregation", "usage_aggregation_merchant", "usage_expiry_check"}


def schedule_of(dag):
    return dag.schedule if AIRFLOW_V3 else dag.schedule_interval


def test_every_dag_file_imports_without_errors():
    bag = load_dagbag()
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == DAG_IDS
    assert {p.name for p in DAGS_FOLDER.glob("*.py")} == {f"{d}.py" for d in DAG_IDS}


@pytest.mark.parametrize("dag_id", sorted(DAG_IDS))
def test_dags_have_owner_tags_retries_with_backoff_and_docs(dag_id):
    dag = load_dagbag().get_dag(dag_id)
    assert dag.tags and dag.doc_md
    callback = dag.on_failure_callback or dag.default_args["on_failure_callback"]
    callbacks = callback if isinstance(callback, list) else [callback]
    assert any(type(c).__name__ == "UsageAlertNotifier" for c in callbacks)
    assert dag.catchup is False
    assert dag.max_active_runs >= 1
    for task in dag.tasks:
        assert task.owner == "usage-agg"
        assert task.retries >= 1
        assert task.retry_exponential_backoff
        assert task.max_retry_delay is not None and task.max_retry_delay <= dt.timedelta(hours=1)
        # every wait bounded: a hung task is ended, never left holding a day's lock
        assert task.execution_timeout is not None and task.execution_timeout <= dt.timedelta(hours=1)


def test_hourly_dag_is_hourly_with_bounded_concurrency_and_covers_two_days():
    dag = load_dagbag().get_dag("usage_aggregation")
    assert schedule_of(dag) == "@hourly"
    assert dag.max_active_runs == 8
    aggregations = [t for t in dag.tasks if t.task_type == "RedisUsageToPostgresOperator"]
    assert {t.task_id: t.day_offset for t in aggregations} == {"aggregate_previous_day": -1, "aggregate_current_day": 0}
    assert all(t.merchant_id is None for t in aggregations)
    # every task a leaf: a failed aggregation must fail the run, whatever the others do
    assert {t.task_id for t in dag.leaves} == {"aggregate_previous_day", "aggregate_current_day"}


def test_the_expiry_check_is_a_dag_of_its_own_never_caught_up():
    dag = load_dagbag().get_dag("usage_expiry_check")
    assert schedule_of(dag) == "@hourly"
    assert dag.task_ids == ["check_expiring_usage"]
    assert (dag.catchup, dag.max_active_runs) == (False, 1)


def test_schedule_connections_and_table_come_from_env(monkeypatch):
    monkeypatch.setenv("USAGE_AGGREGATION_SCHEDULE", "*/15 * * * *")
    monkeypatch.setenv("USAGE_AGGREGATION_MAX_ACTIVE_RUNS", "2")
    monkeypatch.setenv("USAGE_EXPIRY_CHECK_SCHEDULE", "30 */6 * * *")
    monkeypatch.setenv("USAGE_AGG_REDIS_CONN_ID", "other_redis")
    monkeypatch.setenv("USAGE_AGG_POSTGRES_CONN_ID", "other_postgres")
    monkeypatch.setenv("USAGE_AGG_TABLE", "billing.usage_daily")
    bag = load_dagbag()
    assert schedule_of(bag.get_dag("usage_aggregation")) == "*/15 * * * *"
    assert bag.get_dag("usage_aggregation").max_active_runs == 2
    assert schedule_of(bag.get_dag("usage_expiry_check")) == "30 */6 * * *"
    for dag in bag.dags.values():
        operators = [t for t in dag.tasks if t.task_type in ("RedisUsageToPostgresOperator", "UsageExpiryCheckOperator")]
        assert operators
        for task in operators:
            kwargs = getattr(task, "partial_kwargs", None) or vars(task)
            assert kwargs["redis_conn_id"] == "other_redis"
            assert kwargs["postgres_conn_id"] == "other_postgres"
            assert kwargs["table"] == "billing.usage_daily"


def test_merchant_dag_has_a_trigger_form_with_titles_and_date_pickers():
    dag = load_dagbag().get_dag("usage_aggregation_merchant")
    assert schedule_of(dag) is None
    params = {name: dag.params.get_param(name) for name in dag.params}
    assert set(params) == {"merchant_id", "date", "end_date", "all_merchants", "allow_decrease"}
    for param in params.values():
        assert param.schema["title"] and param.description
    schemas = {name: param.schema for name, param in params.items()}
    assert schemas["merchant_id"]["type"] == ["null", "string"] and schemas["merchant_id"]["minLength"] == 1
    assert schemas["date"]["format"] == "date" and schemas["end_date"]["format"] == "date"
    assert schemas["end_date"]["type"] == ["null", "string"]
    assert schemas["allow_decrease"]["type"] == "boolean" and schemas["all_merchants"]["type"] == "boolean"
    assert dag.params["allow_decrease"] is False and dag.params["end_date"] is None
    assert dag.params["all_merchants"] is False and dag.params["merchant_id"] is None
