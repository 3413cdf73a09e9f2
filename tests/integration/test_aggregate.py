"""Every semantic of the core against real Redis and PostgreSQL, with both drivers."""

from __future__ import annotations

import datetime as dt
import logging

import pytest
import redis

from usage_agg.aggregate import aggregate_day
from usage_agg.keys import build_key
from usage_agg.tracking import track_usage
from usage_agg.schema import SCHEMA_VERSION

DAY = "2025-11-01"


def rows(query, table, day=DAY):
    return dict(
        ((m, t), q)
        for m, t, q in query(f"SELECT merchant_id, metric_type, quantity FROM {table} WHERE usage_date = %s", (day,))
    )


def seed(client, counts: dict[tuple[str, str], int], day=DAY):
    for (merchant, metric), amount in counts.items():
        track_usage(client, merchant, metric, amount, usage_date=day)


def test_rows_equal_redis_totals_and_reruns_never_double_count(redis_client, pg_conn, table, query):
    seed(redis_client, {("acme", "queries"): 42, ("acme", "storage"): 7, ("globex", "queries"): 3})
    first = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (first.keys_found, first.rows_written, first.rows_unchanged) == (3, 3, 0)
    for _ in range(3):
        again = aggregate_day(redis_client, pg_conn, DAY, table=table)
        assert (again.rows_written, again.rows_unchanged) == (0, 3)
    assert rows(query, table) == {("acme", "queries"): 42, ("acme", "storage"): 7, ("globex", "queries"): 3}


def test_growing_counters_update_to_the_new_absolute_total(redis_client, pg_conn, table, query):
    seed(redis_client, {("acme", "queries"): 10})
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    seed(redis_client, {("acme", "queries"): 5})
    result = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert result.rows_written == 1
    assert rows(query, table) == {("acme", "queries"): 15}


def test_unchanged_rows_are_not_rewritten(redis_client, pg_conn, table, query):
    seed(redis_client, {("acme", "queries"): 10, ("globex", "queries"): 1})
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    before = query(f"SELECT merchant_id, updated_at, xmin::text FROM {table} ORDER BY 1")
    seed(redis_client, {("globex", "queries"): 1})
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    after = query(f"SELECT merchant_id, updated_at, xmin::text FROM {table} ORDER BY 1")
    assert after[0] == before[0]  # acme: same tuple, same updated_at
    assert after[1][1] > before[1][1]  # globex changed


def test_expired_keys_leave_stored_rows_alone(redis_client, pg_conn, table, query, caplog):
    seed(redis_client, {("acme", "queries"): 42})
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    redis_client.flushdb()
    with caplog.at_level(logging.INFO, logger="usage_agg"):
        result = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (result.keys_found, result.rows_written) == (0, 0)
    assert rows(query, table) == {("acme", "queries"): 42}
    assert "No usage keys in Redis for 2025-11-01" in caplog.text


def stored_rows(query, table, day=DAY):
    """``(merchant, metric) -> (quantity, redis_offset)``."""
    return {
        (m, t): (q, o)
        for m, t, q, o in query(
            f"SELECT merchant_id, metric_type, quantity, redis_offset FROM {table} WHERE usage_date = %s", (day,)
        )
    }


def test_a_lower_redis_value_is_a_reset_that_keeps_what_was_counted(redis_client, pg_conn, table, query):
    seed(redis_client, {("acme", "queries"): 100, ("acme", "storage"): 5})
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    redis_client.set(build_key("acme", DAY, "queries"), 60)  # lowered in place: evicted and recounted, or SET

    reset = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (reset.resets, reset.decreases_refused, reset.rows_written) == (1, 1, 1)
    assert reset.reset_samples == [
        {"merchant_id": "acme", "metric_type": "queries", "reset": "drop", "stored": 100, "last_read": 100,
         "redis": 60, "quantity": 100}
    ]  # fmt: skip
    assert stored_rows(query, table)[("acme", "queries")] == (100, 40)

    redis_client.incrby(build_key("acme", DAY, "queries"), 15)  # growth after the reset counts
    grown = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (grown.resets, grown.rows_written, grown.rows_unchanged) == (0, 1, 1)
    assert stored_rows(query, table) == {("acme", "queries"): (115, 40), ("acme", "storage"): (5, 0)}
    again = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (again.resets, again.rows_written, again.rows_unchanged) == (0, 0, 2)

    allowed = aggregate_day(redis_client, pg_conn, DAY, table=table, allow_decrease=True)  # Redis is the truth
    assert (allowed.resets, allowed.decreases_refused, allowed.rows_written) == (0, 0, 1)
    assert stored_rows(query, table) == {("acme", "queries"): (75, 0), ("acme", "storage"): (5, 0)}


class FailingAfterBatches:
    """A real Redis client whose connection drops after ``good`` batches were read."""

    def __init__(self, client, good: int = 1):
        self.client = client
        self.good = good
        self.batches = 0

    def __getattr__(self, name):  # everything else is the real client's
        return getattr(self.client, name)

    def mget(self, keys):  # one MGET per batch
        self.batches += 1
        if self.batches > self.good:
            raise redis.ConnectionError("Connection reset by peer (injected)")
        return self.client.mget(keys)


