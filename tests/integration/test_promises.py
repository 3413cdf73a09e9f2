"""The promises that keep a day from being blocked, hung, hidden or misreported, against the real services.

No key can block a day; every wait is bounded and names what it waited for; one table
has one identity; the audit tells the truth; one key has one dead letter.
"""

from __future__ import annotations

import datetime as dt
import random
import time

import pytest

from tests.conftest import day_lock_held, pg_connect
from usage_agg.aggregate import aggregate_day
from usage_agg.db_errors import LockWaitTimeout
from usage_agg.expiry import check_expiry
from usage_agg.keys import MAX_MERCHANT_ID_BYTES, MAX_METRIC_TYPE_BYTES, build_key
from usage_agg.schema import SchemaNames
from usage_agg.tracking import track_usage

DAY = "2025-11-01"


def seed(client, counts: dict[tuple[str, str], int], day=DAY, index=True):
    for (merchant, metric), amount in counts.items():
        track_usage(client, merchant, metric, amount, usage_date=day, index=index)


def rows(query, table, day=DAY):
    return {(m, t): q for m, t, q in query(f"SELECT merchant_id, metric_type, quantity FROM {table} WHERE usage_date = %s", (day,))}


def incompressible(n_bytes: int) -> str:
    """Text of exactly ``n_bytes`` UTF-8 bytes that PostgreSQL cannot compress (so its index entry is full size)."""
    rng = random.Random(n_bytes)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(n_bytes))


# No key can block a day


@pytest.mark.parametrize("discovery", ["index", "scan"])
def test_a_key_too_long_to_store_is_a_bad_key_and_the_day_commits(redis_client, pg_conn, table, pg_schema, query, discovery):
    seed(redis_client, {("acme", "queries"): 5, ("globex", "queries"): 6})
    longest = incompressible(MAX_MERCHANT_ID_BYTES)
    seed(redis_client, {(longest, "q" * MAX_METRIC_TYPE_BYTES): 7})  # the longest accepted: stored
    too_long = incompressible(3 * 1024)  # over PostgreSQL's index limit (about 2.7 KB)
    redis_client.incrby(f"usage:{too_long}:{DAY}:queries", 8)
    redis_client.sadd(f"usage-index:{DAY}", f"usage:{too_long}:{DAY}:queries")
    redis_client.incrby(f"usage:acme:{DAY}:{'m' * (MAX_METRIC_TYPE_BYTES + 1)}", 9)
    redis_client.sadd(f"usage-index:{DAY}", f"usage:acme:{DAY}:{'m' * (MAX_METRIC_TYPE_BYTES + 1)}")

    result = aggregate_day(redis_client, pg_conn, DAY, table=table, discovery=discovery)
    assert (result.keys_found, result.bad_keys, result.new_bad_keys) == (5, 2, 2)
    assert rows(query, table) == {("acme", "queries"): 5, ("globex", "queries"): 6, (longest, "q" * 256): 7}
    letters = dict(query(f"SELECT redis_key, reason FROM {pg_schema}.usage_aggregation_errors"))
    assert letters == {
        f"usage:{too_long}:{DAY}:queries": "merchant id is 3072 bytes long; at most 1024 bytes are accepted",
        f"usage:acme:{DAY}:{'m' * 257}": "metric type is 257 bytes long; at most 256 bytes are accepted",
    }
    with pytest.raises(ValueError, match="merchant_id: merchant id is 1025 bytes long"):  # the writer refuses it too
        track_usage(redis_client, incompressible(MAX_MERCHANT_ID_BYTES + 1), "queries")


