"""
### Rerun one merchant, or every merchant over a range (Airflow DAG `usage_aggregation_merchant`)

Re-aggregates one merchant's usage for a date, or an inclusive range of at most 31
days, from Redis into PostgreSQL. Trigger it from the Airflow UI's form or with
`airflow dags trigger usage_aggregation_merchant --conf '{"merchant_id": "...", "date": "YYYY-MM-DD"}'`.

Only that merchant's keys are read and written, whatever characters its id holds.
Leave **Merchant ID** empty and tick **All merchants** to rerun every merchant over
the range (the original job's `aggregate-range FROM TO`):
`--conf '{"all_merchants": true, "date": "YYYY-MM-DD", "end_date": "YYYY-MM-DD"}'`.
One task per date either way.

Stored totals are never lowered unless **Allow decrease** is ticked (Redis is the
truth: use it after a Redis restart has been reconciled by hand). The dates come
from the form, never from the run's logical date.
"""

from __future__ import annotations

import pendulum
from airflow.providers.common.compat.sdk import DAG, AirflowFailException, Param, task

from usage_agg import dag_config
from usage_agg.alerts import UsageAlertNotifier
from usage_agg.assets import usage_asset
from usage_agg.operators import RedisUsageToPostgresOperator
from usage_agg.rerun import MAX_RANGE_DAYS, RerunRequestError, validate_rerun_request

DATE_PATTERN = r"^\d{4}-\d{2}-\d{2}$"
#: Sections of the trigger form
WHO, WHEN, HOW = "Whose usage", "Which days", "How"

with DAG(
    dag_id="usage_aggregation_merchant",
    dag_display_name="Rerun usage aggregation",
    description="Re-aggregate one merchant, or every merchant, for a date or a range of up to 31 days",
    doc_md=__doc__,
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    # Task-level alerts here: a DAG-level callback's context is built without the run's
    # conf, and this DAG's required Params then fail validation inside the callback.
    default_args={**dag_config.default_args(), "on_failure_callback": UsageAlertNotifier()},
    tags=["usage", "billing", "rerun"],
    params={
        "merchant_id": Param(
            None,
            type=["null", "string"],
            minLength=1,
            title="Merchant ID",
            section=WHO,
            description="The merchant to re-aggregate, exactly as in its Redis keys. "
            "Leave empty (and tick All merchants) to rerun every merchant.",
        ),
        "date": Param(
            type="string",
            format="date",
            pattern=DATE_PATTERN,
            title="Date",
            section=WHEN,
            description="The day to re-aggregate (UTC), or the first day of the range.",
        ),
        "end_date": Param(
            None,
            type=["null", "string"],
            format="date",
            pattern=DATE_PATTERN,
            title="End date (optional)",
            section=WHEN,
            description=f"Last day of the range, inclusive; at most {MAX_RANGE_DAYS} days after Date.",
        ),
        "all_merchants": Param(
            False,
            type="boolean",
            title="All merchants",
            section=WHO,
            description="Rerun every merchant for these dates (Merchant ID empty). A confirmation: "
            "it rewrites the whole days.",
        ),
        "allow_decrease": Param(
            False,
            type="boolean",
            title="Allow decrease",
            section=HOW,
            description="Redis is the truth: set each total to its Redis value, even lower. "
            "Off: a lower value is a reset, counted on top of what was stored.",
        ),
    },
) as dag:

    @task(task_display_name="Check the request")
    def validate_request(params: dict | None = None) -> list[str]:
        """Refuse a bad request before any data is touched; expand it to one task per date."""
        params = params or {}
        try:
            request = validate_rerun_request(
                params.get("merchant_id"),
                params.get("date"),
                params.get("end_date"),
                params.get("allow_decrease", False),
                params.get("all_merchants", False),
            )
        except RerunRequestError as err:
            raise AirflowFailException(f"Refused: {err}") from None
        return [day.isoformat() for day in request.dates]

    # Only the validated dates travel through XCom: Airflow 3 renders expanded values
    # as templates, so a merchant id there could run Jinja. A template's output, as
    # here, is never rendered again, whatever the merchant id contains. No merchant id
    # (validated: only with all_merchants) renders empty, which the operator reads as
    # every merchant.
    RedisUsageToPostgresOperator.partial(
        task_id="aggregate_merchant_day",
        task_display_name="Aggregate a date",
        doc_md="Re-aggregates the form's merchant (or every merchant) for one date of the request.",
        outlets=[usage_asset(dag_config.usage_table())],
        merchant_id="{{ params.merchant_id if params.merchant_id is not none else '' }}",
        allow_decrease="{{ params.allow_decrease }}",
        table=dag_config.usage_table(),
        redis_conn_id=dag_config.redis_conn_id(),
        postgres_conn_id=dag_config.postgres_conn_id(),
    ).expand(usage_date=validate_request())