@pytest.mark.parametrize(
    ("day_has_rows", "merge_every", "merged_chunks"),
    [(True, 10**9, 0), (True, 10, 0), (False, 10, 3)],
    ids=["no-merge-yet", "day-with-rows-compared-at-the-end", "first-aggregation-three-chunks-written"],
)
def test_a_run_failing_part_way_leaves_the_date_as_it_was(
    redis_client, pg_conn, table, pg_schema, query, monkeypatch, day_has_rows, merge_every, merged_chunks
):
    import usage_agg.aggregate as aggregate_module

    aggregate_day(redis_client, pg_conn, "2025-10-31", table=table)  # the schema, and an audit row
    if day_has_rows:
        seed(redis_client, {(f"m{i:03d}", "queries"): 1 for i in range(50)})
        aggregate_day(redis_client, pg_conn, DAY, table=table)
    before = stored_rows(query, table)
    seed(redis_client, {(f"m{i:03d}", "queries"): 1 for i in range(60)})  # 50 grow (or are new), 10 new
    redis_client.set(build_key("m000", DAY, "queries"), 0)  # and one reset (of a day with rows)

    monkeypatch.setattr(aggregate_module, "MERGE_EVERY_ROWS", merge_every)  # 10: a chunk ends after every batch
    failing = FailingAfterBatches(redis_client, good=3)
    with pytest.raises(redis.ConnectionError):
        aggregate_day(failing, pg_conn, DAY, table=table, batch_size=10, discovery="scan")
    assert stored_rows(query, table) == before  # the chunks written were rolled back with the rest
    audit = query(
        f"SELECT outcome, rows_written, rows_unchanged, resets, error FROM {pg_schema}.usage_aggregation_runs ORDER BY id"
    )
    assert audit[-2][0] == "success"
    assert audit[-1][:4] == ("failed", 0, 0, 0)  # what was committed: nothing
    assert audit[-1][4] == (
        f"ConnectionError: Connection reset by peer (injected) (rolled back after reading 30 "
        f"keys and merging {10 * merged_chunks} rows; nothing of this run was committed)"
    )

    aggregate_day(redis_client, pg_conn, DAY, table=table, batch_size=10)
    expected = {(f"m{i:03d}", "queries"): (2 if i < 50 and day_has_rows else 1) for i in range(60)}
    expected[("m000", "queries")] = 1 if day_has_rows else 0  # a drop keeps what was counted
    assert rows(query, table) == expected


MERCHANTS = ["a", "a*", "ab", "a?c", "a[b]c", "[ab]", "a\\*", "a\\", "x", "x:y", "x:2025-11-01:y", "^a", "a-b", "*"]


def test_glob_characters_and_colons_in_merchant_ids(redis_client, pg_conn, table, query):
    seed(redis_client, {(m, "queries"): i + 1 for i, m in enumerate(MERCHANTS)})
    seed(redis_client, {("x", "queries"): 99}, day="2025-11-02")  # usage:x:2025-11-01:y:... lookalikes
    result = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert result.keys_found == len(MERCHANTS)
    assert rows(query, table) == {(m, "queries"): i + 1 for i, m in enumerate(MERCHANTS)}


@pytest.mark.parametrize("merchant", MERCHANTS)
def test_a_merchant_rerun_touches_that_merchant_alone(redis_client, pg_conn, table, query, merchant):
    seed(redis_client, {(m, "queries"): 1 for m in MERCHANTS})
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    seed(redis_client, {(m, "queries"): 10 for m in MERCHANTS})
    result = aggregate_day(redis_client, pg_conn, DAY, table=table, merchant_id=merchant)
    assert (result.keys_found, result.rows_written) == (1, 1)
    assert rows(query, table) == {(m, "queries"): (11 if m == merchant else 1) for m in MERCHANTS}


def test_a_merchant_rerun_reports_its_own_bad_keys_and_not_anothers_that_its_pattern_meets(
    redis_client, pg_conn, pg_schema, table, query
):
    """The pattern of merchant ``acme`` also meets the keys of merchant ``acme:2025-11-01:zz``.
    (Found by an adversarial review: such a key with a bad date failed acme's rerun as a new
    bad key of acme's.) It is another merchant's: acme's rerun leaves it to the whole day's
    runs, which report it; a bad key of acme's own is still reported by the rerun."""
    seed(redis_client, {("acme", "queries"): 5})
    redis_client.set(b"usage:acme:2025-11-01:zz:2025-13-45:q", b"1")  # another merchant's, bad date
    redis_client.set(b"usage:acme:2025-11-01:" + b"m" * 257, b"2")  # acme's, metric type too long
    rerun = aggregate_day(redis_client, pg_conn, DAY, table=table, merchant_id="acme", discovery="scan")
    assert (rerun.keys_found, rerun.rows_written, rerun.bad_keys) == (2, 1, 1)
    letters = f"SELECT redis_key FROM {pg_schema}.usage_aggregation_errors ORDER BY redis_key"
    assert [text for (text,) in query(letters)] == ["usage:acme:2025-11-01:" + "m" * 257]
    whole = aggregate_day(redis_client, pg_conn, DAY, table=table, discovery="scan")
    assert whole.bad_keys == 2
    assert "usage:acme:2025-11-01:zz:2025-13-45:q" in [text for (text,) in query(letters)]


UNICODE_AND_AWKWARD = ["café", "商户-42", "🛒shop", 'quote"d', "comma,id", "tab\tid", "new\nline", "\\.", "back\\slash"]


def test_unicode_and_awkward_ids_round_trip(redis_client, pg_conn, table, query):
    seed(redis_client, {(m, "métrique"): i + 1 for i, m in enumerate(UNICODE_AND_AWKWARD)})
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert rows(query, table) == {(m, "métrique"): i + 1 for i, m in enumerate(UNICODE_AND_AWKWARD)}


BAD_KEYS = {
    b"usage:text:2025-11-01:q": (b"abc", "not a non-negative integer"),
    b"usage:neg:2025-11-01:q": (b"-5", "negative"),
    b"usage:float:2025-11-01:q": (b"1.5", "not a non-negative integer"),
    b"usage:huge:2025-11-01:q": (str(2**63).encode(), "bigint"),
    b"usage::2025-11-01:q": (b"1", "merchant id is empty"),
    b"usage:\xff\xfe:2025-11-01:q": (b"1", "not valid UTF-8"),
    b"usage:nul\x00:2025-11-01:q": (b"1", "NUL"),
}