def test_any_row_postgresql_refuses_is_set_aside_and_the_rest_committed(redis_client, pg_conn, table, pg_schema, query):
    """A refusal nobody foresaw (here: a constraint the DBA added) costs one row, not the day."""
    aggregate_day(redis_client, pg_conn, DAY, table=table)  # the schema
    query(f"ALTER TABLE {table} ADD CONSTRAINT no_poison CHECK (merchant_id NOT LIKE 'poison%%'); SELECT 1")
    seed(redis_client, {(f"m{i:03d}", "queries"): i + 1 for i in range(40)})
    seed(redis_client, {("poison1", "queries"): 1, ("poison2", "queries"): 2})
    first = aggregate_day(redis_client, pg_conn, DAY, table=table, batch_size=7)  # a day without rows yet
    assert (first.keys_found, first.bad_keys, first.new_bad_keys) == (42, 2, 2)
    assert rows(query, table) == {(f"m{i:03d}", "queries"): i + 1 for i in range(40)}
    seed(redis_client, {("m000", "queries"): 1})
    again = aggregate_day(redis_client, pg_conn, DAY, table=table, batch_size=7)  # a day with rows
    assert (again.bad_keys, again.new_bad_keys, again.rows_written) == (2, 0, 1)
    assert rows(query, table)[("m000", "queries")] == 2
    reasons = dict(query(f"SELECT redis_key, reason FROM {pg_schema}.usage_aggregation_errors"))
    assert set(reasons) == {f"usage:poison1:{DAY}:queries", f"usage:poison2:{DAY}:queries"}
    assert all(r.startswith("PostgreSQL refused the row: ") and "no_poison" in r for r in reasons.values())


@pytest.mark.usefixtures("merge_by")
def test_a_total_past_bigint_after_a_reset_is_a_bad_key(redis_client, pg_conn, table, pg_schema, query):
    key = build_key("acme", DAY, "queries")
    redis_client.set(key, 2**63 - 1)
    seed(redis_client, {("globex", "queries"): 1}, index=False)
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    redis_client.set(key, 1)  # a reset: the offset keeps 2**63 - 2
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    redis_client.set(key, 5)  # 2**63 - 2 + 5 does not fit
    seed(redis_client, {("globex", "queries"): 1}, index=False)
    result = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (result.bad_keys, result.new_bad_keys, result.rows_written) == (1, 1, 1)
    assert rows(query, table) == {("acme", "queries"): 2**63 - 1, ("globex", "queries"): 2}
    assert query(f"SELECT reason FROM {pg_schema}.usage_aggregation_errors") == [
        (f"the total would exceed PostgreSQL's bigint: {2**63 - 2} counted before a reset + Redis value 5",)
    ]
    # The next run finds it as it was: a known bad key, not a new one (the merge refuses a
    # key it staged clean, whose open letter was marked fixed a moment before in the same
    # transaction), so the task does not fail and alert again on every run.
    again = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (again.bad_keys, again.new_bad_keys) == (1, 0)
    assert query(f"SELECT resolved_at, times_seen FROM {pg_schema}.usage_aggregation_errors") == [(None, 2)]


def test_a_first_aggregation_meeting_a_row_past_bigint_sets_it_aside(pg_conn, pg_schema, query):
    """A writer without the day's lock puts a row there after the day was found empty, with
    an offset from an earlier reset: the first aggregation's plain COPY meets it, the rows
    are merged by the rules instead, and a total past the bigint is set aside (a bad key,
    dead-lettered by the caller) as on any day with rows, with the rest written."""
    from usage_agg.schema import ensure_schema
    from usage_agg.sink import DayWriter

    names = ensure_schema(pg_conn, f"{pg_schema}.merchant_usage")
    pg_conn.commit()
    with DayWriter(pg_conn, names, dt.date(2025, 11, 1)) as writer:  # the day is found empty here
        query(
            f"INSERT INTO {names.usage.quoted} (merchant_id, usage_date, metric_type, quantity, redis_offset)"
            " VALUES ('acme', %s, 'queries', %s, %s) RETURNING 1",
            (DAY, 2**63 - 1, 2**63 - 2),
        )
        assert writer.stage_plain_rows([(b"acme", b"queries", b"5"), (b"globex", b"queries", b"2")]) == []
        merged = writer.merge()
    assert merged.rows_written == 1
    [refused] = merged.refused
    assert (refused.raw_key, refused.raw_value) == (build_key("acme", DAY, "queries").encode(), b"5")
    assert refused.reason == f"the total would exceed PostgreSQL's bigint: {2**63 - 2} counted before a reset + Redis value 5"
    assert rows(query, f"{pg_schema}.merchant_usage") == {("acme", "queries"): 2**63 - 1, ("globex", "queries"): 2}


# Every wait is bounded


