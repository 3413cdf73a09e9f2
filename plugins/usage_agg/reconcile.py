"""Reconciling one date: what Redis holds against what PostgreSQL stored.

A row is in sync when Redis holds the value it was last read at: ``quantity =
redis_offset + Redis value`` (the offset holds what was counted before a reset, see
:mod:`usage_agg.write_routes`).

Plain Python on a redis-py client and a DB-API connection (the ``usage-agg status``
command runs it through Airflow's connections). Redis is read batch by batch with the
same reader as the aggregation, and each batch is compared with its rows, so memory
stays bounded by the batch size; only the first differences are kept by name.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter as Tally
from dataclasses import asdict, dataclass, field

from usage_agg.keys import HOURLY_PREFIX, KEY_PREFIX, build_key, parse_date
from usage_agg.schema import SchemaNames, missing_objects, resolve_names
from usage_agg.source import DEFAULT_BATCH_SIZE, read_day

#: A key with less time to live than this, never aggregated, is usage about to be lost.
EXPIRY_WARNING = dt.timedelta(days=1)
SAMPLE_LIMIT = 50


@dataclass
class DateStatus:
    usage_date: str
    merchant_id: str | None
    table: str
    schema_exists: bool = True
    redis_keys: int = 0
    redis_bad_keys: int = 0
    #: hourly hashes, or fields of them, in Redis that cannot be stored (bad, as bad keys are)
    redis_bad_hours: int = 0
    table_rows: int = 0
    redis_totals: dict[str, int] = field(default_factory=dict)
    table_totals: dict[str, int] = field(default_factory=dict)
    differing_rows: int = 0
    differences: list[dict] = field(default_factory=list)
    keys_not_in_table: int = 0
    missing_keys: list[str] = field(default_factory=list)
    expiring_unaggregated: int = 0
    expiring_keys: list[dict] = field(default_factory=list)
    last_successful_run: dict | None = None
    open_dead_letters: int = 0
    dead_letters: list[dict] = field(default_factory=list)
    #: keys whose daily total differs from the sum of their hourly counts (a writer bug
    #: worth seeing; it does not make the date out of sync)
    hourly_mismatches: int = 0
    hourly_mismatch_samples: list[dict] = field(default_factory=list)
    #: stored days whose stored hours sum to another quantity (merchant_usage against
    #: merchant_usage_hourly, PostgreSQL alone, so also once Redis expired), with the first
    #: of them by name; a day without hourly rows (a daily-only writer) is not one. Reported,
    #: like :attr:`hourly_mismatches`; it does not make the date out of sync
    stored_hourly_mismatches: int = 0
    stored_hourly_mismatch_samples: list[dict] = field(default_factory=list)
    #: hourly counts in Redis whose value is not stored (none, or another value)
    hourly_differing_rows: int = 0
    #: with ``hourly=True``: the day's 24 UTC hours, Redis against the hourly table
    hours: list[dict] = field(default_factory=list)

    @property
    def in_sync(self) -> bool:
        return (
            self.schema_exists
            and not self.differing_rows
            and not self.keys_not_in_table
            and not self.redis_bad_keys
            and not self.redis_bad_hours
            and not self.open_dead_letters
            and not self.hourly_differing_rows
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "in_sync": self.in_sync}


class SchemaMissing(ValueError):
    """The usage table, or a table beside it, does not exist: the date cannot be checked."""


def reconcile_date(
    redis_client, pg_conn, usage_date, *, merchant_id: str | None = None, table: str = "merchant_usage",
    batch_size: int = DEFAULT_BATCH_SIZE, hourly: bool = False, require_schema: bool = False,
) -> DateStatus:  # fmt: skip
    """Compare one date (optionally one merchant) between Redis and the table, hours included.

    :param hourly: also report the day's 24 UTC hours one by one (:attr:`DateStatus.hours`).
    :param require_schema: raise :class:`SchemaMissing` (before reading Redis) when a table is
        missing, instead of reporting Redis alone with ``schema_exists`` false.
    """
    day = parse_date(usage_date)
    names = resolve_names(pg_conn, table)
    status = DateStatus(usage_date=day.isoformat(), merchant_id=merchant_id, table=str(names.usage))
    missing_tables = set(missing_objects(pg_conn, names)) & {
        str(names.usage),
        str(names.errors),
        str(names.runs),
        str(names.hourly),
    }
    status.schema_exists = not missing_tables
    if missing_tables and require_schema:
        raise SchemaMissing(_missing_tables_message(names, missing_tables))
    redis_totals: Tally[str] = Tally()
    redis_hours: Tally[int] = Tally()
    try:
        with pg_conn.cursor() as cur:
            for batch in read_day(redis_client, day, merchant_id, batch_size=batch_size, hourly=True):
                _compare_counters(redis_client, cur, names, day, batch, status, redis_totals)
                _compare_hours(cur, names, day, batch, status, redis_hours)
            if status.schema_exists:
                _read_table_side(cur, names, day, merchant_id, status)
            if hourly:
                stored_hours = _stored_hours_by_hour(cur, names, day, merchant_id) if status.schema_exists else {}
                status.hours = [
                    {"hour": f"{hour:02d}", "redis": redis_hours.get(hour, 0), "stored": stored_hours.get(hour, 0)}
                    for hour in range(24)
                ]
    finally:
        pg_conn.rollback()  # read-only: end the transaction, also when an error escapes
    status.redis_totals = dict(sorted(redis_totals.items()))
    return status


def _missing_tables_message(names: SchemaNames, missing: set[str]) -> str:
    if str(names.usage) in missing:
        what = "it does not exist"
    else:
        what = f"{', '.join(sorted(missing))} beside it {'does' if len(missing) == 1 else 'do'} not exist"
    return (
        f"table {names.usage} could not be checked: {what} "
        "(no aggregation has created it yet, or the name is not a usage table's)"
    )


def _compare_counters(redis_client, cur, names: SchemaNames, day: dt.date, batch, status: DateStatus, totals) -> None:
    """Tally a batch's counters, and note those that differ from their row or have none."""
    status.redis_keys += len(batch.counters) + len(batch.bad_keys)
    status.redis_bad_keys += len(batch.bad_keys)
    stored = _stored_rows(cur, names, day, batch.counters) if status.schema_exists else {}
    missing = []
    for counter in batch.counters:
        key = counter.key
        totals[key.metric_type] += counter.quantity
        row = stored.get((key.merchant_id, key.metric_type))
        if row is None:
            missing.append(key)
        elif row[0] - row[1] != counter.quantity:
            status.differing_rows += 1
            if len(status.differences) < SAMPLE_LIMIT:
                status.differences.append(
                    {"merchant_id": key.merchant_id, "metric_type": key.metric_type,
                     "redis": counter.quantity, "stored": row[0], "offset": row[1]}
                )  # fmt: skip
    _note_missing(redis_client, status, missing, day)