def test_bad_keys_never_block_good_ones_and_are_recorded(redis_client, pg_conn, table, pg_schema, query):
    seed(redis_client, {("good", "queries"): 5, ("good", "storage"): 6})
    for key, (value, _) in BAD_KEYS.items():
        redis_client.set(key, value)
    redis_client.rpush(b"usage:list:2025-11-01:q", b"1")
    redis_client.hset(b"usage:hash:2025-11-01:q", b"f", b"1")

    # The bad keys come from other writers, outside the day's index: read the day with SCAN.
    result = aggregate_day(redis_client, pg_conn, DAY, table=table, discovery="scan")
    assert rows(query, table) == {("good", "queries"): 5, ("good", "storage"): 6}
    assert (result.keys_found, result.bad_keys, result.new_bad_keys) == (2 + 9, 9, 9)
    reasons = dict(query(f"SELECT redis_key, reason FROM {pg_schema}.usage_aggregation_errors"))
    for key, (_, reason) in BAD_KEYS.items():
        text = key.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")
        assert reason in reasons[text]
    assert "list" in reasons["usage:list:2025-11-01:q"] and "hash" in reasons["usage:hash:2025-11-01:q"]


def test_the_same_bad_key_is_new_once_and_again_only_when_it_changes(redis_client, pg_conn, table, pg_schema, query):
    redis_client.set("usage:m:2025-11-01:q", "oops")
    assert aggregate_day(redis_client, pg_conn, DAY, table=table).new_bad_keys == 1
    assert aggregate_day(redis_client, pg_conn, DAY, table=table).new_bad_keys == 0
    redis_client.set("usage:m:2025-11-01:q", "oops2")
    assert aggregate_day(redis_client, pg_conn, DAY, table=table).new_bad_keys == 1
    assert query(f"SELECT times_seen, resolved_at FROM {pg_schema}.usage_aggregation_errors") == [(3, None)]

    redis_client.set("usage:m:2025-11-01:q", 7)  # fixed at the source
    fixed = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (fixed.bad_keys, fixed.rows_written) == (0, 1)
    assert query(f"SELECT resolution FROM {pg_schema}.usage_aggregation_errors") == [("fixed",)]


def test_a_dismissed_bad_key_stays_dismissed_while_unchanged(redis_client, pg_conn, table, pg_schema, query):
    redis_client.set("usage:m:2025-11-01:q", "oops")
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    query(
        f"UPDATE {pg_schema}.usage_aggregation_errors SET resolved_at = now(), resolution = 'dismissed' RETURNING 1"
    )
    assert aggregate_day(redis_client, pg_conn, DAY, table=table).new_bad_keys == 0
    assert query(f"SELECT resolution FROM {pg_schema}.usage_aggregation_errors") == [("dismissed",)]


def test_counters_of_other_days_are_not_touched(redis_client, pg_conn, table, query):
    seed(redis_client, {("acme", "queries"): 1}, day="2025-10-31")
    seed(redis_client, {("acme", "queries"): 2}, day=DAY)
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert query(f"SELECT usage_date, quantity FROM {table}") == [(dt.date(2025, 11, 1), 2)]


def test_batches_stream_in_bulk(redis_client, pg_conn, table, query):
    seed(redis_client, {(f"m{i}", "q"): i + 1 for i in range(2_500)})
    result = aggregate_day(redis_client, pg_conn, DAY, table=table, batch_size=100, scan_count=50)
    assert (result.keys_found, result.rows_written) == (2_500, 2_500)
    assert query(f"SELECT count(*), sum(quantity) FROM {table}")[0] == (2_500, sum(range(1, 2_501)))


def test_logs_read_like_the_original_job(redis_client, pg_conn, table, caplog):
    seed(redis_client, {("acme", "queries"): 1, ("acme", "storage"): 2})
    redis_client.set("usage:bad:2025-11-01:q", "x")
    with caplog.at_level(logging.INFO, logger="usage_agg"):
        aggregate_day(redis_client, pg_conn, DAY, table=table, discovery="scan")
    messages = [r.getMessage() for r in caplog.records]
    assert "Starting aggregation for date: 2025-11-01" in messages
    assert "Found 3 usage keys to process" in messages
    assert any(m.startswith("Completed. Records aggregated: 2, Errors: 1") for m in messages)
    assert not any(r.levelno == logging.DEBUG for r in caplog.records)


def test_schema_matches_the_contract(redis_client, pg_conn, table, pg_schema, query):
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    columns = dict(
        query(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
            (pg_schema, "merchant_usage"),
        )
    )
    assert columns == {
        "merchant_id": "text",
        "usage_date": "date",
        "metric_type": "text",
        "quantity": "bigint",
        "created_at": "timestamp with time zone",
        "updated_at": "timestamp with time zone",
        # what was counted before a reset, and the Redis life the last value came from
        "redis_offset": "bigint",
        "redis_incarnation": "integer",
    }
    pk = query(
        """SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
           WHERE i.indrelid = %s::regclass AND i.indisprimary ORDER BY array_position(i.indkey, a.attnum)""",
        (table,),
    )
    assert [c for (c,) in pk] == ["merchant_id", "usage_date", "metric_type"]
    with pytest.raises(Exception, match="check"):
        query(f"INSERT INTO {table} (merchant_id, usage_date, metric_type, quantity) VALUES ('m', %s, 'q', -1)", (DAY,))


def test_an_injected_table_name_is_refused_before_any_sql(redis_client, pg_conn, pg_schema):
    with pytest.raises(ValueError, match="^table: "):
        aggregate_day(redis_client, pg_conn, DAY, table=f"{pg_schema}.x; DROP TABLE y")