def test_a_row_lock_held_elsewhere_times_out_naming_table_and_date(redis_client, pg_conn, table, query):
    seed(redis_client, {("acme", "queries"): 1})
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    seed(redis_client, {("acme", "queries"): 1})
    holder = pg_connect()
    try:
        with holder.cursor() as cur:  # an open UPDATE on the row, never committed
            cur.execute(f"UPDATE {table} SET updated_at = now() WHERE merchant_id = 'acme'")
        started = time.monotonic()
        with pytest.raises(LockWaitTimeout, match=rf"waited 0.3 s for a row lock on {table} 2025-11-01, held by another connection"):
            aggregate_day(redis_client, pg_conn, DAY, table=table, lock_timeout=dt.timedelta(milliseconds=300))
        assert time.monotonic() - started < 60  # bounded (the bound itself is lock_timeout)
    finally:
        holder.rollback()
        holder.close()
    assert aggregate_day(redis_client, pg_conn, DAY, table=table).rows_written == 1
    assert rows(query, table) == {("acme", "queries"): 2}


def test_an_uncommitted_row_in_a_new_days_way_times_out_then_its_outcome_counts(redis_client, pg_conn, table, query):
    """A writer without the day's lock inserts a row of a day that has none, and keeps its
    transaction open: the day's first COPY waits for it, within lock_timeout."""
    aggregate_day(redis_client, pg_conn, "2025-10-31", table=table)  # the schema
    seed(redis_client, {("acme", "queries"): 5, ("globex", "queries"): 1})
    holder = pg_connect()
    try:
        with holder.cursor() as cur:
            cur.execute(
                f"INSERT INTO {table} (merchant_id, usage_date, metric_type, quantity) VALUES ('acme', %s, 'queries', 9)",
                (DAY,),
            )
        with pytest.raises(LockWaitTimeout, match=rf"waited 0.3 s for a row lock on {table} 2025-11-01"):
            aggregate_day(redis_client, pg_conn, DAY, table=table, lock_timeout=dt.timedelta(milliseconds=300))
        holder.commit()  # its row is there now: the first aggregation merges with it by the rules
    finally:
        holder.rollback()
        holder.close()
    result = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (result.rows_written, result.bad_keys) == (2, 0)
    assert rows(query, table) == {("acme", "queries"): 9, ("globex", "queries"): 1}  # 9 never lowered to 5


def test_the_day_lock_timeout_names_table_and_date(redis_client, pg_conn, table):
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    with day_lock_held(table, DAY), pytest.raises(
        LockWaitTimeout, match=rf"^lock timeout: waited 0.2 s for the lock on {table} 2025-11-01, held by another writer"
    ):
        aggregate_day(redis_client, pg_conn, DAY, table=table, lock_timeout=dt.timedelta(milliseconds=200))


# One table, one identity


def test_a_table_and_its_qualified_name_are_one_table(redis_client, pg_schema, query):
    """``merchant_usage`` on the search path and ``schema.merchant_usage``: one lock, one audit, one check."""
    seed(redis_client, {("acme", "queries"): 1}, index=False)
    bare, qualified = pg_connect(), pg_connect()
    with bare.cursor() as cur:
        cur.execute(f'CREATE SCHEMA "{pg_schema}"')
        cur.execute(f'SET search_path TO "{pg_schema}"')
    bare.commit()
    aggregate_day(redis_client, bare, DAY, table="merchant_usage")
    # a writer under one spelling blocks a writer under the other
    with day_lock_held(f"{pg_schema}.merchant_usage", DAY), pytest.raises(LockWaitTimeout):
        aggregate_day(redis_client, bare, DAY, table="merchant_usage", lock_timeout=dt.timedelta(milliseconds=200))
    aggregate_day(redis_client, qualified, DAY, table=f"{pg_schema}.merchant_usage")
    assert set(query(f'SELECT usage_table FROM "{pg_schema}".usage_aggregation_runs WHERE outcome <> %s', ("failed",))) == {
        (f"{pg_schema}.merchant_usage",)
    }
    for conn, spelling in ((bare, "merchant_usage"), (qualified, f"{pg_schema}.merchant_usage")):
        report = check_expiry(redis_client, conn, table=spelling, today=dt.date(2025, 11, 2))
        assert [d.aggregated for d in report.days] == [True]
    bare.close()
    qualified.close()


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("usage_aggregation_runs", "companion table"),
        ("usage_aggregation_errors", "companion table"),
        ("usage_redis_incarnations", "companion table"),
        ("merchant_usage_weekly", "ends with _hourly/_weekly/_monthly/_windows/_idx"),
        ("sales_monthly", "ends with _hourly/_weekly/_monthly/_windows/_idx"),
        ("merchant_usage_usage_date_idx", "ends with _hourly/_weekly/_monthly/_windows/_idx"),
        ("x" * 49, "at most 48"),
    ],
)
def test_table_names_that_collide_with_companions_are_refused(redis_client, pg_conn, pg_schema, name, problem):
    with pytest.raises(ValueError, match=f"^table: .*{problem}"):
        aggregate_day(redis_client, pg_conn, DAY, table=f"{pg_schema}.{name}")
    SchemaNames.for_table("x" * 48)  # the longest accepted


