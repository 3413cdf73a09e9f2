"""Writing one day's rows to PostgreSQL.

One date is one transaction (:class:`DayWriter`): an advisory lock per table and
date serialises writers, counters are streamed into a temporary staging table with
``COPY``, and a merge statement upserts each staged chunk. Every wait inside the
transaction is bounded (``lock_timeout``), and a row PostgreSQL refuses is set aside
as a bad key instead of rolling the day back.

**Counters with resets.** Each row keeps ``quantity = redis_offset + v``, where ``v``
is the Redis value last read, and ``redis_incarnation``, the Redis server life it was
read from (:mod:`usage_agg.servers`). For a new Redis value ``r``:

==========================================================  ==========================
case                                                        the row becomes
==========================================================  ==========================
no row yet                                                  ``quantity = r``, offset 0
``r >= v`` (growth, or nothing new)                         ``offset + r``
the row's Redis life ended and the current one started      offset = quantity, so
empty after it was read (a restart without persistence)     ``quantity + r``: all of
                                                            ``r`` is new (a *restart* reset)
``r < v`` otherwise (eviction, failover to a lagging        offset = quantity - r, so
replica, snapshot restore, a writer lowering it)            quantity unchanged (a *drop*
                                                            reset); growth after it counts
``allow_decrease``                                          ``quantity = r``, offset 0:
                                                            Redis is the truth
==========================================================  ==========================

So a total never falls (unless ``allow_decrease``), and nothing is counted twice:
after a drop, Redis may hold values already counted (a snapshot rolls values back,
not to zero), so only growth after the drop is added. What a reset can lose is the
growth between the reset and the next read, never what was already counted. A row
whose value did not change is never rewritten.

Works on the DB-API connection of either driver that Airflow's ``PostgresHook``
returns: psycopg2 (Airflow 2) or psycopg 3 (Airflow 3).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from usage_agg import audit, dead_letters
from usage_agg.db_errors import LockWaitTimeout, is_lock_timeout, is_row_error
from usage_agg.keys import BIGINT_MAX, KEY_PREFIX
from usage_agg.schema import SchemaNames, ensure_schema  # noqa: F401  (ensure_schema: for callers of the writer)
from usage_agg.servers import RedisIncarnation
from usage_agg.source import BadKey, Counter

DEFAULT_LOCK_TIMEOUT = dt.timedelta(minutes=10)
#: PostgreSQL ends a session that sits this long inside the day's transaction (a hung
#: or killed worker), so its locks never outlive it.
IDLE_IN_TRANSACTION_TIMEOUT = dt.timedelta(minutes=10)
MERGE_WORK_MEM = "64MB"
#: How many resets are returned (and logged) by name per merge; all are counted.
SAMPLE_LIMIT = 20

_STAGE = "pg_temp.usage_agg_stage"
_STAGE_COLUMNS = f"{_STAGE} (merchant_id, metric_type, quantity)"


@dataclass(frozen=True)
class Source:
    """A Redis server life as the usage schema knows it (see :func:`register_incarnations`)."""

    id: int | None
    #: incarnations whose rows hold nothing of what this one holds: it started empty after their last read
    predecessors: tuple[int, ...] = ()


def register_incarnations(
    conn, names: SchemaNames, incarnations: dict[str, RedisIncarnation], lock_timeout: dt.timedelta = DEFAULT_LOCK_TIMEOUT
) -> dict[str, Source]:
    """Note the Redis lives a run reads, in a short transaction of its own, and commit.

    Runs of other dates note the same lives at the same time; a transaction of its own
    keeps them from waiting on each other's day transactions.
    """
    sources = {}
    with conn.cursor() as cur:
        cur.execute("SELECT set_config('lock_timeout', %s, true)", (_ms(lock_timeout),))
        for address, life in sorted(incarnations.items()):
            cur.execute(
                f"""INSERT INTO {names.incarnations.quoted} AS i
                        (run_id, address, started_at, started_empty, first_seen, last_seen)
                    VALUES (%(run_id)s, %(address)s, %(started_at)s, %(started_empty)s, %(seen)s, %(seen)s)
                    ON CONFLICT (run_id) DO UPDATE
                       SET last_seen = greatest(i.last_seen, EXCLUDED.last_seen), address = EXCLUDED.address
                    RETURNING id""",
                {**life.__dict__, "seen": life.seen_at},
            )
            own_id = cur.fetchone()[0]
            cur.execute(
                f"""SELECT coalesce(array_agg(id ORDER BY id), '{{}}') FROM {names.incarnations.quoted}
                    WHERE %(empty)s AND id <> %(id)s AND last_seen < %(started_at)s""",
                {"empty": life.started_empty, "id": own_id, "started_at": life.started_at},
            )
            sources[address] = Source(own_id, tuple(cur.fetchone()[0]))
    conn.commit()
    return sources


@dataclass
class MergeResult:
    rows_written: int = 0
    rows_unchanged: int = 0
    #: Redis values lower than the value last read, which did not lower the total
    decreases_refused: int = 0
    #: rows whose counter was found reset (drops and restarts)
    resets: int = 0
    reset_samples: list[dict] = field(default_factory=list)
    #: counters PostgreSQL refused (set aside as bad keys; the rest of the chunk is merged)
    refused: list[BadKey] = field(default_factory=list)

    def add(self, other: MergeResult) -> None:
        self.rows_written += other.rows_written
        self.rows_unchanged += other.rows_unchanged
        self.decreases_refused += other.decreases_refused
        self.resets += other.resets
        self.reset_samples.extend(other.reset_samples[: max(SAMPLE_LIMIT - len(self.reset_samples), 0)])
        self.refused.extend(other.refused)


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
        self._source = Source(None)  # no Redis life known (yet): rows get none
        self._staged = 0
        #: (merchant_id, metric_type) as UTF-8 bytes, staged since the last merge
        self._staged_keys: set[tuple[bytes, bytes]] = set()

    def __enter__(self) -> DayWriter:
        self._cur = self.conn.cursor()
        try:
            self._begin()
        except BaseException:
            self._end(commit=False)
            raise
        return self

    def _begin(self) -> None:
        cur = self._cur
        # Every lock wait in the transaction is bounded (the day's lock, and row locks
        # that another connection holds on the table); the merge hashes a whole chunk,
        # so it gets memory rather than spilling to disk.
        cur.execute(
            "SELECT set_config('lock_timeout', %s, true), set_config('idle_in_transaction_session_timeout', %s, true),"
            " set_config('work_mem', %s, true)",
            (_ms(self.lock_timeout), _ms(IDLE_IN_TRANSACTION_TIMEOUT), MERGE_WORK_MEM),
        )
        day_lock = (f"usage_agg {self.names.usage}", self.usage_date.toordinal())
        with self._bounded_wait("the lock on", "held by another writer of that date (an hourly run, a merchant rerun or another deployment)"):
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
        # comparison with stored rows: every counter is new.
        cur.execute(f"SELECT NOT EXISTS (SELECT 1 FROM {self.names.usage.quoted} WHERE usage_date = %s)", (self.usage_date,))
        self._day_was_empty = cur.fetchone()[0]
        cur.execute(
            f"CREATE TEMPORARY TABLE {_STAGE} (merchant_id text NOT NULL, metric_type text NOT NULL,"
            " quantity bigint NOT NULL) ON COMMIT DROP"
        )

    def __exit__(self, exc_type, exc, tb) -> None:
        self._end(commit=exc_type is None)

    def _end(self, *, commit: bool) -> None:
        try:
            if commit:
                self.conn.commit()
            else:
                try:
                    self.conn.rollback()
                except Exception:  # the connection itself failed: the error being raised says why
                    pass
        finally:
            try:
                self._cur.close()
            except Exception:
                pass

    def _bounded_wait(self, what: str, holder: str):
        return _LockWaitNamed(self, what, holder)

    def use_source(self, source: Source) -> MergeResult:
        """Counters staged from now on come from this Redis life; merges what came from another."""
        merged = MergeResult()
        if source != self._source:
            if self._staged:
                merged = self.merge()
            self._source = source
        return merged

    # Staging

    @property
    def staged(self) -> int:
        """Rows staged since the last merge."""
        return self._staged

    def stage(self, counters: list[Counter]) -> list[BadKey]:
        """Stream a batch of counters into the staging table with ``COPY``; return the refused ones."""
        rows = [
            (c.key.merchant_id, c.key.metric_type, c.quantity)
            for c in counters
            if self._first_time((c.key.merchant_id.encode(), c.key.metric_type.encode()))
        ]
        return self._stage_rows(rows)

    def _first_time(self, key: tuple[bytes, bytes]) -> bool:
        """Stage each key once per merge, so the merge needs no GROUP BY.

        SCAN and SSCAN may return a key twice; its first value is kept (a later read
        can only be a little higher, and the next run takes it).
        """
        if key in self._staged_keys:
            return False
        self._staged_keys.add(key)
        return True

    def stage_plain_rows(self, rows: list[tuple[bytes, bytes, bytes]]) -> list[BadKey]:
        """Stage checked UTF-8 rows (see :attr:`usage_agg.source.Batch.plain_rows`) as one COPY text block.

        COPY's text format reads them unescaped; that is safe only for fields without
        backslash, tab, CR, LF or NUL, which this checks on the whole block (cheaply)
        before sending it. A block that fails the check is staged escaped instead.
        """
        keys = [row[:2] for row in rows]
        unique = set(keys)
        if len(unique) == len(keys) and self._staged_keys.isdisjoint(unique):
            self._staged_keys |= unique
        else:  # a key staged twice: keep its first row only
            rows = [row for row in rows if self._first_time(row[:2])]
        if not rows:
            return []
        block = b"".join(b"%b\t%b\t%b\n" % row for row in rows)
        text = _copy_safe_text(block, len(rows))
        if text is None:
            good, refused = _decode_rows(rows)
            return refused + self._stage_rows(good)

        def send(part: list) -> None:
            if part is rows:
                _copy_text(self._cur, text)
            else:
                _copy_rows(self._cur, _STAGE_COLUMNS, [(m.decode(), t.decode(), int(q)) for m, t, q in part])

        refused = self._isolated(rows, send, lambda row: (row[0].decode(), row[1].decode(), row[2].decode()))
        self._staged += len(rows) - len(refused)
        return refused

    def _stage_rows(self, rows: list[tuple[str, str, int]]) -> list[BadKey]:
        if not rows:
            return []
        refused = self._isolated(rows, lambda part: _copy_rows(self._cur, _STAGE_COLUMNS, part), lambda row: row)
        self._staged += len(rows) - len(refused)
        return refused

    def _isolated(
        self, rows: list, attempt: Callable[[list], object], as_text: Callable, *, failed_whole: bool = False
    ) -> list[BadKey]:
        """Run ``attempt(rows)``; if PostgreSQL refuses a row, find it and set it aside.

        Each attempt runs in a savepoint. A refusal of the data (not of the connection
        or a lock) splits the rows in halves until every refused row stands alone; the
        others go through. Costs one savepoint when nothing is refused.
        """
        refused: list[BadKey] = []
        middle = len(rows) // 2
        pending = [rows[middle:], rows[:middle]] if failed_whole and len(rows) > 1 else [rows]
        while pending:
            part = pending.pop()
            self._cur.execute("SAVEPOINT usage_agg_rows")
            try:
                attempt(part)
            except Exception as err:
                if not is_row_error(err):
                    raise
                self._cur.execute("ROLLBACK TO SAVEPOINT usage_agg_rows")
                if len(part) == 1:
                    merchant, metric, quantity = as_text(part[0])
                    refused.append(self._refused(merchant, metric, str(quantity), f"PostgreSQL refused the row: {_first_line(err)}"))
                else:
                    middle = len(part) // 2
                    pending += [part[middle:], part[:middle]]
            else:
                self._cur.execute("RELEASE SAVEPOINT usage_agg_rows")
        return refused

    def _refused(self, merchant: str, metric: str, value: str, reason: str) -> BadKey:
        raw_key = f"{KEY_PREFIX}{merchant}:{self.usage_date.isoformat()}:{metric}".encode("utf-8")
        return BadKey(raw_key, reason, value.encode("utf-8"))

    # Dead letters and audit

    def record_bad_keys(self, bad_keys: list[BadKey]) -> int:
        """Upsert dead letters; return how many are new (see :mod:`usage_agg.dead_letters`)."""
        return dead_letters.record(self._cur, self.names.errors.quoted, self.usage_date, bad_keys)

    def record_run(self, audit_row: dict) -> None:
        """Write the audit row for this date, inside the same transaction as the data."""
        audit.insert_run(self._cur, self.names.runs.quoted, audit_row)

    # Merging

    def merge(self) -> MergeResult:
        """Upsert the staged counters into the usage table, following the reset rules above, and empty the stage.

        One statement per chunk. Should PostgreSQL refuse a row, the chunk is merged
        again without it, and the row is returned in :attr:`MergeResult.refused`.
        """
        params = {
            "day": self.usage_date,
            "allow": self.allow_decrease,
            "source": self._source.id,
            "fresh": list(self._source.predecessors),
            "limit": SAMPLE_LIMIT,
        }
        statement = _NEW_DAY_MERGE if self._day_was_empty else _MERGE
        statement = statement.format(usage=self.names.usage.quoted)
        result = MergeResult()

        def merge_staged(part: list | None) -> None:
            if part is not None:  # a retry without the refused rows: stage this part alone
                self._cur.execute(f"TRUNCATE {_STAGE}")
                _copy_rows(self._cur, _STAGE_COLUMNS, part)
            with self._bounded_wait("a row lock on", "held by another connection (an open transaction on the table)"):
                self._cur.execute(statement, params)
            result.add(self._merge_result(self._cur.fetchone()))
            dead_letters.resolve_fixed(self._cur, self.names.errors.quoted, self.usage_date, _STAGE)

        try:
            self._cur.execute("SAVEPOINT usage_agg_merge")
            merge_staged(None)
            self._cur.execute("RELEASE SAVEPOINT usage_agg_merge")
        except Exception as err:
            if not is_row_error(err):
                raise
            self._cur.execute("ROLLBACK TO SAVEPOINT usage_agg_merge")
            self._cur.execute(f"SELECT merchant_id, metric_type, quantity FROM {_STAGE}")
            rows = self._cur.fetchall()
            result.refused += self._isolated(rows, merge_staged, lambda row: row, failed_whole=True)
        self._cur.execute(f"TRUNCATE {_STAGE}")
        self._staged_keys.clear()
        self._staged = 0
        return result

    def _merge_result(self, row) -> MergeResult:
        written, unchanged, drops, resets, samples, overflowing = row
        result = MergeResult(int(written), int(unchanged), int(drops), int(resets), list(samples or []))
        for merchant, metric, offset, redis in overflowing or []:
            result.refused.append(
                self._refused(
                    merchant, metric, str(redis),
                    f"the total would exceed PostgreSQL's bigint: {offset} counted before a reset + Redis value {redis}",
                )  # fmt: skip
            )
        return result


class _LockWaitNamed:
    """Turn a lock wait that timed out into :class:`LockWaitTimeout` naming the table and date."""

    def __init__(self, writer: DayWriter, what: str, holder: str) -> None:
        self.writer, self.what, self.holder = writer, what, holder

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and is_lock_timeout(exc):
            w = self.writer
            raise LockWaitTimeout(
                f"lock timeout: waited {w.lock_timeout.total_seconds():g} s for {self.what} {w.names.usage} "
                f"{w.usage_date.isoformat()}, {self.holder}; Airflow retries the task"
            ) from exc


def _next_offset(quantity: str, offset: str, source: str, redis: str) -> str:
    """SQL: the offset a stored row takes for a new Redis value (the table in the module docstring)."""
    return f"""(CASE WHEN %(allow)s THEN 0
                     WHEN {source} = ANY(%(fresh)s::integer[]) THEN {quantity}
                     WHEN {redis} < {quantity} - {offset} THEN {quantity} - {redis}
                     ELSE {offset} END)"""


# A writer without the day's lock (or a key staged in two chunks) meets a row that is
# already there: the same rules, applied to that row as it stands.
_EXCLUDED_REDIS = "(EXCLUDED.quantity - EXCLUDED.redis_offset)"
_CONFLICT_OFFSET = _next_offset("t.quantity", "t.redis_offset", "t.redis_incarnation", _EXCLUDED_REDIS)
_ON_CONFLICT = f"""
    ON CONFLICT (merchant_id, usage_date, metric_type) DO UPDATE
       SET quantity = {_CONFLICT_OFFSET} + {_EXCLUDED_REDIS},
           redis_offset = {_CONFLICT_OFFSET},
           redis_incarnation = EXCLUDED.redis_incarnation,
           updated_at = now()
     WHERE {_CONFLICT_OFFSET}::numeric + {_EXCLUDED_REDIS} <= {BIGINT_MAX}
       AND ({_CONFLICT_OFFSET} + {_EXCLUDED_REDIS} <> t.quantity OR {_CONFLICT_OFFSET} <> t.redis_offset)"""

# One join of the staged chunk with its stored rows classifies every counter; only rows
# that change reach the INSERT, so an unchanged day writes nothing at all.
_MERGE = (
    f"""
    WITH compared AS MATERIALIZED (
        SELECT s.merchant_id, s.metric_type, s.quantity AS redis,
               t.quantity AS stored, t.redis_offset AS stored_offset, t.redis_incarnation AS stored_source
        FROM {_STAGE} s
        LEFT JOIN {{usage}} t
          ON t.merchant_id = s.merchant_id AND t.usage_date = %(day)s AND t.metric_type = s.metric_type
    ),
    planned AS MATERIALIZED (
        SELECT *, next_offset::numeric + redis AS next_quantity,
               stored IS NOT NULL AND next_offset::numeric + redis = stored AND next_offset = stored_offset AS unchanged
        FROM (SELECT c.*,
                     CASE WHEN stored IS NULL OR %(allow)s THEN NULL
                          WHEN stored_source = ANY(%(fresh)s::integer[]) THEN 'restart'
                          WHEN redis < stored - stored_offset THEN 'drop' END AS reset,
                     CASE WHEN stored IS NULL THEN 0
                          ELSE {_next_offset("stored", "stored_offset", "stored_source", "redis")} END AS next_offset
              FROM compared c) p
    ),
    written AS (
        INSERT INTO {{usage}} AS t (merchant_id, usage_date, metric_type, quantity, redis_offset, redis_incarnation)
        SELECT merchant_id, %(day)s, metric_type, next_quantity, next_offset, %(source)s FROM planned
        WHERE NOT unchanged AND next_quantity <= {BIGINT_MAX}
        {_ON_CONFLICT}
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM written),
           count(*) FILTER (WHERE unchanged),
           count(*) FILTER (WHERE reset IS NOT NULL AND redis < stored - stored_offset),
           count(*) FILTER (WHERE reset IS NOT NULL AND NOT unchanged),
           (SELECT json_agg(r) FROM (
                SELECT merchant_id, metric_type, reset, stored, stored - stored_offset AS last_read, redis,
                       next_quantity AS quantity
                FROM planned WHERE reset IS NOT NULL AND NOT unchanged
                ORDER BY merchant_id, metric_type LIMIT %(limit)s) r),
           (SELECT json_agg(json_build_array(merchant_id, metric_type, next_offset, redis))
            FROM planned WHERE next_quantity > {BIGINT_MAX})
    FROM planned
    """
)

# A day that had no rows when the lock was taken: nothing stored to compare with.
_NEW_DAY_MERGE = f"""
    WITH written AS (
        INSERT INTO {{usage}} AS t (merchant_id, usage_date, metric_type, quantity, redis_offset, redis_incarnation)
        SELECT merchant_id, %(day)s, metric_type, quantity, 0, %(source)s FROM {_STAGE}
        {_ON_CONFLICT}
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM written), (SELECT count(*) FROM {_STAGE}) - (SELECT count(*) FROM written),
           0, 0, NULL, NULL
    """


def _ms(duration: dt.timedelta) -> str:
    return f"{int(duration.total_seconds() * 1000)}ms"


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _copy_safe_text(block: bytes, rows: int) -> str | None:
    """``block`` as text if COPY's text format reads it as exactly ``rows`` rows of 3 fields, else ``None``."""
    if block.count(b"\t") != 2 * rows or block.count(b"\n") != rows or any(b in block for b in (b"\\", b"\r", b"\x00")):
        return None
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _decode_rows(rows: list[tuple[bytes, bytes, bytes]]) -> tuple[list[tuple[str, str, int]], list[BadKey]]:
    good, refused = [], []
    for merchant, metric, quantity in rows:
        try:
            good.append((merchant.decode("utf-8"), metric.decode("utf-8"), int(quantity)))
        except (UnicodeDecodeError, ValueError) as err:
            refused.append(BadKey(b"usage:" + merchant + b":?:" + metric, f"not stageable: {err}", quantity))
    return good, refused


def _copy_text(cur, text: str) -> None:
    """``COPY`` a ready text-format block into the stage."""
    if hasattr(cur, "copy_expert"):  # psycopg2
        cur.copy_expert(f"COPY {_STAGE_COLUMNS} FROM STDIN", io.StringIO(text))
    else:  # psycopg 3
        with cur.copy(f"COPY {_STAGE_COLUMNS} FROM STDIN") as copy:
            copy.write(text)


def _copy_rows(cur, target: str, rows: Iterable[tuple]) -> None:
    """``COPY target FROM STDIN`` with whichever driver the cursor belongs to, every field escaped."""
    if hasattr(cur, "copy_expert"):  # psycopg2: CSV, quoted, so any character in an id is safe
        buffer = io.StringIO()
        csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)
        buffer.seek(0)
        cur.copy_expert(f"COPY {target} FROM STDIN WITH (FORMAT csv)", buffer)
    else:  # psycopg 3 escapes each row itself in COPY's text format
        with cur.copy(f"COPY {target} FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