def test_an_autocommit_connection_is_refused_before_anything_is_written(redis_client, pg_conn, pg_schema, table, query):
    """In autocommit mode every statement would commit alone: the day's lock would last one
    statement and a run failing part-way would leave part of the date written. Refused before
    the schema, the Redis lives or a failed run's audit row are written (the adversarial review
    found those written first), and by the writer itself for its other callers."""
    from usage_agg.schema import ensure_schema
    from usage_agg.sink import DayWriter

    seed(redis_client, {("acme", "queries"): 3})
    pg_conn.autocommit = True
    with pytest.raises(ValueError, match=f"autocommit mode; {table} 2025-11-01 must be written in one transaction"):
        aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert query("SELECT to_regnamespace(%s)", (pg_schema,)) == [(None,)]
    names = ensure_schema(pg_conn, table)
    with pytest.raises(ValueError, match=f"autocommit mode; {names.usage} 2025-11-01 must be written"):
        DayWriter(pg_conn, names, dt.date(2025, 11, 1)).__enter__()
    pg_conn.autocommit = False
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert rows(query, table) == {("acme", "queries"): 3}


def test_writers_of_the_same_date_wait_for_each_other_bounded(redis_client, pg_conn, table, query):
    from tests.conftest import day_lock_held

    seed(redis_client, {("acme", "queries"): 1})
    aggregate_day(redis_client, pg_conn, DAY, table=table)  # creates the schema
    with day_lock_held(table, DAY):  # another writer holds the date
        with pytest.raises(Exception, match="lock timeout"):
            aggregate_day(redis_client, pg_conn, DAY, table=table, lock_timeout=dt.timedelta(milliseconds=300))
        pg_conn.rollback()
        # another date is not blocked
        aggregate_day(redis_client, pg_conn, "2025-11-02", table=table, lock_timeout=dt.timedelta(milliseconds=300))
    assert aggregate_day(redis_client, pg_conn, DAY, table=table).rows_unchanged == 1


def test_tracking_counts_and_sets_the_seven_day_expiry_in_one_round_trip(redis_client):
    assert track_usage(redis_client, "acme", "queries", 3, usage_date=DAY) == 3
    assert track_usage(redis_client, "acme", "queries", usage_date=DAY) == 4
    ttl = redis_client.ttl(build_key("acme", DAY, "queries"))
    assert 7 * 86400 - 5 <= ttl <= 7 * 86400
    with pytest.raises(ValueError, match="amount"):
        track_usage(redis_client, "acme", "queries", -1)


def test_weekly_and_monthly_rollups_follow_iso_weeks_and_months(redis_client, pg_conn, table, pg_schema, query):
    # 2024-12-30 and 2025-01-05 are both in ISO week 2025-W01; 2025-01-06 starts W02.
    for day, amount in (("2024-12-30", 1), ("2024-12-31", 2), ("2025-01-05", 4), ("2025-01-06", 8)):
        track_usage(redis_client, "acme", "queries", amount, usage_date=day)
        aggregate_day(redis_client, pg_conn, day, table=table)
    weekly = query(f"SELECT iso_week, week_start::text, quantity, days_with_usage FROM {table}_weekly ORDER BY 1")
    assert weekly == [("2025-W01", "2024-12-30", 7, 3), ("2025-W02", "2025-01-06", 8, 1)]
    monthly = query(f"SELECT month, quantity FROM {table}_monthly ORDER BY 1")
    assert monthly == [("2024-12", 3), ("2025-01", 12)]


def test_an_older_schema_is_upgraded_by_the_next_run(redis_client, pg_conn, table, pg_schema, query):
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    # what version 1 looked like: no error column, no version comment
    query(f"ALTER TABLE {pg_schema}.usage_aggregation_runs DROP COLUMN error; COMMENT ON TABLE {table} IS NULL; SELECT 1")
    seed(redis_client, {("acme", "queries"): 1})
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert query(
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = %s AND table_name = %s AND column_name = 'error'",
        (pg_schema, "usage_aggregation_runs"),
    ) == [(1,)]
    assert query("SELECT obj_description(%s::regclass, 'pg_class')", (table,)) == [(f"usage-agg schema {SCHEMA_VERSION}",)]
    assert rows(query, table) == {("acme", "queries"): 1}


def test_merging_in_chunks_gives_the_same_result_as_one_merge(redis_client, pg_conn, pg_schema, query, monkeypatch):
    """The aggregation merges every MERGE_EVERY_ROWS staged rows while Redis is read; nothing may differ."""
    import usage_agg.aggregate as aggregate_module
    from usage_agg.tracking import track_usage as track

    for n in range(12):
        track(redis_client, f"m{n:02d}", "queries", 10 + n, usage_date="2025-11-01")
    redis_client.set("usage:broken:2025-11-01:queries", "NaN")
    results, tables = {}, {}
    for label, every in (("one", 10**9), ("chunked", 3)):
        table = tables[label] = f"{pg_schema}.{label}"
        aggregate_day(redis_client, pg_conn, "2025-11-01", table=table, discovery="scan")
        # stored totals above Redis for two merchants: resets (drops), in any chunk
        query(f"UPDATE {table} SET quantity = quantity + 100 WHERE merchant_id IN ('m03', 'm09') RETURNING 1")
        track(redis_client, "m05", "queries", 1, usage_date="2025-11-01")  # grew since
        monkeypatch.setattr(aggregate_module, "MERGE_EVERY_ROWS", every)
        results[label] = aggregate_day(redis_client, pg_conn, "2025-11-01", table=table, batch_size=2, discovery="scan")
        redis_client.decrby("usage:m05:2025-11-01:queries", 1)
    one, chunked = results["one"], results["chunked"]
    for field in ("keys_found", "rows_written", "rows_unchanged", "decreases_refused", "resets", "bad_keys", "new_bad_keys"):
        assert getattr(chunked, field) == getattr(one, field), field
    assert (chunked.rows_written, chunked.decreases_refused, chunked.resets, chunked.rows_unchanged) == (3, 2, 2, 9)
    assert sorted(chunked.reset_samples, key=str) == sorted(one.reset_samples, key=str)
    rows = "SELECT merchant_id, metric_type, quantity, redis_offset FROM {} ORDER BY 1"
    assert query(rows.format(tables["chunked"])) == query(rows.format(tables["one"]))