def _compare_hours(cur, names: SchemaNames, day: dt.date, batch, status: DateStatus, redis_hours) -> None:
    """Tally a batch's hourly counts, and count those whose value is not stored."""
    status.redis_bad_hours += len(batch.bad_hours)
    status.hourly_mismatches += batch.hourly_mismatches
    room = SAMPLE_LIMIT - len(status.hourly_mismatch_samples)
    status.hourly_mismatch_samples.extend(batch.mismatch_samples[: max(room, 0)])
    if not batch.hours:
        return
    for _, _, hour, quantity in batch.hours:
        redis_hours[hour] += quantity
    if not status.schema_exists:
        status.hourly_differing_rows += len(batch.hours)
        return
    cur.execute(
        f"""SELECT count(*) FROM unnest(%s::text[], %s::text[], %s::int[], %s::bigint[]) AS k(m, t, h, v)
            WHERE NOT EXISTS (SELECT 1 FROM {names.hourly.quoted} u
                              WHERE u.merchant_id = k.m AND u.metric_type = k.t
                                AND u.usage_hour = (%s::date + k.h * interval '1 hour') AT TIME ZONE 'UTC'
                                AND u.quantity - u.redis_offset = k.v)""",
        (
            [m.decode() for m, _, _, _ in batch.hours], [t.decode() for _, t, _, _ in batch.hours],
            [h for _, _, h, _ in batch.hours], [q for _, _, _, q in batch.hours], day,
        ),
    )  # fmt: skip
    status.hourly_differing_rows += int(cur.fetchone()[0])


