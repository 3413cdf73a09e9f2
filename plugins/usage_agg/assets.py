"""The usage table as an Airflow asset (a dataset on Airflow 2), and the events a task emits on it.

Billing and analytics DAGs schedule on the asset instead of guessing when usage lands.
Each aggregation task declares it as an outlet and, when it succeeds, its event carries
what it did to one date (:func:`event_extra`). On Airflow 3 the event of a date whose
rows changed also carries the date as its *partition key*, so a downstream DAG scheduled
with ``PartitionedAssetTimetable`` runs once per changed date and never for a rerun
that changed nothing (an event without a partition key wakes no partitioned DAG).
Airflow 2 has no partitions: a downstream DAG reads the dates from the events' extras.

The expiry check, when it aggregates days whose counters were about to expire, emits one
event for all of them (:func:`record_rescue_events`), together with any dates whose writes
no event announced (a task that committed rows and then failed emits nothing). The
producer and the consumers both call :func:`usage_asset`, so they name the same asset
whatever the configuration says.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from usage_agg import config
from usage_agg.identifiers import TableName

if TYPE_CHECKING:
    from usage_agg.aggregate import AggregationResult

#: Host and database of the default URI: the names of the usage database in docker-compose.yaml.
DEFAULT_HOST = "usage-postgres:5432"
DEFAULT_DATABASE = "usage"


def usage_asset_uri(table: str | None = None) -> str:
    """The asset's URI: the ``asset_uri`` option, else one built from the usage table's name."""
    configured = config.value("asset_uri")
    if configured:
        return configured
    name = TableName.parse(table or config.value("table"))
    return f"postgres://{DEFAULT_HOST}/{DEFAULT_DATABASE}/{name.schema or 'public'}/{name.name}"


def usage_asset(table: str | None = None):
    """The usage table as an ``Asset`` (Airflow 3) or ``Dataset`` (Airflow 2)."""
    from airflow.providers.common.compat.assets import Asset

    return Asset(uri=usage_asset_uri(table))


def event_extra(result: AggregationResult) -> dict[str, Any]:
    """What a downstream DAG needs to know of one date's aggregation (JSON values only)."""
    return {
        "usage_date": result.usage_date,
        "table": result.table,
        "merchant_id": result.merchant_id,
        "redis_partition": result.redis_partition,
        "rows_written": result.rows_written,
        "hourly_rows_written": result.hourly_rows_written,
        "changed": changed(result),
        "resets": result.resets,
        "hourly_resets": result.hourly_resets,
        "bad_keys": result.bad_keys,
        # hourly hashes or fields that could not be stored, known and new: the date's hours are incomplete
        "bad_hourly": result.bad_hourly,
    }


def changed(result: AggregationResult) -> bool:
    """Whether the date's stored usage changed since its last event: this run wrote rows, or
    an earlier run committed some and its task failed, so no event announced them."""
    return bool(result.rows_written or result.hourly_rows_written or result.unannounced_writes)


def record_events(outlets, outlet_events, result: AggregationResult, next_day: AggregationResult | None = None) -> int:
    """Put the date's extra (and, on Airflow 3, its partition key) on the task's asset outlets.

    ``next_day``: the day after, when a backfill's task read it too (:mod:`usage_agg.backfill`); the
    event's extra then carries its extra under ``next_day``, and each changed date is a partition
    key. Airflow emits the events when the task succeeds. Returns how many outlets were given one.
    """
    extra = event_extra(result)
    if next_day is not None:
        extra["next_day"] = event_extra(next_day)
    dates = [r.usage_date for r in (result, next_day) if r is not None and changed(r)]
    return _put_on_outlets(outlets, outlet_events, extra, dates)


def rescue_extra(results: list[AggregationResult], late_dates: Sequence[str] = ()) -> dict[str, Any]:
    """The extra of the expiry check's event: the dates it aggregated (what it did to each),
    and ``late_dates``: dates whose writes no event announced (their task failed after commit)."""
    dates = {r.usage_date for r in results if changed(r)} | set(late_dates)
    return {
        "source": "expiry_check",
        "usage_dates": sorted(dates),
        "changed": bool(dates),
        "rescued": [event_extra(r) for r in results],
        "announced_late": sorted(late_dates),
    }


def record_rescue_events(
    outlets, outlet_events, results: list[AggregationResult], late_dates: Sequence[str] = ()
) -> int:
    """Put the expiry check's news on its asset outlets: one event, and on Airflow 3 one
    emission per date, with that date as its partition key (all share the extra).

    Returns how many outlets were given one; none when there is no news (the caller then
    clears its outlets, so that no event without news is emitted).
    """
    extra = rescue_extra(results, late_dates)
    if not extra["changed"]:
        return 0
    return _put_on_outlets(outlets, outlet_events, extra, extra["usage_dates"])


def _put_on_outlets(outlets, outlet_events, extra: dict[str, Any], partition_keys: Sequence[str]) -> int:
    """Give each asset outlet the event's extra and, on Airflow 3.2+, one emission per partition key."""
    from airflow.providers.common.compat.assets import Asset

    recorded = 0
    for outlet in outlets or ():
        if not isinstance(outlet, Asset):
            continue
        accessor = outlet_events[outlet]
        accessor.extra = extra
        if partition_keys and hasattr(accessor, "add_partitions"):  # Airflow 3.2+
            accessor.add_partitions(list(partition_keys))
        recorded += 1
    return recorded