@pytest.mark.parametrize("stored_before", [False, True], ids=["new-day", "day-with-rows"])
def test_a_key_staged_twice_is_merged_read_by_read(pg_conn, pg_schema, query, stored_before):
    """SCAN and SSCAN may return a key twice, in one batch or two: the merge does not fail on
    it, and merges its reads one after the other (each written or unchanged once)."""
    import datetime as dt

    from usage_agg.keys import UsageKey
    from usage_agg.schema import ensure_schema
    from usage_agg.sink import DayWriter
    from usage_agg.source import Counter

    day = dt.date(2025, 11, 1)
    names = ensure_schema(pg_conn, f"{pg_schema}.merchant_usage")
    pg_conn.commit()
    if stored_before:
        query(f"INSERT INTO {names.usage.quoted} (merchant_id, usage_date, metric_type, quantity) "
              "VALUES ('other', '2025-11-01', 'q', 1) RETURNING 1")  # fmt: skip
    with DayWriter(pg_conn, names, day) as writer:
        writer.stage_plain_rows([(b"acme", b"q", b"5"), (b"acme", b"q", b"6"), (b"globex", b"q", b"1")])
        writer.stage_plain_rows([(b"globex", b"q", b"1"), (b"initech", b"q", b"2")])
        writer.stage([Counter(UsageKey("acme", day, "q"), 7), Counter(UsageKey("umbrella", day, "q"), 3)])
        merged = writer.merge()
    assert (merged.rows_written, merged.rows_unchanged) == (6, 1)  # acme 5, 6, 7; globex's second read
    assert dict(query(f"SELECT merchant_id, quantity FROM {names.usage.quoted} WHERE merchant_id <> 'other'")) == {
        "acme": 7, "globex": 1, "initech": 2, "umbrella": 3,
    }  # fmt: skip


@pytest.mark.parametrize("stored_before", [False, True], ids=["new-day", "day-with-rows"])
def test_a_key_staged_in_two_chunks_never_lowers_its_total(pg_conn, pg_schema, query, stored_before):
    """The new-day fast path inserts without comparing; its conflict rule must still never lower a total."""
    import datetime as dt

    from usage_agg.schema import ensure_schema
    from usage_agg.sink import DayWriter

    names = ensure_schema(pg_conn, f"{pg_schema}.merchant_usage")
    if stored_before:
        query(f"INSERT INTO {names.usage.quoted} (merchant_id, usage_date, metric_type, quantity) "
              "VALUES ('other', '2025-11-01', 'q', 1) RETURNING 1")  # fmt: skip
    with DayWriter(pg_conn, names, dt.date(2025, 11, 1)) as writer:
        writer.stage_plain_rows([(b"acme", b"q", b"10")])
        first = writer.merge()
        writer.stage_plain_rows([(b"acme", b"q", b"4")])  # read again, lower: a reset between the reads
        second = writer.merge()
        writer.stage_plain_rows([(b"acme", b"q", b"12")])
        third = writer.merge()
    assert first.rows_written == 1
    assert (second.rows_written, third.rows_written) == (1, 1)
    assert query(f"SELECT quantity, redis_offset FROM {names.usage.quoted} WHERE merchant_id = 'acme'") == [(18, 6)]


def test_stage_plain_rows_checks_the_block_it_sends(pg_conn, pg_schema, query):
    """Rows that COPY's text format would misread are staged escaped instead, never garbled."""
    import datetime as dt

    from usage_agg.schema import ensure_schema
    from usage_agg.sink import DayWriter

    names = ensure_schema(pg_conn, f"{pg_schema}.merchant_usage")
    odd = [(b"tab\there", b"q", b"1"), (b"back\\slash", b"q", b"2"), (b"cr\rhere", b"q", b"3"), (b"nl\nhere", b"q", b"4")]
    with DayWriter(pg_conn, names, dt.date(2025, 11, 1)) as writer:
        assert writer.stage_plain_rows(odd + [(b"plain", b"q", b"5")]) == []
        writer.merge()
    assert dict(query(f"SELECT merchant_id, quantity FROM {names.usage.quoted}")) == {
        "tab\there": 1, "back\\slash": 2, "cr\rhere": 3, "nl\nhere": 4, "plain": 5,
    }  # fmt: skip


