"""One date end to end: Redis counters -> validation -> PostgreSQL rows.

Plain Python on a redis-py client and a DB-API connection, no Airflow: the
operator, the CLI, the benchmark and the tests all run this same function.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import asdict, dataclass, field

from usage_agg.keys import parse_date
from usage_agg.prefetch import prefetched
from usage_agg.sink import (
    DEFAULT_LOCK_TIMEOUT,
    SAMPLE_LIMIT,
    DayWriter,
    SchemaNames,
    ensure_schema,
    record_failed_run,
)
from usage_agg.source import DEFAULT_BATCH_SIZE, DEFAULT_SCAN_COUNT, discovery_method, read_day

log = logging.getLogger(__name__)

#: Bad keys named one by one in the log (and the result); all are counted and recorded.
BAD_KEY_LOG_LIMIT = 100
#: Staged rows merged at a time: PostgreSQL merges a chunk while Redis is read for the next.
MERGE_EVERY_ROWS = 20_000


@dataclass
class AggregationResult:
    """What one date's aggregation did; JSON-serialisable through :meth:`to_dict`."""

    usage_date: str
    merchant_id: str | None
    table: str
    keys_found: int = 0
    rows_written: int = 0
    rows_unchanged: int = 0
    decreases_refused: int = 0
    bad_keys: int = 0
    #: bad keys not reported by an earlier run (new, changed, or bad again after a fix)
    new_bad_keys: int = 0
    #: keys matched by SCAN that expired or were deleted before they were read
    vanished_keys: int = 0
    allow_decrease: bool = False
    #: how the keys were found: "index" (the day's index set) or "scan"
    discovery: str = "scan"
    #: the Redis primary read, when the day is fanned out over a cluster's primaries
    redis_partition: str | None = None
    duration_seconds: float = 0.0
    bad_key_samples: list[dict] = field(default_factory=list)
    refused_decrease_samples: list[dict] = field(default_factory=list)

    @property
    def records_aggregated(self) -> int:
        return self.keys_found - self.bad_keys

    def to_dict(self) -> dict:
        return asdict(self)


def aggregate_day(
    redis_client,
    pg_conn,
    usage_date: str | dt.date,
    *,
    merchant_id: str | None = None,
    table: str = "merchant_usage",
    allow_decrease: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    scan_count: int = DEFAULT_SCAN_COUNT,
    lock_timeout: dt.timedelta = DEFAULT_LOCK_TIMEOUT,
    discovery: str = "auto",
    audit: dict | None = None,
    logger: logging.Logger | logging.LoggerAdapter = log,
    create_schema: bool = True,
    partition: str | None = None,
    partition_count: int | None = None,
) -> AggregationResult:
    """Copy one date's counters (optionally one merchant's) into the usage table.

    Redis holds each day's running total and PostgreSQL takes that absolute value,
    so any number of reruns gives the same rows. A date with no keys left in Redis
    leaves its rows alone. The whole date is one transaction.

    :param discovery: ``auto`` (the day's index when it exists, else ``SCAN``), ``index`` or ``scan``.
    :param audit: ``dag_id``/``run_id``/``task_id`` for the audit row.
    :param create_schema: create the tables when missing (idempotent).
    :param partition: aggregate only the keys of this Redis Cluster primary (one part
        of a fanned-out day, see :mod:`usage_agg.partitions`); its transaction commits
        that part alone. Parts of one day run side by side, never beside a whole-day run.
    :param partition_count: how many parts the day was split into, for the audit: the
        day counts as aggregated once every part of one run succeeded.
    """
    day = parse_date(usage_date)
    if merchant_id is not None and (not isinstance(merchant_id, str) or not merchant_id):
        raise ValueError(f"merchant_id: must be a non-empty string or None, got {merchant_id!r}")
    if (partition is None) != (partition_count is None) or (partition_count is not None and partition_count < 1):
        raise ValueError(
            f"redis_partition and partition_count: give both (a positive count) or neither, "
            f"got {partition!r} and {partition_count!r}"
        )
    names = ensure_schema(pg_conn, table) if create_schema else SchemaNames.for_table(table)
    result = AggregationResult(
        usage_date=day.isoformat(), merchant_id=merchant_id, table=str(names.usage), allow_decrease=allow_decrease,
        discovery=discovery_method(redis_client, day, discovery), redis_partition=partition,
    )  # fmt: skip
    started = time.monotonic()
    started_at = dt.datetime.now(dt.timezone.utc)
    scope = f" for merchant {merchant_id!r}" if merchant_id is not None else ""
    if partition is not None:
        scope += f" on Redis primary {partition} (part of {partition_count})"
    logger.info("Starting aggregation for date: %s%s", result.usage_date, scope)

    audit_base = {
        **(audit or {}), "usage_table": result.table, "usage_date": day, "started_at": started_at,
        "redis_partition": partition, "partition_count": partition_count,
    }  # fmt: skip
    try:
        _aggregate_in_one_transaction(
            redis_client, pg_conn, names, day, result, audit_base, logger, scope,
            lock_timeout=lock_timeout, batch_size=batch_size, scan_count=scan_count,
        )  # fmt: skip
    except Exception as err:
        _audit_failure(pg_conn, names, result, audit_base, err, logger)
        raise

    result.duration_seconds = round(time.monotonic() - started, 3)
    if result.bad_keys > BAD_KEY_LOG_LIMIT:
        logger.warning(
            "%d more bad keys not listed here; all are in %s", result.bad_keys - BAD_KEY_LOG_LIMIT, names.errors
        )
    if result.decreases_refused:
        logger.warning(
            "Refused to lower %d stored totals to a smaller Redis value (Redis restarted or evicted keys?); "
            "rerun with allow_decrease to accept them. First ones: %s",
            result.decreases_refused,
            result.refused_decrease_samples,
        )
    logger.info(
        "Completed. Records aggregated: %d, Errors: %d (rows written: %d, unchanged: %d, decreases refused: %d)",
        result.records_aggregated,
        result.bad_keys,
        result.rows_written,
        result.rows_unchanged,
        result.decreases_refused,
    )
    return result


