"""The write routes: by which way a counter read from Redis reaches its row.

A :class:`Stage` is one kind of row (a day's counters, or their hours) on its way into
its table, inside the day's transaction (:class:`usage_agg.sink.DayWriter`). What the
row becomes is decided by the reset rules (below, specified in
:mod:`usage_agg.counter_model`); which route takes it there, by what the day held when
the transaction began:

====================================================  ===================================
the rows, when                                        go in by
====================================================  ===================================
the day had no rows, no dead letter of the date       ``COPY`` straight into the table
waits for its key to come back clean, nothing waits   (:meth:`Stage._copied_in`): the row
in the stage, and the block is safe unescaped         is the value, offset 0
the day had no rows (otherwise)                       the stage, then a plain ``INSERT``
                                                      each chunk (:func:`~usage_agg.merge_sql.plain_insert`)
the day had rows, or a row turned up after all        the stage, then the comparison
(a unique violation ends the two routes above for     with the stored rows by the rules
the rest of the day)                                  (:func:`~usage_agg.merge_sql.compare_merge`):
                                                      by primary-key lookups, or by one scan
                                                      of the stored day past :data:`LOOKUP_ROWS`
a key staged more than once (SCAN may return a key    its reads merged one after the other,
twice)                                                in the order read (:meth:`Stage._merged_in_rounds`)
PostgreSQL refuses a row (or its total would pass     set aside as a bad key, found by halves
the bigint)                                           (:func:`usage_agg.refusals.isolate_refused`),
                                                      or by slices after a day scan; the rest
                                                      go through
====================================================  ===================================

**Counters with resets.** Each row keeps ``quantity = redis_offset + v``, where ``v``
is the Redis value last read, and ``redis_incarnation``, the Redis server life it was
read from (:mod:`usage_agg.servers`). For a new Redis value ``r``:

==========================================================  ==========================
case (the first that applies)                               the row becomes
==========================================================  ==========================
no row yet                                                  ``quantity = r``, offset 0
``allow_decrease``                                          ``quantity = r``, offset 0:
                                                            Redis is the truth
the row's Redis life ended and the current one started      offset = quantity, so
empty after it was read (a restart without persistence)     ``quantity + r``: all of
                                                            ``r`` is new (a *restart* reset)
``r < v`` (eviction, failover to a lagging replica,         offset = quantity - r, so
snapshot restore, a writer lowering it)                     quantity unchanged (a *drop*
                                                            reset); growth after it counts
``r > v``, the row holds an offset and was read from        quantity = max(quantity, r)
another life, one that did not start empty (a snapshot      (a *rebase* reset); growth
loaded, a replica promoted, keys moved in)                  after it counts
``r >= v`` (growth, or nothing new)                         ``offset + r``
==========================================================  ==========================

So a total never falls (unless ``allow_decrease``), and nothing is counted twice:
after a drop, Redis may hold values already counted (a snapshot rolls values back,
not to zero), so only growth after the drop is added; once a row holds an offset, a
value of another life may predate the reset the offset stands for (a snapshot restored
after an empty restart), so it is not taken for growth over the last read. What a
reset can lose is the growth between the reset (or the life change) and the next read,
never what was already counted. A row whose value did not change is never rewritten,
except to take the current life where it holds an offset.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from contextlib import AbstractContextManager

from usage_agg import dead_letters
from usage_agg.copy_text import copy_rows, copy_safe_text, copy_text
from usage_agg.db_errors import is_row_error, is_unique_violation
from usage_agg.merge_result import MergeResult
from usage_agg.merge_sql import HOURLY, RowShape, compare_merge, plain_insert
from usage_agg.refusals import Savepoint, isolate_refused
from usage_agg.source import BadKey

#: A stage of at most this many rows finds its stored rows by primary-key lookups; a
#: bigger one (a day that had rows, read whole) by one scan of the stored day.
LOOKUP_ROWS = 20_000
#: After a refusal in that scan, the stage is merged again this many pages (8 kB) at a time.
SLICE_PAGES = 128


class Stage:
    """One kind of staged row (daily counters, or their hours) and the table it merges into."""

    def __init__(
        self,
        cur,
        shape: RowShape,
        table: str,
        target: str,
        key_prefix: str,
        *,
        usage_date: dt.date,
        errors_table: str,
        row_lock_wait: Callable[[], AbstractContextManager[None]],
    ) -> None:
        """:param cur: the day's transaction's cursor.
        :param table: the temporary stage; ``target``: the table it merges into (quoted).
        :param errors_table: the dead letters (quoted), resolved when a key comes back clean.
        :param row_lock_wait: bounds a statement's wait on another connection's row locks.
        """
        self.cur, self.shape, self.table, self.target = cur, shape, table, target
        self.usage_date, self.errors_table, self.row_lock_wait = usage_date, errors_table, row_lock_wait
        self.key_prefix = key_prefix
        self.columns = ", ".join(column.split()[0] for column in shape.stage_columns.split(", "))
        self.copy_target = f"{table} ({self.columns})"
        self.width = len(self.columns.split(", "))
        self.staged = 0
        #: the columns that name a counter (its key, and the hour for hours)
        self.key_columns = ", ".join(c for c in self.columns.split(", ") if c != "quantity")
        self.was_empty = False
        #: a day without rows goes in by plain INSERT until one meets a row already there
        self.plain_inserts = True
        #: ... and by COPY straight into the target (no stage, no statement) when, besides,
        #: no dead letter of the date waits for its key to come back clean (set on begin)
        self.copy_straight_in = False
        #: rows COPYed straight into the target since the last merge
        self.copied_in = 0
        #: rows staged or COPYed in since the last chunk ended (see :meth:`end_chunk`)
        self.window = 0
        day = usage_date.isoformat().encode()
        self._direct_line = shape.direct_line.replace(b"{day}", day)

    def create(self, cur) -> None:
        cur.execute(f"CREATE TEMPORARY TABLE {self.table} ({self.shape.stage_columns}) ON COMMIT DROP")

    def refuse(self, row: tuple, reason: str) -> BadKey:
        """The bad key for a staged row that cannot be stored: the Redis key (and hour field) it came from."""
        merchant, metric, *rest = (x if isinstance(x, bytes) else str(x).encode("utf-8") for x in row)
        day = self.usage_date.isoformat().encode()
        raw_key = self.key_prefix.encode() + merchant + b":" + day + b":" + metric
        return BadKey(raw_key, reason, rest[-1], field=b"%02d" % int(rest[0]) if len(rest) == 2 else None)

    @property
    def pending(self) -> int:
        """Rows staged or COPYed in since the last merge."""
        return self.staged + self.copied_in

    def stage_block(self, rows: list[tuple], line: bytes, life_id: int | None) -> list[BadKey]:
        """COPY ``rows`` (checked UTF-8 bytes and ints) as one text-format block, or escaped when unsafe.

        A day's first rows go straight into the target when they can (:meth:`_copied_in`),
        noted as read from the Redis life ``life_id``.
        """
        if not rows or self._copied_in(rows, life_id):
            return []
        block = b"".join(line % row for row in rows)
        text = copy_safe_text(block, len(rows), self.width)
        if text is None:
            good, refused = self._decoded(rows)
            return refused + self.stage_text(good)

        def send(part: list) -> None:
            if part is rows:
                copy_text(self.cur, self.copy_target, text)
            else:
                copy_rows(self.cur, self.copy_target, self._decoded(part)[0])

        refused = isolate_refused(self.cur, rows, send, self.refuse)
        self.staged += len(rows) - len(refused)
        self.window += len(rows) - len(refused)
        return refused

    def _copied_in(self, rows: list[tuple], life_id: int | None) -> bool:
        """COPY a day's first rows straight into the target: no stage, no statement. Each
        block costs PostgreSQL only its insert (half of what staging and a plain INSERT cost).

        ``False``, with nothing written, when the rows cannot go this way: the day had rows,
        a block with characters COPY's text format would read differently, or PostgreSQL
        refusing the block (a row already there, from a writer without the day's lock or a
        key read twice; a row it cannot store). They are then staged, and merged by the rules,
        which set a refused row aside; a row already there ends this way for the day.

        Nor while rows wait in the stage: they were read before this block, and a key in
        both must be merged in the order read (the block's newer read last), so the block
        joins them in the stage until the chunk's merge.
        """
        if not (self.copy_straight_in and self.plain_inserts) or self.staged:
            return False
        columns, line = self.shape.direct_columns, self._direct_line
        if life_id is not None:
            columns, line = f"{columns}, redis_incarnation", line + b"\t%d" % life_id
        line += b"\n"
        text = copy_safe_text(b"".join(line % row for row in rows), len(rows), len(columns.split(", ")))
        if text is None:
            return False
        cur = self.cur
        with Savepoint(cur, "usage_agg_copy_in", is_row_error) as copy_in, self.row_lock_wait():
            copy_text(cur, f"{self.target} ({columns})", text)
        if copy_in.error is not None:
            if is_unique_violation(copy_in.error):
                self.plain_inserts = False  # rows turn up after all: merge the rest of the day
            return False
        self.copied_in += len(rows)
        self.window += len(rows)
        return True

    def stage_text(self, rows: list[tuple]) -> list[BadKey]:
        """COPY rows of text and ints, every field escaped."""
        if not rows:
            return []
        refused = isolate_refused(self.cur, rows, lambda part: copy_rows(self.cur, self.copy_target, part), self.refuse)
        self.staged += len(rows) - len(refused)
        self.window += len(rows) - len(refused)
        return refused

    def _decoded(self, rows: list[tuple]) -> tuple[list[tuple], list[BadKey]]:
        good, refused = [], []
        for row in rows:
            try:
                good.append(
                    tuple(x.decode("utf-8") if isinstance(x, bytes) else x for x in row[:2])
                    + tuple(int(x) for x in row[2:])
                )
            except (UnicodeDecodeError, ValueError) as err:
                refused.append(self.refuse(row, f"cannot be staged: {err}"))
        return good, refused

    def end_chunk(self, params: dict) -> MergeResult:
        """A chunk's worth of rows was read. A day that had no rows merges it now, so its rows
        reach the table while Redis is still read; a day with rows keeps them staged, to
        compare the whole stage with the stored day once (:meth:`merge`). Either way the
        worker keeps no key: what was read is in PostgreSQL."""
        if self.was_empty:
            return self.merge(params)
        self.window = 0
        return MergeResult()

    def merge(self, params: dict) -> MergeResult:
        """Merge what is staged into the target, set aside what PostgreSQL refuses, empty the stage."""
        result = MergeResult(rows_written=self.copied_in)
        self.copied_in = self.window = 0
        if not self.staged:
            return result
        result.add(self._merged_in_rounds(params) if self._has_repeated_keys() else self._merged_once(params))
        return result

    def _merged_once(self, params: dict) -> MergeResult:
        """Merge a stage that holds each counter once, and empty it."""
        result = self._compared(params)
        self.cur.execute(f"TRUNCATE {self.table}")
        self.staged = 0
        return result

    def _compared(self, params: dict) -> MergeResult:
        """Merge a stage that holds each counter once, by lookups or by one scan of the stored day."""
        if self.staged > LOOKUP_ROWS and not self.was_empty:
            return self._merged_by_day_scan(params)
        return self._merged_with_refusals(params)

    def _merged_in_parts(
        self, params: dict, held: str, parts: list[tuple[str, tuple]], merge_part: Callable[[dict], MergeResult]
    ) -> MergeResult:
        """Merge the rows held aside in ``held`` part by part: each of ``parts`` (a condition on
        ``held`` and its parameters) is put back into the empty stage alone and merged by
        ``merge_part``, in the order given. The rows wait in PostgreSQL, not in the worker."""
        cur = self.cur
        result = MergeResult()
        for condition, args in parts:
            cur.execute(
                f"INSERT INTO {self.table} ({self.columns}) SELECT {self.columns} FROM {held} WHERE {condition}", args
            )
            self.staged = cur.rowcount
            if self.staged:
                result.add(merge_part(params))
                cur.execute(f"TRUNCATE {self.table}")
        self.staged = 0
        return result

    def _has_repeated_keys(self) -> bool:
        """Whether a counter was staged more than once (SCAN and SSCAN may return a key twice,
        chunks apart). One hash aggregate over the stage, about 0.1 s per 200,000 rows."""
        cur = self.cur
        cur.execute(f"SELECT EXISTS (SELECT FROM {self.table} GROUP BY {self.key_columns} HAVING count(*) > 1)")
        return bool(cur.fetchone()[0])

    def _merged_in_rounds(self, params: dict) -> MergeResult:
        """Merge a stage with a counter read more than once: its reads one after the other,
        in the order they were read, as runs one after the other would merge them. A drop
        between two reads then loses nothing read before it (merged as one read, the growth
        read before the drop would be lost). Round *n* stages every counter's *n*-th read and
        merges it as any stage: each read is merged, and counted, once."""
        cur = self.cur
        reads = f"{self.table}_reads"
        cur.execute(
            f"CREATE TEMPORARY TABLE {reads} ON COMMIT DROP AS SELECT {self.columns},"
            f" row_number() OVER (PARTITION BY {self.key_columns} ORDER BY ctid) AS read_no FROM {self.table}"
        )
        cur.execute(f"TRUNCATE {self.table}")
        cur.execute(f"SELECT coalesce(max(read_no), 0) FROM {reads}")
        rounds = [("read_no = %s", (read_no,)) for read_no in range(1, int(cur.fetchone()[0]) + 1)]
        result = self._merged_in_parts(params, reads, rounds, self._compared)
        cur.execute(f"DROP TABLE {reads}")
        return result

    def _merged_with_refusals(self, params: dict) -> MergeResult:
        """Merge the stage (up to :data:`LOOKUP_ROWS` rows) by primary-key lookups; should
        PostgreSQL refuse a row, find it by halves and set it aside."""
        result = MergeResult()
        # A day's first rows go in by plain INSERT (:meth:`_inserted`); once a row turned up
        # after all, the rows are compared with the stored ones: the rules, their counts and
        # the totals that would pass the bigint, as for any day with rows.
        statement = compare_merge(self.target, self.table, self.shape)
        cur = self.cur

        def merge_staged(part: list | None) -> None:
            if part is not None:  # a retry without the refused rows: stage this part alone
                cur.execute(f"TRUNCATE {self.table}")
                copy_rows(cur, self.copy_target, part)
            with self.row_lock_wait():
                inserted = self._inserted(cur, params)
                result.add(inserted if inserted is not None else self._merged(cur, statement, params))
            self._resolve_fixed_letters(cur)

        with Savepoint(cur, "usage_agg_merge", is_row_error) as whole:
            merge_staged(None)
        if whole.error is not None:
            cur.execute(f"SELECT {self.columns} FROM {self.table}")
            result.refused += isolate_refused(cur, cur.fetchall(), merge_staged, self.refuse, failed_whole=True)
        return result

    def _merged_by_day_scan(self, params: dict) -> MergeResult:
        """Merge a stage of more than :data:`LOOKUP_ROWS` rows (a day that had rows, read whole)
        by one hash join with the stored day (``compare_merge(day_scan=True)``).

        Nested loops are off for that statement alone: with a day just written, whose
        statistics PostgreSQL has not gathered yet, the planner would otherwise look each
        row up. Should PostgreSQL refuse a row, the stage is merged again in slices
        (:meth:`_merged_in_slices`).
        """
        cur = self.cur
        with Savepoint(cur, "usage_agg_merge", is_row_error) as day_scan:  # its rollback restores enable_nestloop
            cur.execute("SELECT current_setting('enable_nestloop'), set_config('enable_nestloop', 'off', true)")
            nested_loops = cur.fetchone()[0]
            with self.row_lock_wait():
                result = self._merged(cur, compare_merge(self.target, self.table, self.shape, day_scan=True), params)
            cur.execute("SELECT set_config('enable_nestloop', %s, true)", (nested_loops,))
            self._resolve_fixed_letters(cur)
        return result if day_scan.error is None else self._merged_in_slices(params)

    def _merged_in_slices(self, params: dict) -> MergeResult:
        """Merge the stage again a slice at a time (:data:`SLICE_PAGES` of its pages, read by
        their tuple ids), each slice by :meth:`_merged_with_refusals`, which sets the refused
        rows aside. The rows wait in PostgreSQL (the stage, renamed); memory holds one slice
        at most, and each row is read once."""
        cur = self.cur
        held = f"{self.table}_held"
        cur.execute(f"ALTER TABLE {self.table} RENAME TO {held.rsplit('.', 1)[-1]}")
        self.create(cur)
        cur.execute("SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::int", (held,))
        pages = int(cur.fetchone()[0])
        slices = [
            ("ctid >= %s::tid AND ctid < %s::tid", (f"({first},0)", f"({first + SLICE_PAGES},0)"))
            for first in range(0, pages, SLICE_PAGES)
        ]
        result = self._merged_in_parts(params, held, slices, self._merged_with_refusals)
        covered = len(slices) * SLICE_PAGES
        cur.execute(f"SELECT count(*) FROM {held} WHERE ctid >= %s::tid", (f"({covered},0)",))
        if cur.fetchone()[0]:  # never: the slices cover every page the stage had
            raise RuntimeError(f"rows of {held} past page {covered} were not merged")
        cur.execute(f"DROP TABLE {held}")
        return result

    def _resolve_fixed_letters(self, cur) -> None:
        dead_letters.resolve_fixed(cur, self.errors_table, self.usage_date, self.table, self.shape is HOURLY)

    def _inserted(self, cur, params: dict) -> MergeResult | None:
        """A day that had no rows: try a plain INSERT (:func:`plain_insert`). ``None`` when
        some row was there after all (or the day had rows): the caller merges instead."""
        if not (self.was_empty and self.plain_inserts):
            return None
        with Savepoint(cur, "usage_agg_insert", is_unique_violation) as insert:
            cur.execute(plain_insert(self.target, self.table, self.shape), params)
            written = cur.rowcount  # before the savepoint's release sets its own
        if insert.error is not None:
            self.plain_inserts = False  # rows turn up after all: merge the rest of the day
            return None
        return MergeResult(written, 0, 0, 0, [])

    def _merged(self, cur, statement: str, params: dict) -> MergeResult:
        cur.execute(statement, params)
        return self._result(cur.fetchone())

    def _result(self, row) -> MergeResult:
        written, unchanged, drops, resets, samples, overflowing = row
        result = MergeResult(int(written), int(unchanged), int(drops), int(resets), list(samples or []))
        for merchant, metric, offset, redis, time_key in overflowing or []:
            hour = dt.datetime.fromisoformat(str(time_key)).astimezone(dt.UTC).hour if self.shape is HOURLY else None
            staged = (merchant, metric, redis) if hour is None else (merchant, metric, hour, redis)
            result.refused.append(
                self.refuse(
                    staged,
                    f"the total would exceed PostgreSQL's bigint: {offset} counted before a reset + Redis"
                    f" value {redis}",
                )
            )
        return result