def test_a_version_3_database_is_upgraded_in_place(redis_client, pg_conn, pg_schema, query):
    """What the last release created (schema 3, its exact DDL), with rows and dead letters, upgrades cleanly."""
    from pathlib import Path

    from usage_agg.schema import SchemaNames

    names = SchemaNames.for_table(f"{pg_schema}.merchant_usage")
    v3 = (Path(__file__).parent / "schema_v3.sql").read_text().format(
        usage_table=names.usage.quoted, errors_table=names.errors.quoted, runs_table=names.runs.quoted,
        weekly_view=names.weekly.quoted, monthly_view=names.monthly.quoted,
        usage_date_index='"merchant_usage_usage_date_idx"', errors_open_index='"usage_aggregation_errors_open_idx"',
        runs_date_index='"usage_aggregation_runs_date_idx"', version_comment="'usage-agg schema 3'",
    )  # fmt: skip
    query(f'CREATE SCHEMA "{pg_schema}"; {v3}; SELECT 1')
    query(f"""INSERT INTO {names.usage.quoted} (merchant_id, usage_date, metric_type, quantity)
              VALUES ('acme', '2025-11-01', 'queries', 100), ('globex', '2025-11-01', 'queries', 7);
              INSERT INTO {names.errors.quoted} (redis_key, usage_date, raw_value, reason)
              VALUES ('usage:broken:2025-11-01:q', '2025-11-01', 'oops', 'value is not a non-negative integer');
              SELECT 1""")  # fmt: skip

    seed(redis_client, {("acme", "queries"): 60, ("globex", "queries"): 9})  # acme: a reset since the last run
    redis_client.set("usage:broken:2025-11-01:q", "oops")  # still bad, with the same value: known, not new
    result = aggregate_day(redis_client, pg_conn, DAY, table=f"{pg_schema}.merchant_usage", discovery="scan")
    assert (result.resets, result.bad_keys, result.new_bad_keys) == (1, 1, 0)
    assert query(f"SELECT merchant_id, quantity, redis_offset FROM {names.usage.quoted} ORDER BY 1") == [
        ("acme", 100, 40), ("globex", 9, 0),
    ]  # fmt: skip
    assert query(f"SELECT convert_from(raw_key, 'UTF8'), times_seen FROM {names.errors.quoted}") == [
        ("usage:broken:2025-11-01:q", 2)
    ]
    assert query("SELECT obj_description(%s::regclass, 'pg_class')", (names.usage.quoted,)) == [(f"usage-agg schema {SCHEMA_VERSION}",)]


def test_a_new_day_goes_in_by_plain_insert_until_a_row_turns_up(pg_conn, pg_schema, query):
    """The first aggregation of a day skips the merge rules (there is nothing to merge with);
    a row another writer put there meanwhile sends the rest of the day back to them."""
    import datetime as dt

    from tests.conftest import pg_connect
    from usage_agg.schema import ensure_schema
    from usage_agg.sink import DayWriter

    names = ensure_schema(pg_conn, f"{pg_schema}.merchant_usage")
    with DayWriter(pg_conn, names, dt.date(2025, 11, 1)) as writer:
        writer.stage_plain_rows([(b"acme", b"q", b"5")])
        first = writer.merge()
        assert writer._daily.plain_inserts  # nothing was in the way
        other = pg_connect()  # a writer without the day's lock commits a higher total meanwhile
        with other, other.cursor() as cur:
            cur.execute(
                f"INSERT INTO {names.usage.quoted} (merchant_id, usage_date, metric_type, quantity) "
                "VALUES ('globex', '2025-11-01', 'q', 100)"
            )
        other.close()
        writer.stage_plain_rows([(b"globex", b"q", b"7"), (b"initech", b"q", b"2")])
        second = writer.merge()
        assert not writer._daily.plain_inserts  # merged by the rules from here on
        writer.stage_plain_rows([(b"umbrella", b"q", b"1")])
        third = writer.merge()
    assert (first.rows_written, first.rows_unchanged) == (1, 0)
    assert (second.rows_written, third.rows_written) == (2, 1)
    assert query(f"SELECT merchant_id, quantity, redis_offset FROM {names.usage.quoted} ORDER BY 1") == [
        ("acme", 5, 0), ("globex", 100, 93), ("initech", 2, 0), ("umbrella", 1, 0),
    ]  # fmt: skip  (globex: never lowered; Redis's 7 counts on top of the 93 before it)
    assert query(f"SELECT count(*) FROM {names.errors.quoted}") == [(0,)]  # a row in the way is not bad data


def test_a_new_day_is_copied_straight_in_as_the_merge_would_write_it(pg_conn, pg_schema, query):
    """A day's first rows skip the stage and the statement (COPY into the table itself):
    offset 0, the Redis life they were read from, each hour at its UTC hour whatever the
    session's time zone."""
    import datetime as dt

    from usage_agg.lives import Source
    from usage_agg.schema import ensure_schema
    from usage_agg.sink import DayWriter

    names = ensure_schema(pg_conn, f"{pg_schema}.merchant_usage")
    with pg_conn.cursor() as cur:
        cur.execute("SET TIME ZONE 'Pacific/Kiritimati'")  # UTC+14: a local hour would land on another date
    with DayWriter(pg_conn, names, dt.date(2025, 11, 1)) as writer:
        writer.use_source(Source(41))
        assert writer.stage_plain_rows([(b"acme", b"q", b"5"), (b"globex", b"q", b"7")]) == []
        assert writer.stage_hours([(b"acme", b"q", 0, 2), (b"acme", b"q", 23, 3)]) == []
        assert (writer._daily.copied_in, writer._daily.staged, writer._hourly.copied_in, writer._hourly.staged) == (
            2, 0, 2, 0,
        )  # fmt: skip
        assert writer.staged == 4  # so the caller merges every chunk, as for staged rows
        merged = writer.merge()
        assert (writer.staged, merged.rows_written, merged.hourly_rows_written) == (0, 2, 2)
    assert query(
        f"SELECT merchant_id, usage_date::text, quantity, redis_offset, redis_incarnation FROM {names.usage.quoted} "
        "ORDER BY 1"
    ) == [("acme", "2025-11-01", 5, 0, 41), ("globex", "2025-11-01", 7, 0, 41)]
    assert query(
        f"SELECT to_char(usage_hour AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24'), quantity, redis_offset, redis_incarnation "
        f"FROM {names.hourly.quoted} ORDER BY 1"
    ) == [("2025-11-01 00", 2, 0, 41), ("2025-11-01 23", 3, 0, 41)]