def _aggregate_in_one_transaction(
    redis_client, pg_conn, names, day, result, audit_base, logger, scope, *, lock_timeout, batch_size, scan_count
) -> None:
    with DayWriter(
        pg_conn, names, day, allow_decrease=result.allow_decrease, lock_timeout=lock_timeout,
        partition=result.redis_partition,
    ) as writer:  # fmt: skip
        batches = prefetched(
            lambda: read_day(
                redis_client, day, result.merchant_id, batch_size=batch_size, scan_count=scan_count,
                method=result.discovery, partition=result.redis_partition, bulk=True,
            )
        )  # fmt: skip
        debug = logger.isEnabledFor(logging.DEBUG)
        staged = 0
        for batch in batches:
            writer.stage_plain_rows(batch.plain_rows)
            writer.stage(batch.counters)
            result.new_bad_keys += writer.record_bad_keys(batch.bad_keys)
            result.keys_found += len(batch.plain_rows) + len(batch.counters) + len(batch.bad_keys)
            result.bad_keys += len(batch.bad_keys)
            result.vanished_keys += batch.vanished
            if debug:
                _log_counters(logger, batch)
            for bad in batch.bad_keys:
                _report_bad_key(logger, result, bad)
            staged += len(batch.plain_rows) + len(batch.counters)
            if staged >= MERGE_EVERY_ROWS:  # merge while the reader fetches the next batches
                _add_merge(result, writer.merge())
                staged = 0
        logger.info("Found %d usage keys to process", result.keys_found)
        logger.debug("Keys found through %s", "the day's index" if result.discovery == "index" else "SCAN")
        if result.keys_found == 0:
            logger.warning(
                "No usage keys in Redis for %s%s (expired or never tracked); stored rows are left as they are",
                result.usage_date,
                scope,
            )
        if staged or result.keys_found == 0:
            _add_merge(result, writer.merge())
        writer.record_run({**audit_base, **_counts(result), "outcome": _outcome(result)})


def _add_merge(result: AggregationResult, merged) -> None:
    result.rows_written += merged.rows_written
    result.rows_unchanged += merged.rows_unchanged
    result.decreases_refused += merged.decreases_refused
    room = SAMPLE_LIMIT - len(result.refused_decrease_samples)
    result.refused_decrease_samples.extend(merged.refused_samples[: max(room, 0)])


def _log_counters(logger, batch) -> None:
    for merchant, metric, quantity in batch.plain_rows:
        logger.debug("Key %s:%s = %s", merchant.decode(), metric.decode(), quantity.decode())
    for counter in batch.counters:
        logger.debug("Key %s:%s = %d", counter.key.merchant_id, counter.key.metric_type, counter.quantity)


def _audit_failure(pg_conn, names, result, audit_base, err, logger) -> None:
    """Best effort: the date's transaction is rolled back, but the audit should show the attempt."""
    try:
        pg_conn.rollback()
        record_failed_run(
            pg_conn, names, {**audit_base, **_counts(result), "outcome": "failed", "error": f"{type(err).__name__}: {err}"[:1000]}
        )
    except Exception as audit_err:  # the connection itself may be what failed
        logger.warning("Could not record the failed run in %s: %s", names.runs, audit_err)


def _counts(result: AggregationResult) -> dict:
    return {
        key: getattr(result, key)
        for key in ("merchant_id", "keys_found", "rows_written", "rows_unchanged", "decreases_refused", "bad_keys", "new_bad_keys")
    }


def _report_bad_key(logger, result: AggregationResult, bad) -> None:
    if len(result.bad_key_samples) >= BAD_KEY_LOG_LIMIT:
        return
    preview = None if bad.raw_value is None else bad.raw_value.decode("utf-8", "backslashreplace")
    result.bad_key_samples.append({"key": bad.key_text, "reason": bad.reason, "value": preview})
    logger.warning("Bad key %r: %s (value %r)", bad.key_text, bad.reason, preview)


def _outcome(result: AggregationResult) -> str:
    if result.new_bad_keys:
        return "new_bad_keys"
    if result.bad_keys:
        return "known_bad_keys"
    return "success"
