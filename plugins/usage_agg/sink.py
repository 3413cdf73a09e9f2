"""Writing one day's rows to PostgreSQL.

One date is one transaction (:class:`DayWriter`): an advisory lock per table and
date serialises writers, counters are streamed into a temporary staging table with
``COPY``, and a merge statement upserts each staged chunk. The merge never lowers a stored
total unless asked to, and never rewrites a row whose value did not change.

Works on the DB-API connection of either driver that Airflow's ``PostgresHook``
returns: psycopg2 (Airflow 2) or psycopg 3 (Airflow 3).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources

from usage_agg.identifiers import TableName, quote_identifier
from usage_agg.source import BadKey, Counter

#: Bumped with every change to sql/schema.sql; stored as the usage table's comment.
SCHEMA_VERSION = 3
ERRORS_TABLE = "usage_aggregation_errors"
RUNS_TABLE = "usage_aggregation_runs"
DEFAULT_LOCK_TIMEOUT = dt.timedelta(minutes=10)
MERGE_WORK_MEM = "64MB"
#: How many refused decreases are returned (and logged) by name; all are counted.
SAMPLE_LIMIT = 20

_STAGE = "pg_temp.usage_agg_stage"


@dataclass(frozen=True)
class SchemaNames:
    """The usage table and what is created beside it, in the same schema."""

    usage: TableName
    errors: TableName
    runs: TableName
    weekly: TableName
    monthly: TableName

    @classmethod
    def for_table(cls, table: str | TableName) -> SchemaNames:
        usage = table if isinstance(table, TableName) else TableName.parse(table)
        return cls(
            usage,
            usage.sibling(ERRORS_TABLE),
            usage.sibling(RUNS_TABLE),
            usage.sibling(f"{usage.name[:55]}_weekly"),
            usage.sibling(f"{usage.name[:55]}_monthly"),
        )

    def ddl(self) -> str:
        template = resources.files("usage_agg").joinpath("sql/schema.sql").read_text("utf-8")
        return template.format(
            usage_table=self.usage.quoted,
            errors_table=self.errors.quoted,
            runs_table=self.runs.quoted,
            weekly_view=self.weekly.quoted,
            monthly_view=self.monthly.quoted,
            usage_date_index=_index_name(self.usage, "usage_date_idx"),
            errors_open_index=_index_name(self.errors, "open_idx"),
            runs_date_index=_index_name(self.runs, "date_idx"),
            version_comment=f"'{_version_comment()}'",
        )


def _version_comment() -> str:
    return f"usage-agg schema {SCHEMA_VERSION}"


def _index_name(table: TableName, suffix: str) -> str:
    return quote_identifier(f"{table.name[: 62 - len(suffix)]}_{suffix}")


def ensure_schema(conn, table: str | TableName) -> SchemaNames:
    """Create or upgrade the usage, dead-letter and audit tables and the views, and commit.

    The usual case costs one catalogue query: the usage table's comment names the
    current schema version, and nothing is done. Otherwise the idempotent DDL runs;
    concurrent first runs would race on it, so an advisory lock makes them take turns.
    """
    names = SchemaNames.for_table(table)
    if schema_is_current(conn, names):
        return names
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s)::bigint)", (f"usage_agg schema {names.usage}",))
        if names.usage.schema:
            cur.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_identifier(names.usage.schema)}")
        cur.execute(names.ddl())
    conn.commit()
    return names


def _catalogue(conn, names: SchemaNames) -> tuple[list[str], str | None]:
    """The schema's missing tables and views, and the usage table's version comment.

    One read-only query; it ends its transaction.
    """
    objects = [names.usage, names.errors, names.runs, names.weekly, names.monthly]
    with conn.cursor() as cur:
        cur.execute(
            """SELECT array_remove(array_agg(CASE WHEN to_regclass(n) IS NULL THEN n END), NULL),
                      obj_description(to_regclass(%s), 'pg_class')
               FROM unnest(%s::text[]) AS n""",
            (names.usage.quoted, [o.quoted for o in objects]),
        )
        missing_quoted, comment = cur.fetchone()
    conn.rollback()
    return [str(o) for o in objects if o.quoted in set(missing_quoted)], comment


def missing_objects(conn, names: SchemaNames) -> list[str]:
    """The tables and views of the schema that do not exist."""
    return _catalogue(conn, names)[0]


def schema_exists(conn, names: SchemaNames) -> bool:
    return not missing_objects(conn, names)


def schema_is_current(conn, names: SchemaNames) -> bool:
    """Whether the whole schema exists at the current version."""
    missing, comment = _catalogue(conn, names)
    return not missing and comment == _version_comment()


@dataclass
class MergeResult:
    rows_written: int = 0
    rows_unchanged: int = 0
    decreases_refused: int = 0
    refused_samples: list[dict] = field(default_factory=list)


class DayWriter:
    """The transaction that writes one date; use as a context manager.

    On a clean exit the transaction commits; on any exception it rolls back, so a
    run that fails part-way leaves the date exactly as it was.
    """

    def __init__(
        self,
        conn,
        names: SchemaNames,
        usage_date: dt.date,
        *,
        allow_decrease: bool = False,
        lock_timeout: dt.timedelta = DEFAULT_LOCK_TIMEOUT,
        partition: str | None = None,
    ) -> None:
        self.conn = conn
        self.names = names
        self.usage_date = usage_date
        self.allow_decrease = allow_decrease
        self.lock_timeout = lock_timeout
        self.partition = partition
        self._cur = None
        #: (merchant_id, metric_type) as UTF-8 bytes, staged since the last merge
        self._staged_keys: set[tuple[bytes, bytes]] = set()

    def __enter__(self) -> DayWriter:
        self._cur = self.conn.cursor()
        cur = self._cur
        # A bounded wait: a writer that cannot get the date within lock_timeout fails
        # with LockNotAvailable, which is transient and retried by Airflow.
        cur.execute("SELECT set_config('lock_timeout', %s, true)", (f"{int(self.lock_timeout.total_seconds() * 1000)}ms",))
        day_lock = (f"usage_agg {self.names.usage}", self.usage_date.toordinal())
        if self.partition is None:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s), %s)", day_lock)
        else:
            # The parts of a fanned-out day write disjoint keys: they share the day's
            # lock (so no whole-day writer runs beside them) and take turns per part.
            cur.execute("SELECT pg_advisory_xact_lock_shared(hashtext(%s), %s)", day_lock)
            cur.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s), %s)", (f"{day_lock[0]} {self.partition}", day_lock[1])
            )
        cur.execute("SELECT set_config('lock_timeout', '0', true)")
        # A day with no stored rows yet (its first aggregation, the heavy one) needs no
        # comparison with stored rows: every counter is new.
        cur.execute(f"SELECT NOT EXISTS (SELECT 1 FROM {self.names.usage.quoted} WHERE usage_date = %s)", (self.usage_date,))
        self._day_was_empty = cur.fetchone()[0]
        # The merge hashes a whole day: give it memory rather than let it spill to disk.
        cur.execute("SELECT set_config('work_mem', %s, true)", (MERGE_WORK_MEM,))
        cur.execute(
            f"CREATE TEMPORARY TABLE {_STAGE} (merchant_id text NOT NULL, metric_type text NOT NULL,"
            " quantity bigint NOT NULL) ON COMMIT DROP"
        )
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.conn.commit()
            else:
                self.conn.rollback()
        finally:
            self._cur.close()

    def stage(self, counters: list[Counter]) -> None:
        """Stream a batch of counters into the staging table with ``COPY``."""
        rows = [
            (c.key.merchant_id, c.key.metric_type, c.quantity)
            for c in counters
            if self._first_time((c.key.merchant_id.encode(), c.key.metric_type.encode()))
        ]
        if rows:
            _copy_rows(self._cur, f"{_STAGE} (merchant_id, metric_type, quantity)", rows)

    def _first_time(self, key: tuple[bytes, bytes]) -> bool:
        """Stage each key once per merge, so the merge needs no GROUP BY.

        SCAN and SSCAN may return a key twice; its first value is kept (a later read
        can only be a little higher, and the next run takes it).
        """
        if key in self._staged_keys:
            return False
        self._staged_keys.add(key)
        return True

    def stage_plain_rows(self, rows: list[tuple[bytes, bytes, bytes]]) -> None:
        """Stage checked UTF-8 rows (see :attr:`usage_agg.source.Batch.plain_rows`) in COPY's text format.

        They hold no character COPY would need escaped, so the batch is one join.
        """
        keys = [row[:2] for row in rows]
        unique = set(keys)
        if len(unique) == len(keys) and self._staged_keys.isdisjoint(unique):
            self._staged_keys |= unique
        else:  # a key staged twice: keep its first row only
            rows = [row for row in rows if self._first_time(row[:2])]
        if not rows:
            return
        data = b"".join(b"%b\t%b\t%b\n" % row for row in rows).decode("utf-8")
        target = f"{_STAGE} (merchant_id, metric_type, quantity)"
        if hasattr(self._cur, "copy_expert"):  # psycopg2
            self._cur.copy_expert(f"COPY {target} FROM STDIN", io.StringIO(data))
        else:  # psycopg 3
            with self._cur.copy(f"COPY {target} FROM STDIN") as copy:
                copy.write(data)

    def record_bad_keys(self, bad_keys: list[BadKey]) -> int:
        """Upsert dead letters; return how many are new (never seen, changed, or back after a fix).

        A key an operator dismissed stays dismissed while its value stays the same.
        """
        if not bad_keys:
            return 0
        unique = {bad.key_text: bad for bad in bad_keys}
        keys = [_pg_text(k) for k in unique]
        values = [None if b.raw_value is None else _pg_text(b.raw_value.decode("utf-8", "backslashreplace")) for b in unique.values()]
        reasons = [b.reason for b in unique.values()]
        errors = self.names.errors.quoted
        self._cur.execute(
            f"""
            WITH incoming AS (
                SELECT k AS redis_key, v AS raw_value, r AS reason
                FROM unnest(%(keys)s::text[], %(values)s::text[], %(reasons)s::text[]) AS u(k, v, r)
            ),
            previous AS (
                SELECT e.redis_key, e.raw_value, e.reason, e.resolution
                FROM {errors} e JOIN incoming i USING (redis_key)
            ),
            upserted AS (
                INSERT INTO {errors} AS e (redis_key, usage_date, raw_value, reason)
                SELECT redis_key, %(day)s, raw_value, reason FROM incoming
                ON CONFLICT (redis_key) DO UPDATE SET
                    raw_value = EXCLUDED.raw_value,
                    reason = EXCLUDED.reason,
                    usage_date = EXCLUDED.usage_date,
                    last_seen = now(),
                    times_seen = e.times_seen + 1,
                    resolved_at = CASE WHEN e.resolution = 'dismissed'
                                        AND e.raw_value IS NOT DISTINCT FROM EXCLUDED.raw_value
                                       THEN e.resolved_at END,
                    resolution = CASE WHEN e.resolution = 'dismissed'
                                       AND e.raw_value IS NOT DISTINCT FROM EXCLUDED.raw_value
                                      THEN e.resolution END
                RETURNING 1
            )
            SELECT count(*) FROM incoming i LEFT JOIN previous p USING (redis_key)
            WHERE p.redis_key IS NULL
               OR p.raw_value IS DISTINCT FROM i.raw_value
               OR p.reason <> i.reason
               OR p.resolution IS NOT NULL AND p.resolution <> 'dismissed'
            """,
            {"keys": keys, "values": values, "reasons": reasons, "day": self.usage_date},
        )
        return int(self._cur.fetchone()[0])

    def merge(self) -> MergeResult:
        """Upsert the staged counters into the usage table, in one statement, and empty the stage.

        One join of the staged day with its stored rows classifies every counter;
        only new and grown rows (and lowered ones, if allowed) reach the INSERT, so
        an unchanged day writes nothing at all. Counters only grow: the
        ``ON CONFLICT ... WHERE`` keeps that true even against a writer without the lock.
        """
        cur = self._cur
        usage = self.names.usage.quoted
        params = {"day": self.usage_date, "allow": self.allow_decrease, "limit": SAMPLE_LIMIT}
        if self._day_was_empty:
            return self._insert_new_day(params)
        compared = f"""
            SELECT s.merchant_id, s.metric_type, s.quantity, t.quantity AS stored
            FROM {_STAGE} s
            LEFT JOIN {usage} t
              ON t.merchant_id = s.merchant_id AND t.usage_date = %(day)s AND t.metric_type = s.metric_type
        """
        cur.execute(
            f"""
            WITH compared AS MATERIALIZED ({compared}),
            written AS (
                INSERT INTO {usage} AS t (merchant_id, usage_date, metric_type, quantity)
                SELECT merchant_id, %(day)s, metric_type, quantity FROM compared
                WHERE stored IS NULL OR quantity > stored OR (%(allow)s AND quantity <> stored)
                ON CONFLICT (merchant_id, usage_date, metric_type) DO UPDATE
                   SET quantity = EXCLUDED.quantity, updated_at = now()
                 WHERE t.quantity < EXCLUDED.quantity
                    OR (%(allow)s AND t.quantity <> EXCLUDED.quantity)
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM written),
                   count(*) FILTER (WHERE quantity = stored),
                   count(*) FILTER (WHERE quantity < stored AND NOT %(allow)s)
            FROM compared
            """,
            params,
        )
        written, unchanged, refused = cur.fetchone()
        result = MergeResult(rows_written=int(written), rows_unchanged=int(unchanged), decreases_refused=int(refused))
        if refused:  # rare: compare again, now that the written rows are in place (refused ones were not)
            cur.execute(
                f"""SELECT merchant_id, metric_type, stored, quantity FROM ({compared}) c
                    WHERE quantity < stored ORDER BY merchant_id, metric_type LIMIT %(limit)s""",
                params,
            )
            result.refused_samples = [
                {"merchant_id": m, "metric_type": t, "stored": int(s), "redis": int(q)} for m, t, s, q in cur.fetchall()
            ]
        self._resolve_fixed_keys()
        self._clear_stage()
        return result

    def _insert_new_day(self, params: dict) -> MergeResult:
        """:meth:`merge` for a day that had no rows when this run took its lock.

        Nothing stored to compare with, so the staged counters go straight in. The
        ``ON CONFLICT`` guard still keeps totals from falling, for a key staged twice
        (SCAN may return one twice) or a writer without the lock.
        """
        cur = self._cur
        cur.execute(
            f"""
            WITH written AS (
                INSERT INTO {self.names.usage.quoted} AS t (merchant_id, usage_date, metric_type, quantity)
                SELECT merchant_id, %(day)s, metric_type, quantity FROM {_STAGE}
                ON CONFLICT (merchant_id, usage_date, metric_type) DO UPDATE
                   SET quantity = EXCLUDED.quantity, updated_at = now()
                 WHERE t.quantity < EXCLUDED.quantity
                    OR (%(allow)s AND t.quantity <> EXCLUDED.quantity)
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM written), (SELECT count(*) FROM {_STAGE})
            """,
            params,
        )
        written, staged = cur.fetchone()
        self._resolve_fixed_keys()
        self._clear_stage()
        return MergeResult(rows_written=int(written), rows_unchanged=int(staged) - int(written))

    def _clear_stage(self) -> None:
        """The next chunk starts empty."""
        self._cur.execute(f"TRUNCATE {_STAGE}")
        self._staged_keys.clear()

    def _resolve_fixed_keys(self) -> None:
        """Mark dead letters of this date resolved once their key aggregates cleanly."""
        errors = self.names.errors.quoted
        self._cur.execute(
            f"SELECT EXISTS (SELECT 1 FROM {errors} WHERE resolved_at IS NULL AND usage_date = %s)", (self.usage_date,)
        )
        if not self._cur.fetchone()[0]:
            return
        self._cur.execute(
            f"""
            UPDATE {errors} e SET resolved_at = now(), resolution = 'fixed'
            FROM (SELECT DISTINCT merchant_id, metric_type FROM {_STAGE}) c
            WHERE e.resolved_at IS NULL AND e.usage_date = %(day)s
              AND e.redis_key = 'usage:' || c.merchant_id || ':' || %(day_text)s || ':' || c.metric_type
            """,
            {"day": self.usage_date, "day_text": self.usage_date.isoformat()},
        )

    def record_run(self, audit: dict) -> None:
        """Write the audit row for this date, inside the same transaction as the data."""
        insert_run(self._cur, self.names, audit)


def record_failed_run(conn, names: SchemaNames, audit: dict) -> None:
    """Audit a run whose transaction was rolled back, in a transaction of its own."""
    with conn.cursor() as cur:
        insert_run(cur, names, audit)
    conn.commit()


def insert_run(cur, names: SchemaNames, audit: dict) -> None:
    columns = (
        "dag_id", "run_id", "task_id", "usage_table", "usage_date", "merchant_id", "keys_found",
        "rows_written", "rows_unchanged", "decreases_refused", "bad_keys", "new_bad_keys",
        "started_at", "outcome", "error", "redis_partition", "partition_count",
    )  # fmt: skip
    placeholders = ", ".join(f"%({c})s" for c in columns)
    cur.execute(
        f"INSERT INTO {names.runs.quoted} ({', '.join(columns)}) VALUES ({placeholders})",
        {c: audit.get(c) for c in columns},
    )


def _pg_text(text: str) -> str:
    """PostgreSQL text cannot hold NUL; show it escaped, as the rest of a bad value is."""
    return text.replace("\x00", "\\x00")


def _copy_rows(cur, target: str, rows: Iterable[tuple]) -> None:
    """``COPY target FROM STDIN`` with whichever driver the cursor belongs to."""
    if hasattr(cur, "copy_expert"):  # psycopg2: CSV, quoted, so any character in an id is safe
        buffer = io.StringIO()
        csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)
        buffer.seek(0)
        cur.copy_expert(f"COPY {target} FROM STDIN WITH (FORMAT csv)", buffer)
    else:  # psycopg 3 escapes each row itself in COPY's text format
        with cur.copy(f"COPY {target} FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
