"""Rows the writer refuses keep what a person needs to fix them: the key, the value, the reason."""

from __future__ import annotations

import datetime as dt

import pytest

from usage_agg.aggregate import aggregate_day
from usage_agg.keys import build_key
from usage_agg.schema import ensure_schema
from usage_agg.sink import DayWriter
from usage_agg.source import BadKey
from usage_agg.tracking import track_usage

DAY = "2025-11-01"


def letters(query, pg_schema) -> dict[str, tuple[str, str]]:
    rows = query(f"SELECT redis_key, raw_value, reason FROM {pg_schema}.usage_aggregation_errors")
    return {key: (value, reason) for key, value, reason in rows}


def test_a_row_postgresql_refuses_keeps_its_value_in_the_dead_letter(redis_client, pg_conn, table, pg_schema, query):
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    query(f"ALTER TABLE {table} ADD CONSTRAINT no_poison CHECK (merchant_id <> 'poison'); SELECT 1")
    track_usage(redis_client, "poison", "queries", 41, usage_date=DAY)
    track_usage(redis_client, "fine", "queries", 1, usage_date=DAY)
    result = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (result.bad_keys, result.rows_written) == (1, 1)
    ((key, (value, reason)),) = letters(query, pg_schema).items()
    assert (key, value) == (build_key("poison", DAY, "queries"), "41")
    assert reason.startswith("PostgreSQL refused the row: ") and "no_poison" in reason and "\n" not in reason
    assert result.bad_key_samples[0]["value"] == "41"


def test_a_total_past_bigint_keeps_the_redis_value_in_the_dead_letter(redis_client, pg_conn, table, pg_schema, query):
    key = build_key("acme", DAY, "queries")
    redis_client.set(key, 2**63 - 1)
    aggregate_day(redis_client, pg_conn, DAY, table=table, discovery="scan")
    redis_client.set(key, 1)  # a reset: 2**63 - 2 kept as the offset
    aggregate_day(redis_client, pg_conn, DAY, table=table, discovery="scan")
    redis_client.set(key, 5)
    aggregate_day(redis_client, pg_conn, DAY, table=table, discovery="scan")
    assert letters(query, pg_schema) == {
        key: ("5", f"the total would exceed PostgreSQL's bigint: {2**63 - 2} counted before a reset + Redis value 5")
    }


def test_rows_that_cannot_be_staged_are_refused_with_key_value_and_reason(pg_conn, pg_schema, query):
    """The writer checks what it is handed, whoever calls it: not UTF-8, or not a number, is refused by name."""
    names = ensure_schema(pg_conn, f"{pg_schema}.merchant_usage")
    with DayWriter(pg_conn, names, dt.date(2025, 11, 1)) as writer:
        refused = writer.stage_plain_rows(
            [(b"\xff", b"q", b"1"), (b"shop", b"\xfe", b"2"), (b"back\\slash", b"q", b"x"), (b"plain", b"q", b"5")]
        )
        assert refused == [
            BadKey(b"usage:\xff:2025-11-01:q", "cannot be staged: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte", b"1"),
            BadKey(b"usage:shop:2025-11-01:\xfe", "cannot be staged: 'utf-8' codec can't decode byte 0xfe in position 0: invalid start byte", b"2"),
            BadKey(b"usage:back\\slash:2025-11-01:q", "cannot be staged: invalid literal for int() with base 10: b'x'", b"x"),
        ]  # fmt: skip
        assert writer.staged == 1
        writer.merge()
    assert query(f"SELECT merchant_id, quantity FROM {names.usage.quoted}") == [("plain", 5)]


def test_a_refusal_reason_is_never_empty():
    from usage_agg.refusals import first_line

    assert first_line(ValueError("  first line\nsecond line")) == "first line"
    assert first_line(ValueError()) == "ValueError"


def test_the_days_transaction_bounds_its_waits_and_gets_memory_for_the_merge(pg_conn, pg_schema, query):
    names = ensure_schema(pg_conn, f"{pg_schema}.merchant_usage")
    settings = "SELECT current_setting('lock_timeout'), current_setting('idle_in_transaction_session_timeout'), current_setting('work_mem')"
    with pg_conn.cursor() as cur:
        cur.execute(settings)
        outside = cur.fetchone()
    pg_conn.rollback()
    with DayWriter(pg_conn, names, dt.date(2025, 11, 1), lock_timeout=dt.timedelta(seconds=7)):
        with pg_conn.cursor() as cur:
            cur.execute(settings)
            assert cur.fetchone() == ("7s", "10min", "64MB")
    with pg_conn.cursor() as cur:
        cur.execute(settings)
        assert cur.fetchone() == outside  # local to the day's transaction
    pg_conn.rollback()


@pytest.mark.parametrize("merchant", [b"tab\there", b"back\\slash", b"cr\rhere", b"nl\nhere", b"two\t\ttabs"])
def test_a_block_with_one_odd_character_alone_is_staged_escaped_never_garbled(pg_conn, pg_schema, query, merchant):
    """Each character COPY's text format would misread, alone in its block: no other check can catch it."""
    names = ensure_schema(pg_conn, f"{pg_schema}.merchant_usage")
    with DayWriter(pg_conn, names, dt.date(2025, 11, 1)) as writer:
        assert writer.stage_plain_rows([(merchant, b"q", b"7")]) == []
        writer.merge()
    assert query(f"SELECT merchant_id, metric_type, quantity FROM {names.usage.quoted}") == [(merchant.decode(), "q", 7)]