def test_a_new_day_with_open_dead_letters_is_staged_so_fixed_keys_resolve_them(pg_conn, pg_schema, query):
    """Resolving a letter needs the clean key staged: such a day skips the straight COPY."""
    import datetime as dt

    from usage_agg.schema import ensure_schema
    from usage_agg.sink import DayWriter
    from usage_agg.source import BadKey

    names = ensure_schema(pg_conn, f"{pg_schema}.merchant_usage")
    day = dt.date(2025, 11, 1)
    with DayWriter(pg_conn, names, day) as writer:
        writer.record_bad_keys([BadKey(b"usage:acme:2025-11-01:q", "value is not a number", b"oops")])
    with DayWriter(pg_conn, names, day) as writer:
        assert writer._daily.was_empty and not writer._daily.copy_straight_in
        writer.stage_plain_rows([(b"acme", b"q", b"5")])
        assert (writer._daily.copied_in, writer._daily.staged) == (0, 1)
        assert writer.merge().rows_written == 1
    assert query(f"SELECT resolution FROM {names.errors.quoted}") == [("fixed",)]


#: a 200-byte merchant id suffix: staged rows fill several pages
WIDE = "w" * 196


def test_a_day_with_rows_read_whole_is_compared_once_and_a_refused_row_costs_itself(
    redis_client, pg_conn, table, pg_schema, query, monkeypatch
):
    """A day with rows keeps its chunks staged and compares them with the stored day in one
    hash join; a row PostgreSQL refuses there sends the stage through again in slices,
    which set that row aside and merge the rest."""
    import usage_agg.aggregate as aggregate_module
    import usage_agg.write_routes as write_routes

    calls: list[str] = []
    for method in ("_merged_by_day_scan", "_merged_in_slices", "_merged_with_refusals"):
        original = getattr(write_routes.Stage, method)
        monkeypatch.setattr(
            write_routes.Stage, method, lambda self, params, _o=original, _m=method: calls.append(_m) or _o(self, params)
        )
    monkeypatch.setattr(aggregate_module, "MERGE_EVERY_ROWS", 10)  # a chunk ends after every batch
    monkeypatch.setattr(write_routes, "LOOKUP_ROWS", 25)
    monkeypatch.setattr(write_routes, "SLICE_PAGES", 1)  # 200-byte ids: about 35 staged rows a page
    seed(redis_client, {(f"m{i:03d}{WIDE}", "queries"): 1 for i in range(60)})
    first = aggregate_day(redis_client, pg_conn, DAY, table=table, batch_size=10)
    assert (first.rows_written, calls) == (60, [])  # a new day: COPYed straight in, chunk by chunk

    query(f"ALTER TABLE {table} ADD CONSTRAINT no_poison CHECK (merchant_id <> 'poison'); SELECT 1")
    seed(redis_client, {(f"m{i:03d}{WIDE}", "queries"): 1 for i in range(0, 60, 2)})  # 30 grow, 30 do not
    seed(redis_client, {("poison", "queries"): 7, ("new", "queries"): 3})
    again = aggregate_day(redis_client, pg_conn, DAY, table=table, batch_size=10)
    assert calls[:2] == ["_merged_by_day_scan", "_merged_in_slices"]  # one comparison, then a slice a page
    assert calls.count("_merged_with_refusals") >= 2
    assert (again.rows_written, again.rows_unchanged, again.bad_keys, again.new_bad_keys) == (31, 30, 1, 1)
    expected = {(f"m{i:03d}{WIDE}", "queries"): 2 if i % 2 == 0 else 1 for i in range(60)} | {("new", "queries"): 3}
    assert rows(query, table) == expected
    assert query(f"SELECT redis_key FROM {pg_schema}.usage_aggregation_errors") == [(f"usage:poison:{DAY}:queries",)]

    calls.clear()
    redis_client.delete(build_key("poison", DAY, "queries"))
    rerun = aggregate_day(redis_client, pg_conn, DAY, table=table, batch_size=10)
    assert calls == ["_merged_by_day_scan"]
    assert (rerun.rows_written, rerun.rows_unchanged, rerun.bad_keys) == (0, 61, 0)


@pytest.mark.usefixtures("merge_by")
@pytest.mark.parametrize("chunks_apart", [False, True], ids=["one-chunk", "chunks-apart"])
def test_a_key_read_twice_with_a_drop_between_keeps_the_growth_read_before_it(pg_conn, pg_schema, query, chunks_apart):
    """Stored 10; the run reads 15, then (the key deleted and counted again, SCAN returning it
    a second time) 2. Read one after the other, the rules give 15 with offset 13: nothing
    read is lost, and growth from 2 counts. (Found by an adversarial review: the day's one
    comparison used to take the read 2 alone and keep 10, offset 8, losing the 5 read before
    the drop; within a chunk the first read was kept, and growth after the drop lost.)"""
    from usage_agg.schema import ensure_schema
    from usage_agg.sink import DayWriter

    names = ensure_schema(pg_conn, f"{pg_schema}.merchant_usage")
    day = dt.date(2025, 11, 1)
    with DayWriter(pg_conn, names, day) as writer:
        writer.stage_plain_rows([(b"acme", b"q", b"10")])
        writer.merge()
    with DayWriter(pg_conn, names, day) as writer:
        writer.stage_plain_rows([(b"acme", b"q", b"15")])
        if chunks_apart:
            writer.end_chunk()
        writer.stage_plain_rows([(b"acme", b"q", b"2")])
        merged = writer.merge()
    assert (merged.rows_written, merged.resets, merged.decreases_refused) == (2, 1, 1)
    assert query(f"SELECT quantity, redis_offset FROM {names.usage.quoted}") == [(15, 13)]


