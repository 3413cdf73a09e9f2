"""One date end to end: Redis counters -> validation -> PostgreSQL rows.

Plain Python on a redis-py client and a DB-API connection, no Airflow: the
operator, the CLI, the benchmark and the tests all run this same function.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from usage_agg.audit import record_failed_run
from usage_agg.db_errors import describe
from usage_agg.keys import HOURLY_PREFIX, parse_date
from usage_agg.lives import Source, note_keys_taken_in, register_incarnations
from usage_agg.merge_result import MergeResult, add_merge
from usage_agg.options import AggregationOptions
from usage_agg.partitions import check_layout_unchanged, part_layout
from usage_agg.prefetch import prefetched
from usage_agg.samples import add_samples
from usage_agg.schema import SchemaNames, ensure_schema, resolve_names
from usage_agg.servers import RedisTookKeysIn, check_unchanged, read_incarnations
from usage_agg.sink import DayWriter, refuse_autocommit
from usage_agg.source import discovery_method, read_day

log = logging.getLogger(__name__)


class Logger(Protocol):
    """What the core logs through: a :mod:`logging` logger, or an operator's ``self.log``
    (on Airflow 3 the task SDK's structlog logger, which is not a ``logging.Logger``)."""

    def isEnabledFor(self, level: int, /) -> Any: ...
    def debug(self, msg: Any, /, *args: Any) -> Any: ...
    def info(self, msg: Any, /, *args: Any) -> Any: ...
    def warning(self, msg: Any, /, *args: Any) -> Any: ...
    def error(self, msg: Any, /, *args: Any) -> Any: ...


#: Bad keys named one by one in the log (and the result); all are counted and recorded.
BAD_KEY_LOG_LIMIT = 100
HOURLY_KEY_PREFIX = HOURLY_PREFIX.encode()
#: Rows read per chunk. A day's first aggregation writes each chunk while Redis is read
#: for the next; a day with rows stages them all and compares once (``DayWriter.end_chunk``).
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
    #: Redis values lower than the value last read, which did not lower the stored total
    decreases_refused: int = 0
    #: counters found reset (Redis lost data: a restart, failover, restore or eviction);
    #: what was counted before is kept (see :mod:`usage_agg.write_routes`)
    resets: int = 0
    bad_keys: int = 0
    #: hourly rows (from the hourly hashes beside the keys) written, unchanged, found reset
    hourly_rows_written: int = 0
    hourly_rows_unchanged: int = 0
    hourly_resets: int = 0
    #: hourly hashes, or fields of them, that could not be aggregated (dead-lettered)
    bad_hourly: int = 0
    #: keys whose daily total differs from the sum of their hourly counts (where a key has hours)
    hourly_mismatches: int = 0
    #: bad keys not reported by an earlier run (new, changed, or bad again after a fix)
    new_bad_keys: int = 0
    #: keys matched by SCAN that expired or were deleted before they were read
    vanished_keys: int = 0
    allow_decrease: bool = False
    #: an earlier run committed rows of this date and its task failed, so no asset event
    #: announced them: this run's event does (``assets.changed``)
    unannounced_writes: bool = False
    #: how the keys were found: "index" (the day's index set) or "scan"
    discovery: str = "scan"
    #: the Redis primary read, when the day is fanned out over a cluster's primaries
    redis_partition: str | None = None
    duration_seconds: float = 0.0
    bad_key_samples: list[dict] = field(default_factory=list)
    reset_samples: list[dict] = field(default_factory=list)
    hourly_mismatch_samples: list[dict] = field(default_factory=list)

    @property
    def records_aggregated(self) -> int:
        return self.keys_found - self.bad_keys

    def to_dict(self) -> dict:
        return asdict(self)


def aggregate_day(
    redis_client,
    pg_conn,
    usage_date: str | dt.date,
    options: AggregationOptions | None = None,
    *,
    audit: dict | None = None,
    logger: Logger = log,
    **settings,
) -> AggregationResult:
    """Copy one date's counters (optionally one merchant's) into the usage table.

    Redis holds each day's running total and PostgreSQL takes that absolute value
    (plus what earlier resets kept, see :mod:`usage_agg.write_routes`), so any number of
    reruns gives the same rows. A date with no keys left in Redis leaves its rows
    alone. The whole date is one transaction.

    :param options: what shapes the run (:class:`~usage_agg.options.AggregationOptions`);
        keyword ``settings`` build one, or change the one given (``table=...``).
    :param audit: ``dag_id``/``run_id``/``task_id`` for the audit row.
    """
    options = AggregationOptions(**settings) if options is None else options.replace(**settings)
    day = parse_date(usage_date)
    merchant_id, table, partition = options.merchant_id, options.table, options.partition
    refuse_autocommit(pg_conn, f"{table} {day}")  # before the schema, the Redis lives or the audit are written
    try:
        names = ensure_schema(pg_conn, table) if options.create_schema else resolve_names(pg_conn, table)
        method = discovery_method(redis_client, day, options.discovery, merchant_id, warn=logger.warning)
    except Exception as err:
        if not isinstance(err, ValueError):  # a refused argument says so itself
            logger.error("Aggregation of %s failed before it began: %s", day.isoformat(), describe(err, pg_conn))
        raise
    result = AggregationResult(
        usage_date=day.isoformat(), merchant_id=merchant_id, table=str(names.usage),
        allow_decrease=options.allow_decrease, discovery=method, redis_partition=partition,
    )  # fmt: skip
    started = time.monotonic()
    started_at = dt.datetime.now(dt.UTC)
    scope = f" for merchant {merchant_id!r}" if merchant_id is not None else ""
    if partition is not None:
        scope += f" on Redis primary {partition} (part of {options.partition_count})"
    logger.info("Starting aggregation for date: %s%s", result.usage_date, scope)

    audit_base = {
        **(audit or {}), "usage_table": result.table, "usage_date": day, "started_at": started_at,
        "redis_partition": partition, "partition_count": options.partition_count,
    }  # fmt: skip
    run = _Run(redis_client, pg_conn, names, day, options, result, audit_base, logger, scope)
    try:
        _aggregate_in_one_transaction(run)
    except Exception as err:
        logger.error("Aggregation of %s%s failed: %s", result.usage_date, scope, describe(err, pg_conn))
        _audit_failure(run, err)
        raise

    result.duration_seconds = round(time.monotonic() - started, 3)
    if result.bad_keys > BAD_KEY_LOG_LIMIT:
        logger.warning(
            "%d more bad keys not listed here; all are in %s", result.bad_keys - BAD_KEY_LOG_LIMIT, names.errors
        )
    if result.resets:
        logger.warning(
            "Redis lost data: %d counter(s) of %s were reset (restart, failover, snapshot restore or eviction). "
            "What was counted before is kept and only growth since is added; rerun with allow_decrease only if "
            "Redis holds the true totals. First ones: %s",
            result.resets,
            result.usage_date,
            result.reset_samples,
        )
    if result.hourly_mismatches:
        logger.warning(
            "%d key(s) of %s have a daily total that differs from the sum of their hourly counts, or hours "
            "without a daily counter (a writer that updates only one of them?). First ones: %s",
            result.hourly_mismatches,
            result.usage_date,
            result.hourly_mismatch_samples,
        )
    logger.info(
        "Completed. Records aggregated: %d, Errors: %d (rows written: %d, unchanged: %d, resets: %d; "
        "hourly rows written: %d)",
        result.records_aggregated,
        result.bad_keys,
        result.rows_written,
        result.rows_unchanged,
        result.resets,
        result.hourly_rows_written,
    )
    return result


@dataclass
class _Progress:
    """How far a run got before it failed, for the failed run's audit row."""

    keys_read: int = 0
    rows_merged: int = 0


@dataclass
class _Run:
    """One run of :func:`aggregate_day` once it has begun: what it reads and writes, how, and
    what it has done so far (the one argument of the steps below, instead of ten)."""

    redis_client: Any
    pg_conn: Any
    names: SchemaNames
    day: dt.date
    options: AggregationOptions
    result: AggregationResult
    #: the audit row's fields known before the run (who ran it, the table, the date, when)
    audit_base: dict
    logger: Logger
    #: " for merchant ..." / " on Redis primary ...": how the log names the run's part of the day
    scope: str
    progress: _Progress = field(default_factory=_Progress)


def _aggregate_in_one_transaction(run: _Run) -> None:
    redis_client, pg_conn, names, day, options = run.redis_client, run.pg_conn, run.names, run.day, run.options
    result, audit_base, logger, scope, progress = run.result, run.audit_base, run.logger, run.scope, run.progress
    # Which life of which Redis server is read: noted before the day's transaction (in
    # one of its own), checked again before commit, so a restart mid-run fails the run.
    servers = read_incarnations(redis_client, options.partition)
    layout = part_layout(redis_client, options.partition)
    sources = register_incarnations(pg_conn, names, servers, options.lock_timeout)
    # The reader may run a whole chunk ahead: while PostgreSQL merges one chunk, Redis is
    # read for the next (a few MB of batches at most).
    reading = prefetched(
        lambda: read_day(
            redis_client, day, options.merchant_id, batch_size=options.batch_size, scan_count=options.scan_count,
            method=result.discovery, partition=options.partition, bulk=True, hourly=options.hourly,
            layout=layout,
        ),
        depth=-(-MERGE_EVERY_ROWS // options.batch_size) + 1,
    )  # fmt: skip
    with (
        _noting_keys_taken_in(pg_conn, names, logger),  # left last: after the day's transaction rolled back
        DayWriter(
            pg_conn,
            names,
            day,
            allow_decrease=options.allow_decrease,
            lock_timeout=options.lock_timeout,
            partition=options.partition,
        ) as writer,
        closing(reading) as batches,
    ):  # closing: a failure stops the reader thread at once
        debug = logger.isEnabledFor(logging.DEBUG)

        def merged(outcome: MergeResult) -> None:
            add_merge(result, outcome)
            progress.rows_merged += outcome.rows_written + outcome.rows_unchanged
            _add_bad_keys(writer, logger, result, outcome.refused)

        for batch in batches:
            assert batch.source is not None  # read_day names each batch's server
            merged(writer.use_source(sources.get(batch.source, Source(None))))
            refused = writer.stage_plain_rows(batch.plain_rows) + writer.stage(batch.counters)
            refused += writer.stage_hours(batch.hours)
            result.keys_found += len(batch.plain_rows) + len(batch.counters) + len(batch.bad_keys)
            progress.keys_read = result.keys_found
            result.vanished_keys += batch.vanished
            _add_mismatches(result, batch)
            if debug:
                _log_counters(logger, batch)
            _add_bad_keys(writer, logger, result, batch.bad_keys + batch.bad_hours + refused)
            if writer.window >= MERGE_EVERY_ROWS:  # merge while the reader fetches the next batches
                merged(writer.end_chunk())
        logger.info("Found %d usage keys to process", result.keys_found)
        logger.debug("Keys found through %s", "the day's index" if result.discovery == "index" else "SCAN")
        if result.keys_found == 0:
            logger.warning(
                "No usage keys in Redis for %s%s (expired or never tracked); stored rows are left as they are",
                result.usage_date,
                scope,
            )
        if writer.staged or result.keys_found == 0:
            merged(writer.merge())
        check_unchanged(redis_client, servers, options.partition)
        check_layout_unchanged(redis_client, options.partition, layout)
        result.unannounced_writes = writer.earlier_writes_unannounced()
        writer.record_run({**audit_base, **_counts(result), "outcome": _outcome(result)})


@contextmanager
def _noting_keys_taken_in(pg_conn, names, logger) -> Iterator[None]:
    """A run that saw a server noted as started empty take keys in fails; record first, in a
    transaction of its own, that the server did not start empty, so its retry never takes
    those keys for counts begun from zero, whatever its statistics say by then."""
    try:
        yield
    except RedisTookKeysIn as err:
        try:
            note_keys_taken_in(pg_conn, names, err.run_id)
        except Exception as note_err:  # the run fails anyway; its retry reads the server again
            logger.warning("Could not record that Redis took keys in: %s", describe(note_err, pg_conn))
        raise


def _add_mismatches(result: AggregationResult, batch) -> None:
    result.hourly_mismatches += batch.hourly_mismatches
    add_samples(result.hourly_mismatch_samples, batch.mismatch_samples)


def _add_bad_keys(writer: DayWriter, logger, result: AggregationResult, bad_keys: list) -> None:
    if not bad_keys:
        return
    result.new_bad_keys += writer.record_bad_keys(bad_keys)
    hourly = sum(1 for bad in bad_keys if bad.raw_key.startswith(HOURLY_KEY_PREFIX))
    result.bad_hourly += hourly
    result.bad_keys += len(bad_keys) - hourly
    for bad in bad_keys:
        _report_bad_key(logger, result, bad)


def _log_counters(logger, batch) -> None:
    for merchant, metric, quantity in batch.plain_rows:
        logger.debug("Key %s:%s = %s", merchant.decode(), metric.decode(), quantity.decode())
    for counter in batch.counters:
        logger.debug("Key %s:%s = %d", counter.key.merchant_id, counter.key.metric_type, counter.quantity)


def _audit_failure(run: _Run, err: Exception) -> None:
    """Best effort: the date's transaction is rolled back, but the audit should show the attempt.

    It records what was committed (nothing) and, in ``error``, how far the run got.
    """
    pg_conn, names, result, audit_base, progress, logger = (
        run.pg_conn, run.names, run.result, run.audit_base, run.progress, run.logger,
    )  # fmt: skip
    error = (
        f"{type(err).__name__}: {describe(err, pg_conn)} (rolled back after reading {progress.keys_read} keys "
        f"and merging {progress.rows_merged} rows; nothing of this run was committed)"
    )
    try:
        pg_conn.rollback()
        record_failed_run(pg_conn, names.runs.quoted, {**audit_base, **_counts(result), "error": error[:2000]})
    except Exception as audit_err:  # the connection itself may be what failed
        logger.warning("Could not record the failed run in %s: %s", names.runs, describe(audit_err))


def _counts(result: AggregationResult) -> dict:
    return {
        key: getattr(result, key)
        for key in (
            "merchant_id", "keys_found", "rows_written", "rows_unchanged", "decreases_refused", "resets", "bad_keys",
            "new_bad_keys", "hourly_rows_written", "hourly_mismatches", "bad_hourly",
        )
    }  # fmt: skip


def _report_bad_key(logger, result: AggregationResult, bad) -> None:
    if len(result.bad_key_samples) >= BAD_KEY_LOG_LIMIT:
        return
    preview = None if bad.raw_value is None else bad.raw_value.decode("utf-8", "backslashreplace")
    result.bad_key_samples.append({"key": bad.key_text, "reason": bad.reason, "value": preview})
    logger.warning("Bad key %r: %s (value %r)", bad.key_text, bad.reason, preview)


def _outcome(result: AggregationResult) -> str:
    if result.new_bad_keys:
        return "new_bad_keys"
    if result.bad_keys or result.bad_hourly:  # a date whose hours are incomplete says so too
        return "known_bad_keys"
    return "success"