# The audit tells the truth


class SlowReads:
    def __init__(self, client, seconds):
        self.client, self.seconds = client, seconds

    def __getattr__(self, name):
        return getattr(self.client, name)

    def mget(self, keys):
        time.sleep(self.seconds)
        return self.client.mget(keys)


def test_the_audit_row_finishes_when_the_run_does(redis_client, pg_conn, table, pg_schema, query):
    seed(redis_client, {("acme", "queries"): 1, ("globex", "queries"): 2})
    aggregate_day(SlowReads(redis_client, 0.4), pg_conn, DAY, table=table, batch_size=1)
    [(started, finished)] = query(f"SELECT started_at, finished_at FROM {pg_schema}.usage_aggregation_runs")
    assert finished - started >= dt.timedelta(seconds=0.8)  # two slow batches: not the transaction's start


def test_the_audit_row_is_written_in_the_dates_transaction(redis_client, pg_conn, table, pg_schema, query, monkeypatch):
    """A failure after the audit row was written, before commit, leaves neither data nor a success row."""
    from usage_agg.sink import DayWriter

    record_run = DayWriter.record_run

    def record_then_fail(self, audit_row):
        record_run(self, audit_row)
        raise RuntimeError("the worker died before commit")

    seed(redis_client, {("acme", "queries"): 1})
    monkeypatch.setattr(DayWriter, "record_run", record_then_fail)
    with pytest.raises(RuntimeError, match="before commit"):
        aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert rows(query, table) == {}
    assert query(f"SELECT outcome FROM {pg_schema}.usage_aggregation_runs") == [("failed",)]


# Dead letters: one key, one letter


def test_an_invalid_utf8_key_and_its_escaped_lookalike_have_a_letter_each(redis_client, pg_conn, table, pg_schema, query):
    redis_client.set(b"usage:\xff:2025-11-01:q", b"1")  # bad: not UTF-8
    redis_client.set(b"usage:\\xff:2025-11-01:q", b"oops")  # valid UTF-8, reads the same once escaped; bad value
    first = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (first.bad_keys, first.new_bad_keys) == (2, 2)
    redis_client.set(b"usage:\\xff:2025-11-01:q", b"3")  # the lookalike is fixed ...
    second = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (second.bad_keys, second.new_bad_keys) == (1, 0)  # ... the other stays bad, and is not new
    letters = query(f"SELECT raw_key, redis_key, resolution FROM {pg_schema}.usage_aggregation_errors ORDER BY 1")
    assert [(bytes(k), t, r) for k, t, r in letters] == [
        (b"usage:\\xff:2025-11-01:q", "usage:\\xff:2025-11-01:q", "fixed"),
        (b"usage:\xff:2025-11-01:q", "usage:\\xff:2025-11-01:q", None),
    ]
    assert rows(query, table) == {("\\xff", "q"): 3}
    third = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (third.bad_keys, third.new_bad_keys) == (1, 0)


