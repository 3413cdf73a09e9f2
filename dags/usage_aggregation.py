"""
### Hourly usage aggregation (Airflow DAG `usage_aggregation`)

Copies every merchant's usage counters from Redis into PostgreSQL (`merchant_usage`).

Each run aggregates the day of its `ds` **and** the day before, so the last hour of
every day is picked up whichever timetable semantics the Airflow version uses. A
run without a logical date (Airflow 3, triggered without one) aggregates today and
yesterday in UTC. Reruns and backfills never double count: Redis holds each day's
running total and the table takes that absolute value.

Usage about to expire without ever being aggregated is the DAG
`usage_expiry_check`'s job. Failures alert through `USAGE_AGG_ALERT_WEBHOOK` /
`USAGE_AGG_ALERT_EMAIL`.

A backfill creates 24 runs a day, and a day's counters are final when it is
backfilled, so one read per day is enough. The rule, for each aggregation task of a
backfill run: it leaves its day to another task only when that task reads the same
day, belongs to a run that is provably part of the **same** backfill, comes from an
earlier run (smaller logical date), and has not ended without reading (failed,
upstream_failed, removed); otherwise it reads the day. So the earliest task of the
backfill that reads a day reads it, whatever runs already exist and whatever the
reprocess behaviour; a task that leaves its day is skipped (Airflow 3) or succeeds
without reading (Airflow 2.11). "Provably part of the same backfill": on Airflow 3 a
`backfill` run still queued or running (one active backfill per DAG); on Airflow 2.11 a
task queued by the same backfill job. A range's last day has one run in the range, its
midnight: when the backfill leaves that run out, the task that reads the day before also
reads it (README, "Backfill a date range").

Fan-out (`USAGE_AGGREGATION_FAN_OUT=redis_primaries`, off by default): on Redis
Cluster, `plan_redis_partitions` lists the primaries and each aggregation task is
mapped once per primary, each part committed on its own.

Schedule: `USAGE_AGGREGATION_SCHEDULE` (default `@hourly`); concurrent runs:
`USAGE_AGGREGATION_MAX_ACTIVE_RUNS` (default 8). Connections:
`USAGE_AGG_REDIS_CONN_ID` / `USAGE_AGG_POSTGRES_CONN_ID` (default `usage_redis` /
`usage_postgres`).
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.providers.common.compat.sdk import DAG

from usage_agg import dag_config
from usage_agg.alerts import UsageAlertNotifier
from usage_agg.assets import usage_asset
from usage_agg.operators import RedisPartitionsOperator, RedisUsageToPostgresOperator

with DAG(
    dag_id="usage_aggregation",
    dag_display_name="Usage aggregation (hourly)",
    description="Merchant usage counters from Redis into PostgreSQL, every hour: the run's day and the day before",
    doc_md=__doc__,
    schedule=dag_config.aggregation_schedule(),
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=dag_config.aggregation_max_active_runs(),
    default_args={**dag_config.default_args(), **dag_config.late_run_default_args()},
    tags=["usage", "billing"],
    on_failure_callback=UsageAlertNotifier(),
    **dag_config.late_run_alert(),
) as dag:
    common: dict[str, Any] = {
        "merchant_id": None,
        "table": dag_config.usage_table(),
        "redis_conn_id": dag_config.redis_conn_id(),
        "postgres_conn_id": dag_config.postgres_conn_id(),
        # Billing and analytics DAGs schedule on the table: an event per date (usage_agg.assets).
        "outlets": [usage_asset(dag_config.usage_table())],
    }
    days = {
        "aggregate_previous_day": (-1, "Aggregate the day before", "the day before the run's `ds`"),
        "aggregate_current_day": (0, "Aggregate the run's day", "the run's `ds` (today in UTC without one)"),
    }

    # Independent on purpose: bad keys on one day must not keep the other from running,
    # and every aggregation is a leaf, so any failure makes the run fail (and alert).
    def doc(which: str) -> str:
        return (
            f"Copies every merchant's counters of {which} into the usage table, in one transaction. "
            "Rendered Template shows the date read; the XCom `return_value`, what was written."
        )

    if dag_config.aggregation_fan_out() == "off":
        for task_id, (day_offset, name, which) in days.items():
            RedisUsageToPostgresOperator(
                task_id=task_id, task_display_name=name, doc_md=doc(which), day_offset=day_offset, **common
            )
    else:  # one mapped task per Redis Cluster primary, for executors that spread them over workers
        parts = RedisPartitionsOperator(
            task_id="plan_redis_partitions",
            task_display_name="Plan the Redis parts",
            doc_md="Lists the Redis Cluster primaries; each aggregation is mapped once per primary.",
            redis_conn_id=common["redis_conn_id"],
        )
        for task_id, (day_offset, name, which) in days.items():
            RedisUsageToPostgresOperator.partial(
                task_id=task_id, task_display_name=name, doc_md=doc(which), day_offset=day_offset, **common
            ).expand_kwargs(parts.output)
