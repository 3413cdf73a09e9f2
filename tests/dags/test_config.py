"""The provider's ``[usage_agg]`` configuration section, read by Airflow's own loader and notifier.

Airflow reads ``AIRFLOW__USAGE_AGG__<OPTION>`` (or ``airflow.cfg``) for a declared section; the
older ``USAGE_AGG*`` variables keep working and win when set. The CLI side (``airflow config
list``, ``airflow providers ...``) is in ``tests/e2e/test_provider_cli.py``.
"""

from __future__ import annotations

import pytest

from tests.dags.conftest import AIRFLOW_V3, load_dagbag
from tests.dags.test_observability import FakeTI, alert_connection
from usage_agg import config
from usage_agg.alerts import UsageAlertNotifier

OLDER_NAMES = {option.name: option.env for option in config.OPTIONS}


@pytest.fixture
def clean_settings(monkeypatch):
    """Neither the older variables nor the section set: each test sets what it needs."""
    for option in config.OPTIONS:
        monkeypatch.delenv(option.env, raising=False)
        monkeypatch.delenv(f"AIRFLOW__USAGE_AGG__{option.name.upper()}", raising=False)
    return monkeypatch


def schedule_of(dag):
    return dag.schedule if AIRFLOW_V3 else dag.schedule_interval


def dag_settings(bag) -> dict:
    """What each setting became in the parsed DAGs."""
    hourly, expiry = bag.get_dag("usage_aggregation"), bag.get_dag("usage_expiry_check")
    aggregate = hourly.get_task("aggregate_current_day")
    kwargs = getattr(aggregate, "partial_kwargs", None) or vars(aggregate)  # mapped when fanned out
    return {
        "schedule": schedule_of(hourly),
        "expiry_check_schedule": schedule_of(expiry),
        "max_active_runs": hourly.max_active_runs,
        "fan_out": "redis_primaries" if "plan_redis_partitions" in hourly.task_ids else "off",
        "table": kwargs["table"],
        "redis_conn_id": kwargs["redis_conn_id"],
        "postgres_conn_id": kwargs["postgres_conn_id"],
    }


SECTION_VALUES = {
    "schedule": "*/20 * * * *",
    "expiry_check_schedule": "15 */3 * * *",
    "max_active_runs": 3,
    "fan_out": "redis_primaries",
    "table": "billing.usage_from_section",
    "redis_conn_id": "section_redis",
    "postgres_conn_id": "section_postgres",
}


def test_without_settings_the_dags_take_the_declared_defaults(clean_settings):
    defaults = {option.name: option.default for option in config.OPTIONS}
    assert dag_settings(load_dagbag()) == {
        name: int(defaults[name]) if name == "max_active_runs" else defaults[name] for name in SECTION_VALUES
    }


def test_the_dags_read_the_usage_agg_section_from_airflow_config(clean_settings):
    for name, value in SECTION_VALUES.items():
        clean_settings.setenv(f"AIRFLOW__USAGE_AGG__{name.upper()}", str(value))
    bag = load_dagbag()
    assert bag.import_errors == {}
    assert dag_settings(bag) == SECTION_VALUES


def test_the_older_variables_win_over_the_section(clean_settings):
    older = {
        "schedule": "*/5 * * * *",
        "expiry_check_schedule": "45 * * * *",
        "max_active_runs": 2,
        "fan_out": "off",
        "table": "billing.usage_from_env",
        "redis_conn_id": "env_redis",
        "postgres_conn_id": "env_postgres",
    }
    for name, value in SECTION_VALUES.items():
        clean_settings.setenv(f"AIRFLOW__USAGE_AGG__{name.upper()}", str(value))
        clean_settings.setenv(OLDER_NAMES[name], str(older[name]))
    assert dag_settings(load_dagbag()) == older


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("fan_out", "everything", "[usage_agg] fan_out: must be one of off, redis_primaries, got 'everything'"),
        ("max_active_runs", "0", "[usage_agg] max_active_runs: expected a positive integer, got '0'"),
    ],
)
def test_a_bad_value_in_the_section_is_an_import_error_naming_the_option(clean_settings, option, value, error):
    clean_settings.setenv(f"AIRFLOW__USAGE_AGG__{option.upper()}", value)
    assert error in "\n".join(load_dagbag().import_errors.values())


def test_the_alert_connection_id_comes_from_the_section(clean_settings, webhook):
    url, received = webhook
    for name in ("AIRFLOW_CONN_USAGE_AGG_ALERT", "USAGE_AGG_ALERT_WEBHOOK", "AIRFLOW_VAR_USAGE_AGG_ALERT_WEBHOOK",
                 "USAGE_AGG_ALERT_EMAIL", "AIRFLOW_VAR_USAGE_AGG_ALERT_EMAIL", "AIRFLOW_VAR_USAGE_AGG_ALERT_CONN_ID"):  # fmt: skip
        clean_settings.delenv(name, raising=False)
    clean_settings.setenv("AIRFLOW__USAGE_AGG__ALERT_CONN_ID", "pager_from_section")
    clean_settings.setenv("AIRFLOW_CONN_PAGER_FROM_SECTION", alert_connection(url))
    UsageAlertNotifier().notify({"task_instance": FakeTI(), "reason": "task_failure"})
    assert [alert["task_id"] for alert in received] == ["aggregate_current_day"]


def test_the_statement_timeout_extra_the_error_names_reaches_the_server_through_the_hook(monkeypatch):
    """The extra that ``db_errors.STATEMENT_TIMEOUT_HINT`` tells users to set is one Airflow's
    Postgres hook passes to libpq, on either Airflow (the hint would mislead if it were dropped)."""
    import json
    import re

    from airflow.providers.postgres.hooks.postgres import PostgresHook

    from tests.conftest import PG_DATABASE, PG_HOST, PG_PORT, PG_USER
    from usage_agg.db_errors import STATEMENT_TIMEOUT_HINT

    (extra,) = re.findall(r"\{.*\}", STATEMENT_TIMEOUT_HINT)
    connection = {"conn_type": "postgres", "host": PG_HOST, "port": PG_PORT, "login": PG_USER, "schema": PG_DATABASE}
    monkeypatch.setenv("AIRFLOW_CONN_LIFTED_TIMEOUT", json.dumps({**connection, "extra": json.loads(extra)}))
    monkeypatch.setenv("PGOPTIONS", "-c statement_timeout=5s")  # a default that the extra must win over
    conn = PostgresHook(postgres_conn_id="lifted_timeout").get_conn()
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone()[0] == "0"
    finally:
        conn.close()