def test_a_long_bad_key_is_shown_shortened_and_kept_apart_by_its_digest(redis_client, pg_conn, table, pg_schema, query):
    """A letter shows the first 4,096 bytes of a key and says how long it was; a key of exactly
    that length is shown whole. Two keys alike in those bytes are two letters."""
    from usage_agg.dead_letters import KEY_PREVIEW

    exact = b"usage:" + b"m" * (KEY_PREVIEW - len(b"usage::2025-11-01:q")) + b":2025-11-01:q"
    longer = [b"usage:" + b"m" * 5000 + tail for tail in (b"a:2025-11-01:q", b"b:2025-11-01:q")]
    for key in (exact, *longer):
        redis_client.set(key, 1)
    assert len(exact) == KEY_PREVIEW
    assert aggregate_day(redis_client, pg_conn, DAY, table=table).new_bad_keys == 3
    letters = query(f"SELECT redis_key, octet_length(raw_key) FROM {pg_schema}.usage_aggregation_errors ORDER BY 1")
    preview = longer[0][:KEY_PREVIEW].decode()
    assert letters == [(exact.decode(), KEY_PREVIEW)] + [(f"{preview}... ({len(longer[0])} bytes)", KEY_PREVIEW)] * 2


@pytest.mark.parametrize("day_has_rows", [False, True])
def test_dead_letter_life_cycle(redis_client, pg_conn, table, pg_schema, query, day_has_rows):
    letters = f"{pg_schema}.usage_aggregation_errors"
    if day_has_rows:
        seed(redis_client, {("acme", "queries"): 1}, index=False)
    redis_client.set("usage:m:2025-11-01:q", "oops")
    assert aggregate_day(redis_client, pg_conn, DAY, table=table).new_bad_keys == 1
    redis_client.set("usage:m:2025-11-01:q", 7)  # fixed at the source
    assert aggregate_day(redis_client, pg_conn, DAY, table=table).bad_keys == 0
    assert query(f"SELECT resolution FROM {letters}") == [("fixed",)]
    redis_client.set("usage:m:2025-11-01:q", "oops")  # broken again, with the same value as before
    assert aggregate_day(redis_client, pg_conn, DAY, table=table).new_bad_keys == 1
    assert query(f"SELECT resolution, times_seen FROM {letters}") == [(None, 2)]
    query(f"UPDATE {letters} SET resolved_at = now(), resolution = 'dismissed' RETURNING 1")
    assert aggregate_day(redis_client, pg_conn, DAY, table=table).new_bad_keys == 0  # dismissed, same value
    assert query(f"SELECT resolution FROM {letters}") == [("dismissed",)]
    redis_client.set("usage:m:2025-11-01:q", "oops, worse")
    assert aggregate_day(redis_client, pg_conn, DAY, table=table).new_bad_keys == 1  # reopened: new value
    assert query(f"SELECT resolution, resolved_at FROM {letters}") == [(None, None)]


# Reading: odd bytes, vanishing keys, merchant boundaries


@pytest.mark.parametrize("odd", ["\t", "\r", "\\", "\\t", "\\N"])
def test_a_plain_batch_with_one_odd_merchant_id_goes_through_exactly(redis_client, pg_conn, table, query, odd):
    merchants = [f"m{i:02d}" for i in range(30)] + [f"sh{odd}op"]
    seed(redis_client, {(m, "queries"): i + 1 for i, m in enumerate(merchants)})
    aggregate_day(redis_client, pg_conn, DAY, table=table, batch_size=100)
    assert rows(query, table) == {(m, "queries"): i + 1 for i, m in enumerate(merchants)}


class DeletesBeforeRead:
    """The real client; a key expires between SCAN and the batch's MGET."""

    def __init__(self, client, victim: str):
        self.client, self.victim = client, victim

    def __getattr__(self, name):
        return getattr(self.client, name)

    def mget(self, keys):
        self.client.delete(self.victim)
        return self.client.mget(keys)


@pytest.mark.parametrize("bulk_batch", [True, False], ids=["plain-batch", "odd-batch"])
def test_a_key_vanishing_between_scan_and_get_counts_as_vanished(redis_client, pg_conn, table, pg_schema, query, bulk_batch):
    seed(redis_client, {("acme", "queries"): 1, ("globex", "queries"): 2, ("initech", "queries"): 3})
    if not bulk_batch:
        seed(redis_client, {("odd\tone", "queries"): 4})
    result = aggregate_day(DeletesBeforeRead(redis_client, build_key("globex", DAY, "queries")), pg_conn, DAY, table=table)
    assert (result.vanished_keys, result.bad_keys) == (1, 0)
    assert ("globex", "queries") not in rows(query, table)
    assert query(f"SELECT count(*) FROM {pg_schema}.usage_aggregation_errors") == [(0,)]
