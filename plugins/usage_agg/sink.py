"""Writing one day's rows to PostgreSQL.

One date is one transaction (:class:`DayWriter`): an advisory lock per table and
date serialises writers, counters are streamed into a temporary staging table with
``COPY``, and a merge statement upserts each staged chunk. Every wait inside the
transaction is bounded (``lock_timeout``), and a row PostgreSQL refuses is set aside
as a bad key instead of rolling the day back.

The hourly counts of the same keys (:attr:`usage_agg.source.Batch.hours`) go the same
way into the hourly table, in the same transaction, by the same rules.

What a staged row becomes (the reset rules) and by which route it gets there are in
:mod:`usage_agg.write_routes`; the Redis lives the rules depend on in :mod:`usage_agg.lives`.

Works on the DB-API connection of either driver that Airflow's ``PostgresHook``
returns: psycopg2 (Airflow 2) or psycopg 3 (Airflow 3).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable
from typing import Any

from usage_agg import audit, dead_letters
from usage_agg.db_errors import note_server_said
from usage_agg.keys import HOURLY_PREFIX, KEY_PREFIX
from usage_agg.lives import Source
from usage_agg.lock_waits import DEFAULT_LOCK_TIMEOUT, LockWaitNamed, pg_milliseconds
from usage_agg.merge_result import MergeResult
from usage_agg.merge_sql import DAILY, HOURLY, RowShape
from usage_agg.samples import SAMPLE_LIMIT
from usage_agg.schema import SchemaNames
from usage_agg.source import BadKey, Counter
from usage_agg.write_routes import Stage

#: PostgreSQL ends a session that sits this long inside the day's transaction (a hung
#: or killed worker), so its locks never outlive it.
IDLE_IN_TRANSACTION_TIMEOUT = dt.timedelta(minutes=10)
MERGE_WORK_MEM = "64MB"

_STAGE = "pg_temp.usage_agg_stage"
_HOURLY_STAGE = "pg_temp.usage_agg_hourly_stage"


def refuse_autocommit(conn, what: str) -> None:
    """Raise ValueError for a connection in autocommit mode: each statement would commit on
    its own, so the day's lock, its stage and its all-or-nothing write would last one
    statement each."""
    if getattr(conn, "autocommit", False):
        raise ValueError(
            f"the PostgreSQL connection is in autocommit mode; {what} must be written in one transaction:"
            " pass a connection with autocommit off"
        )


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
        self._cur: Any = None  # the transaction's DB-API cursor, once entered
        self._source = Source(None)  # no Redis life known (yet): rows get none
        #: the daily and hourly stages, on the transaction's cursor (once entered)
        self._daily: Stage
        self._hourly: Stage

    def __enter__(self) -> DayWriter:
        refuse_autocommit(self.conn, f"{self.names.usage} {self.usage_date}")
        self._cur = self.conn.cursor()
        self._daily = self._new_stage(DAILY, _STAGE, self.names.usage.quoted, KEY_PREFIX)
        self._hourly = self._new_stage(HOURLY, _HOURLY_STAGE, self.names.hourly.quoted, HOURLY_PREFIX)
        try:
            self._begin()
        except BaseException:
            self._end(commit=False)
            raise
        return self

    def _new_stage(self, shape: RowShape, table: str, target: str, key_prefix: str) -> Stage:
        return Stage(
            self._cur,
            shape,
            table,
            target,
            key_prefix,
            usage_date=self.usage_date,
            errors_table=self.names.errors.quoted,
            row_lock_wait=self._row_lock_wait,
        )

    def _begin(self) -> None:
        cur = self._cur
        # Every lock wait in the transaction is bounded (the day's lock, and row locks
        # that another connection holds on the table); the merge hashes a whole chunk,
        # so it gets memory rather than spilling to disk.
        cur.execute(
            "SELECT set_config('lock_timeout', %s, true), set_config('idle_in_transaction_session_timeout', %s, true),"
            " set_config('work_mem', %s, true)",
            (pg_milliseconds(self.lock_timeout), pg_milliseconds(IDLE_IN_TRANSACTION_TIMEOUT), MERGE_WORK_MEM),
        )
        day_lock = (f"usage_agg {self.names.usage}", self.usage_date.toordinal())
        with self._bounded_wait(
            "the lock on", "held by another writer of that date (an hourly run, a merchant rerun or another deployment)"
        ):
            if self.partition is None:
                cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s), %s)", day_lock)
            else:
                # The parts of a fanned-out day write disjoint keys: they share the day's
                # lock (so no whole-day writer runs beside them) and take turns per part.
                cur.execute("SELECT pg_advisory_xact_lock_shared(hashtext(%s), %s)", day_lock)
                cur.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(%s), %s)", (f"{day_lock[0]} {self.partition}", day_lock[1])
                )
        # A day with no stored rows yet (its first aggregation, the heavy one) needs no
        # comparison with stored rows: every counter is new. Its rows can go straight in
        # unless a dead letter of the date waits to see its key staged clean.
        cur.execute(
            f"""SELECT NOT EXISTS (SELECT 1 FROM {self.names.usage.quoted} WHERE usage_date = %(day)s),
                       NOT EXISTS (SELECT 1 FROM {self.names.hourly.quoted}
                                   WHERE usage_hour >= %(day)s::date::timestamp AT TIME ZONE 'UTC'
                                     AND usage_hour < (%(day)s::date + 1)::timestamp AT TIME ZONE 'UTC'),
                       NOT EXISTS (SELECT 1 FROM {self.names.errors.quoted}
                                   WHERE resolved_at IS NULL AND usage_date = %(day)s)""",
            {"day": self.usage_date},
        )
        self._daily.was_empty, self._hourly.was_empty, no_open_letters = cur.fetchone()
        for stage in (self._daily, self._hourly):
            stage.copy_straight_in = stage.was_empty and no_open_letters
        self._daily.create(cur)
        self._hourly.create(cur)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            note_server_said(exc, self.conn)
        self._end(commit=exc_type is None)

    def _end(self, *, commit: bool) -> None:
        try:
            if commit:
                self.conn.commit()
            else:
                with contextlib.suppress(Exception):  # the connection itself failed: the error being raised says why
                    self.conn.rollback()
        finally:
            with contextlib.suppress(Exception):
                self._cur.close()

    def _bounded_wait(self, what: str, holder: str):
        return LockWaitNamed(self.lock_timeout, self.names.usage, self.usage_date, what, holder)

    def _row_lock_wait(self):
        """A statement that may wait on a row lock of the table another connection holds."""
        return self._bounded_wait("a row lock on", "held by another connection (an open transaction on the table)")

    def use_source(self, source: Source) -> MergeResult:
        """Counters staged from now on come from this Redis life; merges what came from another."""
        merged = MergeResult()
        if source != self._source:
            if self.staged:
                merged = self.merge()
            self._source = source
        return merged

    @property
    def source(self) -> Source:
        """The Redis life the staged rows were read from: daily and hourly rows alike, since a
        batch's hours come from the server its counters came from (on a cluster, a part reads
        the hashes its own primary serves; :func:`usage_agg.source.read_day`)."""
        return self._source

    # Staging

    @property
    def staged(self) -> int:
        """Rows staged (or COPYed straight in) since the last merge, daily and hourly."""
        return self._daily.pending + self._hourly.pending

    @property
    def window(self) -> int:
        """Rows staged (or COPYed straight in) since the last chunk ended, daily and hourly."""
        return self._daily.window + self._hourly.window

    def stage(self, counters: list[Counter]) -> list[BadKey]:
        """Stream a batch of counters into the staging table with ``COPY``; return the refused ones.

        Every read is staged, a key read twice too (SCAN and SSCAN may return a key twice):
        :meth:`merge` merges its reads one after the other.
        """
        return self._daily.stage_text([(c.key.merchant_id, c.key.metric_type, c.quantity) for c in counters])

    def stage_plain_rows(self, rows: list[tuple[bytes, bytes, bytes]]) -> list[BadKey]:
        """Stage checked UTF-8 rows (see :attr:`usage_agg.source.Batch.plain_rows`) as one COPY text block.

        COPY's text format reads them unescaped; that is safe only for fields without
        backslash, tab, CR, LF or NUL, which this checks on the whole block (cheaply)
        before sending it. A block that fails the check is staged escaped instead.
        """
        return self._daily.stage_block(rows, b"%b\t%b\t%b\n", self._source.id)

    def stage_hours(self, hours: list[tuple[bytes, bytes, int, int]]) -> list[BadKey]:
        """Stage a batch's hourly counts (see :attr:`usage_agg.source.Batch.hours`), a key's
        hours as often as the key was read (its reads are merged one after the other)."""
        return self._hourly.stage_block(hours, b"%b\t%b\t%d\t%d\n", self._source.id)

    # Dead letters and audit

    def record_bad_keys(self, bad_keys: list[BadKey]) -> int:
        """Upsert dead letters; return how many are new (see :mod:`usage_agg.dead_letters`)."""
        return dead_letters.record(self._cur, self.names.errors.quoted, self.usage_date, bad_keys)

    def earlier_writes_unannounced(self) -> bool:
        """Whether an earlier run committed rows of this date that no asset event announced."""
        return bool(audit.unannounced_dates(self._cur, self.names.runs.quoted, self.names.audit_names, self.usage_date))

    def record_run(self, audit_row: dict) -> None:
        """Write the audit row for this date, inside the same transaction as the data."""
        audit.insert_run(self._cur, self.names.runs.quoted, audit_row)

    # Merging

    def end_chunk(self) -> MergeResult:
        """A chunk's worth of rows was staged: merge it now if its day had no rows (see
        :meth:`usage_agg.write_routes.Stage.end_chunk`); otherwise it waits for :meth:`merge`, one comparison with
        the stored day at the end."""
        return self._combined(self._daily.end_chunk, self._hourly.end_chunk)

    def merge(self) -> MergeResult:
        """Upsert the staged counters (and their hours) following the reset rules above; empty the stages.

        One statement per table (slices of it, should PostgreSQL refuse a row: the row is
        then set aside and returned in :attr:`MergeResult.refused`).
        """
        return self._combined(self._daily.merge, self._hourly.merge)

    def _combined(self, daily_step: Callable[[dict], MergeResult], hourly_step: Callable[[dict], MergeResult]):
        params = {"day": self.usage_date, "allow": self.allow_decrease, "limit": SAMPLE_LIMIT}
        params.update(source=self._source.id, fresh=list(self._source.predecessors))
        result = daily_step(dict(params))
        hourly = hourly_step(dict(params))
        result.hourly_rows_written += hourly.rows_written
        result.hourly_rows_unchanged += hourly.rows_unchanged
        result.hourly_resets += hourly.resets
        result.refused += hourly.refused
        return result