def _stored_hours_by_hour(cur, names: SchemaNames, day: dt.date, merchant_id: str | None) -> dict[int, int]:
    merchant_filter = "" if merchant_id is None else " AND merchant_id = %(merchant)s"
    cur.execute(
        f"""SELECT extract(hour FROM usage_hour AT TIME ZONE 'UTC')::int, sum(quantity) FROM {names.hourly.quoted}
            WHERE usage_hour >= %(day)s::date::timestamp AT TIME ZONE 'UTC'
              AND usage_hour < (%(day)s::date + 1)::timestamp AT TIME ZONE 'UTC'{merchant_filter}
            GROUP BY 1""",
        {"day": day, "merchant": merchant_id},
    )
    return {int(hour): int(total) for hour, total in cur.fetchall()}


def _stored_rows(cur, names: SchemaNames, day: dt.date, counters) -> dict[tuple[str, str], tuple[int, int]]:
    """``(quantity, redis_offset)`` of the stored rows of these counters."""
    if not counters:
        return {}
    cur.execute(
        f"""SELECT t.merchant_id, t.metric_type, t.quantity, t.redis_offset FROM {names.usage.quoted} t
            JOIN unnest(%s::text[], %s::text[]) AS k(merchant_id, metric_type)
              ON t.merchant_id = k.merchant_id AND t.metric_type = k.metric_type
            WHERE t.usage_date = %s""",
        ([c.key.merchant_id for c in counters], [c.key.metric_type for c in counters], day),
    )
    return {(m, t): (int(q), int(o)) for m, t, q, o in cur.fetchall()}


def _note_missing(redis_client, status: DateStatus, missing, day: dt.date) -> None:
    if not missing:
        return
    status.keys_not_in_table += len(missing)
    keys = [build_key(k.merchant_id, day, k.metric_type) for k in missing]
    status.missing_keys.extend(keys[: SAMPLE_LIMIT - len(status.missing_keys)])
    pipe = redis_client.pipeline(transaction=False)
    for key in keys:
        pipe.ttl(key)
    for key, ttl in zip(keys, pipe.execute()):
        # -1: no expiry; -2: gone since it was read
        if 0 <= ttl < EXPIRY_WARNING.total_seconds():
            status.expiring_unaggregated += 1
            if len(status.expiring_keys) < SAMPLE_LIMIT:
                status.expiring_keys.append({"key": key, "ttl_seconds": ttl})


