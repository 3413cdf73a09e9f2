"""
### Invoice totals per day (example downstream Airflow DAG `usage_invoice_totals`)

An example of a billing DAG that runs when usage lands instead of on a guess. It is
scheduled on the usage table's asset (`usage_agg.assets.usage_asset()`, a dataset on
Airflow 2), which every aggregation task of usage-agg updates with one event per date.

- **Airflow 3**: `PartitionedAssetTimetable`. An event whose date's rows changed carries
  the date as its partition key; each key makes one run of this DAG, for that date.
  A rerun that changed nothing emits an event without a key, which starts nothing.
- **Airflow 2**: datasets have no partitions, and a run's triggering events are not exact:
  an event that lands while the scheduler creates a run from its queue can be left out
  of every run, and one can be counted by a later run. So the events only start runs; a
  run rolls up every date an aggregation wrote in the last two days (from the audit
  table) whose totals differ from the usage table. A date is recomputed exactly when its
  totals are out of step, whichever run gets there first.

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
from usage_agg.schema import SchemaNames

USAGE = usage_asset(dag_config.usage_table())
schedule: object

if AIRFLOW_V_3_0_PLUS:
    from airflow.sdk import PartitionedAssetTimetable

    schedule = PartitionedAssetTimetable(assets=USAGE)
else:
    schedule = [USAGE]


#: Airflow 2 only: how far back a run looks for dates written whose totals do not match
RECHECK_WRITES_SINCE = "2 days"


def dates_out_of_step(cur, usage: TableName, totals: TableName) -> list[str]:
    """Dates an aggregation wrote lately whose totals differ from the usage rows (dropped events on Airflow 2)."""
    runs = SchemaNames.for_table(usage).runs
    rows_of = "SELECT merchant_id, metric_type, quantity FROM {} x WHERE x.usage_date = d.usage_date"
    usage_rows, total_rows = rows_of.format(usage.quoted), rows_of.format(totals.quoted)
    cur.execute(
        f"""SELECT d.usage_date::text FROM (SELECT DISTINCT usage_date FROM {runs.quoted}
                 WHERE finished_at > now() - %s::interval AND rows_written > 0) d
            WHERE EXISTS ({usage_rows} EXCEPT {total_rows}) OR EXISTS ({total_rows} EXCEPT {usage_rows})
            ORDER BY 1""",
        (RECHECK_WRITES_SINCE,),
    )
    return [day for (day,) in cur.fetchall()]


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

        key = context.get("partition_key")  # Airflow 3: the changed date this run is for
        usage = TableName.parse(dag_config.usage_table())
        totals = usage.sibling("usage_invoice_totals")
        conn = PostgresHook(postgres_conn_id=dag_config.postgres_conn_id()).get_conn()
        try:
            with conn, conn.cursor() as cur:
                # Runs of this DAG take turns (until commit): two creating the table at once, or
                # recomputing one date at once, would collide; and each sees what the last wrote.
                cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (totals.quoted,))
                cur.execute(
                    f"CREATE TABLE IF NOT EXISTS {totals.quoted} ("
                    " usage_date date NOT NULL, merchant_id text NOT NULL, metric_type text NOT NULL,"
                    " quantity bigint NOT NULL, computed_by_run text NOT NULL,"
                    " computed_at timestamptz NOT NULL DEFAULT clock_timestamp(),"
                    " PRIMARY KEY (usage_date, merchant_id, metric_type))"
                )
                # Airflow 3: the run's partition; Airflow 2: whatever is out of step, however it was announced
                dates = ([key] if key else []) if AIRFLOW_V_3_0_PLUS else dates_out_of_step(cur, usage, totals)
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