@pytest.mark.parametrize("chunks_apart", [False, True], ids=["one-chunk", "chunks-apart"])
@pytest.mark.parametrize("clean_first", [True, False], ids=["clean-then-bad", "bad-then-clean"])
def test_a_key_read_clean_and_bad_in_one_run_keeps_its_letter_open(pg_conn, pg_schema, query, clean_first, chunks_apart):
    """SCAN returned a key twice and it changed between the reads: once clean, once bad. The
    run cannot tell which read its letter should follow, so the letter stays open and known;
    the next run that reads the key clean only marks it fixed. (Found by an adversarial
    review: a clean read staged before the bad one marked the letter fixed at the merge, so
    the key showed fixed while bad, and the next run alerted on it as new.)"""
    from usage_agg.schema import ensure_schema
    from usage_agg.sink import DayWriter
    from usage_agg.source import BadKey

    names = ensure_schema(pg_conn, f"{pg_schema}.merchant_usage")
    day = dt.date(2025, 11, 1)
    bad = BadKey(b"usage:acme:2025-11-01:q", "value is not a number", b"oops")
    letter = f"SELECT resolution, times_seen FROM {names.errors.quoted}"
    with DayWriter(pg_conn, names, day) as writer:
        assert writer.record_bad_keys([bad]) == 1  # an earlier run met it: open, alerted once
    with DayWriter(pg_conn, names, day) as writer:
        reads = [lambda: writer.stage_plain_rows([(b"acme", b"q", b"5")]), lambda: writer.record_bad_keys([bad])]
        for read in reads if clean_first else reversed(reads):
            assert not read()  # nothing refused, nothing new
            if chunks_apart:
                writer.end_chunk()
        writer.merge()
    assert query(letter) == [(None, 2)]
    with DayWriter(pg_conn, names, day) as writer:
        assert writer.record_bad_keys([bad]) == 0  # still bad: known, no second alert
    with DayWriter(pg_conn, names, day) as writer:
        writer.stage_plain_rows([(b"acme", b"q", b"5")])
        writer.merge()
    assert query(letter) == [("fixed", 3)]


@pytest.mark.parametrize("staged_first", ["counters", "escaped", "hours"])
def test_a_new_days_rows_wait_in_the_stage_behind_rows_read_before_them(pg_conn, pg_schema, query, staged_first):
    """A day's first rows go straight into the table, but a block that had to be staged (a
    batch with a bad or vanished key goes as counters; a backslash is escaped) was read
    before the blocks after it: while it waits, later blocks join it in the stage, so a key
    in both is merged in the order read. (Found by an adversarial review: a later read
    COPYed straight in, then the earlier staged read merged on top as a drop, gave 8 with
    offset 3, and 11 at the next run of the same 8.)"""
    from usage_agg.keys import UsageKey
    from usage_agg.schema import ensure_schema
    from usage_agg.sink import DayWriter
    from usage_agg.source import Counter

    names = ensure_schema(pg_conn, f"{pg_schema}.merchant_usage")
    day = dt.date(2025, 11, 1)
    for expected_run in range(2):  # the first run, then a run that reads the same 8 again
        with DayWriter(pg_conn, names, day) as writer:
            if expected_run == 0 and staged_first == "counters":
                writer.stage([Counter(UsageKey("acme", day, "q"), 5)])
            elif expected_run == 0 and staged_first == "escaped":
                writer.stage_plain_rows([(b"back\\slash", b"q", b"1"), (b"acme", b"q", b"5")])
            elif expected_run == 0:
                writer.stage_plain_rows([(b"acme", b"q", b"5")])
                writer.stage_hours([(b"back\\slash", b"q", 3, 1), (b"acme", b"q", 3, 5)])
            writer.stage_plain_rows([(b"acme", b"q", b"8")])
            writer.stage_hours([(b"acme", b"q", 3, 8)])
            merged = writer.merge()
        assert (merged.resets, merged.hourly_resets) == (0, 0)
        assert query(f"SELECT quantity, redis_offset FROM {names.usage.quoted} WHERE merchant_id = 'acme'") == [(8, 0)]
        assert query(f"SELECT quantity, redis_offset FROM {names.hourly.quoted} WHERE merchant_id = 'acme'") == [(8, 0)]


def test_a_key_staged_in_two_chunks_is_merged_read_by_read_and_planner_settings_are_left_as_found(pg_conn, pg_schema, query):
    """SCAN may return a key twice, chunks apart; the day's comparison merges its reads one
    after the other. Nested loops, turned off for the day scan, are as the session had them
    afterwards."""
    import datetime as dt

    from usage_agg.schema import ensure_schema
    from usage_agg.sink import DayWriter

    names = ensure_schema(pg_conn, f"{pg_schema}.merchant_usage")
    day = dt.date(2025, 11, 1)
    with DayWriter(pg_conn, names, day) as writer:
        writer.stage_plain_rows([(b"acme", b"q", b"3"), (b"globex", b"q", b"1")])
        writer.merge()
    for first_read, session_setting in ((5, "on"), (8, "off")):
        with pg_conn.cursor() as cur:
            cur.execute(f"SET enable_nestloop = {session_setting}")
        with DayWriter(pg_conn, names, day) as writer:
            writer.stage_plain_rows([(b"acme", b"q", b"%d" % first_read), (b"globex", b"q", b"1")])
            assert writer.end_chunk().rows_written == 0  # a day with rows: compared at the end
            writer.stage_plain_rows([(b"acme", b"q", b"%d" % (first_read + 2)), (b"globex", b"q", b"1")])
            merged = writer.merge()
            with pg_conn.cursor() as cur:
                cur.execute("SELECT current_setting('enable_nestloop')")
                assert cur.fetchone()[0] == session_setting
        assert (merged.rows_written, merged.rows_unchanged) == (2, 2)  # each read written or unchanged once
        assert query(f"SELECT merchant_id, quantity FROM {names.usage.quoted} ORDER BY 1") == [
            ("acme", first_read + 2), ("globex", 1),
        ]  # fmt: skip