def _read_table_side(cur, names: SchemaNames, day: dt.date, merchant_id: str | None, status: DateStatus) -> None:
    merchant_filter = "" if merchant_id is None else " AND merchant_id = %(merchant)s"
    params: dict[str, object] = {"day": day, "merchant": merchant_id, "limit": SAMPLE_LIMIT}
    cur.execute(
        f"SELECT metric_type, count(*), sum(quantity) FROM {names.usage.quoted}"
        f" WHERE usage_date = %(day)s{merchant_filter} GROUP BY metric_type ORDER BY metric_type",
        params,
    )
    for metric, rows, total in cur.fetchall():
        status.table_rows += int(rows)
        status.table_totals[metric] = int(total)
    # A whole-date run covers every merchant; a merchant's status also accepts that merchant's reruns.
    run_filter = "merchant_id IS NULL" if merchant_id is None else "(merchant_id IS NULL OR merchant_id = %(merchant)s)"
    cur.execute(
        f"""SELECT dag_id, run_id, task_id, merchant_id, finished_at FROM {names.runs.quoted}
            WHERE usage_table = ANY(%(tables)s) AND usage_date = %(day)s AND outcome <> 'failed' AND {run_filter}
            ORDER BY finished_at DESC LIMIT 1""",
        {**params, "tables": names.audit_names},
    )
    row = cur.fetchone()
    if row:
        status.last_successful_run = {
            "dag_id": row[0], "run_id": row[1], "task_id": row[2], "merchant_id": row[3],
            "finished_at": row[4].isoformat(),
        }  # fmt: skip
    _compare_stored_days_with_hours(cur, names, day, merchant_id, status)
    # One merchant's letters: those of its daily keys and of their hourly hashes (a hash's own
    # letter, or one of its fields'), compared as raw bytes: a key prefix, then a metric type
    # (which holds no ':'). No LIKE, so '_' and '%' in an id are only themselves.
    key_filter = (
        ""
        if merchant_id is None
        else " AND EXISTS (SELECT 1 FROM unnest(%(prefixes)s::bytea[]) AS p(prefix)"
        " WHERE substring(raw_key FOR length(p.prefix)) = p.prefix"
        " AND position('\\x3a'::bytea IN substring(raw_key FROM length(p.prefix) + 1)) = 0)"
    )
    params["prefixes"] = _letter_prefixes(merchant_id, day)
    cur.execute(
        f"""SELECT redis_key, reason, times_seen, last_seen, count(*) OVER () FROM {names.errors.quoted}
            WHERE usage_date = %(day)s AND resolved_at IS NULL{key_filter}
            ORDER BY redis_key LIMIT %(limit)s""",
        params,
    )
    for key, reason, seen, last_seen, total in cur.fetchall():
        status.open_dead_letters = int(total)
        status.dead_letters.append(
            {"key": key, "reason": reason, "times_seen": int(seen), "last_seen": last_seen.isoformat()}
        )


def _letter_prefixes(merchant_id: str | None, day: dt.date) -> list[bytes]:
    """How the raw keys of one merchant's dead letters of ``day`` begin: its daily keys' and
    their hourly hashes' names up to the metric type (none for the whole day)."""
    if merchant_id is None:
        return []
    rest = f"{merchant_id}:{day.isoformat()}:"
    return [(prefix + rest).encode("utf-8", "surrogateescape") for prefix in (KEY_PREFIX, HOURLY_PREFIX)]


def _compare_stored_days_with_hours(
    cur, names: SchemaNames, day: dt.date, merchant_id: str | None, status: DateStatus
) -> None:
    """Count (and name the first of) the stored days whose stored hours sum to another quantity.

    One statement for the date, whatever its size: the day's hourly rows summed per merchant
    and metric, against their daily rows. Only what has hours is compared (a daily-only
    writer's days have none); hours without a daily row are a disagreement (daily ``None``).
    """
    merchant_filter = "" if merchant_id is None else " AND merchant_id = %(merchant)s"
    cur.execute(
        f"""WITH hours AS (
                SELECT merchant_id, metric_type, sum(quantity) AS hourly_sum FROM {names.hourly.quoted}
                WHERE usage_hour >= %(day)s::date::timestamp AT TIME ZONE 'UTC'
                  AND usage_hour < (%(day)s::date + 1)::timestamp AT TIME ZONE 'UTC'{merchant_filter}
                GROUP BY merchant_id, metric_type
            )
            SELECT h.merchant_id, h.metric_type, d.quantity, h.hourly_sum, count(*) OVER ()
            FROM hours h LEFT JOIN {names.usage.quoted} d
              ON d.usage_date = %(day)s AND d.merchant_id = h.merchant_id AND d.metric_type = h.metric_type
            WHERE d.quantity IS DISTINCT FROM h.hourly_sum
            ORDER BY h.merchant_id, h.metric_type LIMIT %(limit)s""",
        {"day": day, "merchant": merchant_id, "limit": SAMPLE_LIMIT},
    )
    for merchant, metric, daily, hourly_sum, total in cur.fetchall():
        status.stored_hourly_mismatches = int(total)
        status.stored_hourly_mismatch_samples.append(
            {"merchant_id": merchant, "metric_type": metric,
             "daily": None if daily is None else int(daily), "hourly_sum": int(hourly_sum)}
        )  # fmt: skip
