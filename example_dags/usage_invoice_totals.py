"""
### Invoice totals per day (example downstream Airflow DAG `usage_invoice_totals`)

An example of a billing DAG that runs when usage lands instead of on a guess. It is
scheduled on the usage table's asset (`usage_agg.assets.usage_asset()`, a dataset on
Airflow 2), which every aggregation task of usage-agg updates with one event per date.

- **Airflow 3**: `PartitionedAssetTimetable`. An event whose date's rows changed carries
  the date as its partition key; each key makes one run of this DAG, for that date.
  A rerun that changed nothing emits an event without a key, which starts nothing.
- **Airflow 2**: datasets have no partitions. A run reads the dates from its triggering
  events' extras and rolls up those that changed (`"changed": true`).

The rollup writes `usage_invoice_totals` (beside the usage table): each merchant's
billable quantity per metric for the date, with the run that computed it.
"""

from __future__ import annotations

import pendulum
from airflow.providers.common.compat.sdk import DAG, task
from airflow.providers.common.compat.version_compat import AIRFLOW_V_3_0_PLUS

from usage_agg import dag_config
from usage_agg.assets import usage_asset
from usage_agg.identifiers import TableName

USAGE = usage_asset(dag_config.usage_table())
schedule: object

if AIRFLOW_V_3_0_PLUS:
    from airflow.sdk import PartitionedAssetTimetable

    schedule = PartitionedAssetTimetable(assets=USAGE)
else:
    schedule = [USAGE]


def dates_to_roll_up(context) -> list[str]:
    """The dates this run is for: its partition key (Airflow 3), or its events' changed dates (Airflow 2)."""
    if AIRFLOW_V_3_0_PLUS:
        key = context.get("partition_key")
        return [key] if key else []
    events = context.get("triggering_dataset_events") or {}
    return sorted({e.extra["usage_date"] for batch in events.values() for e in batch if (e.extra or {}).get("changed")})


with DAG(
    dag_id="usage_invoice_totals",
    dag_display_name="Invoice totals per day (example)",
    description="Example downstream DAG: each merchant's billable usage per date, once per changed date",
    doc_md=__doc__,
    schedule=schedule,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    default_args=dag_config.default_args(),
    tags=["usage", "billing", "example"],
) as dag:

    @task(task_display_name="Roll up invoice totals")
    def roll_up(**context) -> dict:
        """Recompute the invoice totals of the run's dates from the usage table, in one transaction."""
        from airflow.providers.postgres.hooks.postgres import PostgresHook

        dates = dates_to_roll_up(context)
        usage = TableName.parse(dag_config.usage_table())
        totals = usage.sibling("usage_invoice_totals")
        conn = PostgresHook(postgres_conn_id=dag_config.postgres_conn_id()).get_conn()
        try:
            with conn, conn.cursor() as cur:
                cur.execute(
                    f"CREATE TABLE IF NOT EXISTS {totals.quoted} ("
                    " usage_date date NOT NULL, merchant_id text NOT NULL, metric_type text NOT NULL,"
                    " quantity bigint NOT NULL, computed_by_run text NOT NULL,"
                    " computed_at timestamptz NOT NULL DEFAULT clock_timestamp(),"
                    " PRIMARY KEY (usage_date, merchant_id, metric_type))"
                )
                for day in dates:
                    cur.execute(f"DELETE FROM {totals.quoted} WHERE usage_date = %s", (day,))
                    cur.execute(
                        f"INSERT INTO {totals.quoted} (usage_date, merchant_id, metric_type, quantity, computed_by_run)"
                        f" SELECT usage_date, merchant_id, metric_type, quantity, %s FROM {usage.quoted}"
                        " WHERE usage_date = %s",
                        (context["run_id"], day),
                    )
        finally:
            conn.close()
        return {"dates": dates}

    roll_up()
