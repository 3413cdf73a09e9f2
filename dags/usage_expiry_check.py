"""
### Usage about to be lost (Airflow DAG `usage_expiry_check`)

Fails (and so alerts) when a day with keys in Redis has never been aggregated
successfully and its keys expire within a day: usage about to be lost. Reports how
many days the aggregation lags behind (`usage_agg.unaggregated_lag_days`), and adds
keys written by other writers than `usage_agg.tracking` to their day's index, so the
next `usage_aggregation` run reads them. When it aggregates a day itself, it updates the
usage asset like the aggregation tasks do (one event; on Airflow 3 a partition per date).

Its own DAG, apart from `usage_aggregation`: it checks what Redis holds *now*, with
one scan of the keyspace per run, so backfills of the aggregation never repeat it and
a red run here means one thing only. Failures alert through `USAGE_AGG_ALERT_WEBHOOK` /
`USAGE_AGG_ALERT_EMAIL`. Schedule: `USAGE_EXPIRY_CHECK_SCHEDULE` (default `@hourly`).
"""

from __future__ import annotations

import pendulum
from airflow.providers.common.compat.sdk import DAG

from usage_agg import dag_config
from usage_agg.alerts import UsageAlertNotifier
from usage_agg.assets import usage_asset
from usage_agg.operators import UsageExpiryCheckOperator

with DAG(
    dag_id="usage_expiry_check",
    dag_display_name="Usage about to expire",
    description="Saves, or alerts on, usage counters that expire from Redis within a day and are not stored",
    doc_md=__doc__,
    schedule=dag_config.expiry_check_schedule(),
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=dag_config.default_args(),
    tags=["usage", "billing", "alerting"],
    on_failure_callback=UsageAlertNotifier(),
) as dag:
    UsageExpiryCheckOperator(
        task_id="check_expiring_usage",
        task_display_name="Check expiring usage",
        doc_md="Scans Redis for counters expiring within a day; aggregates their day if their value is not "
        "stored; fails (and alerts) if some still are not.",
        table=dag_config.usage_table(),
        outlets=[usage_asset(dag_config.usage_table())],  # an event only when it aggregated a day
        redis_conn_id=dag_config.redis_conn_id(),
        postgres_conn_id=dag_config.postgres_conn_id(),
    )
