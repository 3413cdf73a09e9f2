"""The per-day key index: written by tracking, read by the aggregation, repaired by the expiry check."""

from __future__ import annotations

import datetime as dt

import pytest

from usage_agg.aggregate import aggregate_day
from usage_agg.expiry import check_expiry
from usage_agg.keys import build_key, index_key
from usage_agg.source import discovery_method
from usage_agg.tracking import track_usage

DAY = "2025-11-01"
MERCHANTS = ["acme", "a*", "a", "x:y", "[ab]"]


def stored(query, table) -> dict:
    return {(m, t): q for m, t, q in query(f"SELECT merchant_id, metric_type, quantity FROM {table}")}


def test_tracking_indexes_each_key_with_the_same_expiry(redis_client):
    track_usage(redis_client, "acme", "queries", 2, usage_date=DAY)
    track_usage(redis_client, "acme", "storage", 1, usage_date=DAY)
    assert redis_client.smembers(index_key(DAY)) == {
        build_key("acme", DAY, "queries").encode(),
        build_key("acme", DAY, "storage").encode(),
    }
    assert 7 * 86400 - 5 <= redis_client.ttl(index_key(DAY)) <= 7 * 86400
    # never mistaken for a usage key: no usage pattern matches it
    assert list(redis_client.scan_iter(match="usage:*")) and index_key(DAY).encode() not in set(
        redis_client.scan_iter(match="usage:*")
    )


def test_the_index_gives_the_same_rows_as_scan(redis_client, pg_conn, table, query, pg_schema):
    for day in ("2025-10-30", "2025-10-31", DAY):  # other days held, as in production
        for i, merchant in enumerate(MERCHANTS):
            track_usage(redis_client, merchant, "queries", i + 1, usage_date=day)
    assert discovery_method(redis_client, dt.date(2025, 11, 1)) == "index"
    through_index = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert through_index.discovery == "index" and through_index.rows_written == len(MERCHANTS)
    by_index = stored(query, table)
    other = f"{pg_schema}.by_scan"
    through_scan = aggregate_day(redis_client, pg_conn, DAY, table=other, discovery="scan")
    assert through_scan.discovery == "scan"
    assert stored(query, other) == by_index == {(m, "queries"): i + 1 for i, m in enumerate(MERCHANTS)}


@pytest.mark.parametrize("merchant", MERCHANTS)
def test_a_merchant_rerun_on_an_indexed_day_finds_every_key_of_that_merchant(
    redis_client, pg_conn, table, query, merchant
):
    """A manual repair must see keys however they were written: the index misses plain INCRBYs."""
    for m in MERCHANTS:
        track_usage(redis_client, m, "queries", 1, usage_date=DAY)
    redis_client.incrby(build_key(merchant, DAY, "storage"), 5)  # another application's writer: not indexed
    assert discovery_method(redis_client, dt.date(2025, 11, 1)) == "index"
    result = aggregate_day(redis_client, pg_conn, DAY, table=table, merchant_id=merchant)
    assert (result.discovery, result.keys_found) == ("scan", 2)
    assert stored(query, table) == {(merchant, "queries"): 1, (merchant, "storage"): 5}


@pytest.mark.parametrize("kind", ["string", "hash", "list"])
def test_an_index_key_of_another_type_is_named_and_the_day_scanned(redis_client, pg_conn, table, query, caplog, kind):
    track_usage(redis_client, "acme", "queries", 3, usage_date=DAY, index=False)
    {"string": lambda k: redis_client.set(k, "x"), "hash": lambda k: redis_client.hset(k, "f", "v"),
     "list": lambda k: redis_client.rpush(k, "v")}[kind](index_key(DAY))  # fmt: skip
    for discovery in ("auto", "index"):
        with caplog.at_level("WARNING", logger="usage_agg"):
            result = aggregate_day(redis_client, pg_conn, DAY, table=table, discovery=discovery)
        assert result.discovery == "scan" and result.keys_found == 1
        assert f"usage-index:2025-11-01 holds a Redis {kind}, not the day's index set" in caplog.text
        caplog.clear()
    assert stored(query, table) == {("acme", "queries"): 3}


def test_a_day_without_index_is_scanned(redis_client, pg_conn, table, query):
    redis_client.incrby(build_key("acme", DAY, "queries"), 4)  # another writer
    result = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (result.discovery, result.rows_written) == ("scan", 1)


def test_keys_of_other_writers_are_added_to_the_index_by_the_expiry_check(redis_client, pg_conn, table, query):
    track_usage(redis_client, "acme", "queries", 1, usage_date=DAY)
    redis_client.incrby(build_key("globex", DAY, "queries"), 9)  # another writer, not indexed
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert stored(query, table) == {("acme", "queries"): 1}  # the index did not know globex yet

    report = check_expiry(redis_client, pg_conn, table=table, today=dt.date(2025, 11, 2))
    assert report.unindexed_keys == 1
    aggregate_day(redis_client, pg_conn, DAY, table=table)  # the next hourly run
    assert stored(query, table) == {("acme", "queries"): 1, ("globex", "queries"): 9}
    assert check_expiry(redis_client, pg_conn, table=table, today=dt.date(2025, 11, 2)).unindexed_keys == 0


def test_an_unknown_discovery_mode_is_refused(redis_client, pg_conn, table):
    with pytest.raises(ValueError, match="^discovery: "):
        aggregate_day(redis_client, pg_conn, DAY, table=table, discovery="keys")
