"""A writer that breaks the key protocol: an hour counted without its day, and bad hours that stay visible.

A writer in another language that sends ``HINCRBY`` but not ``INCRBY`` (a bug, a partial deploy, a
different TTL on the hash) leaves hourly counts whose daily counter does not exist. Every such count is
found on its own, stored, and reported with its reason; the expiry check covers hashes as it covers
daily counters. A run that meets a known bad hourly field says so in its result, audit row and event.
"""

from __future__ import annotations

import datetime as dt

import pytest

from usage_agg.aggregate import aggregate_day
from usage_agg.assets import event_extra
from usage_agg.expiry import check_expiry
from usage_agg.keys import build_key, hourly_key, index_key
from usage_agg.reconcile import reconcile_date
from usage_agg.source import NO_DAILY_COUNTER
from usage_agg.tracking import track_usage

UTC = dt.UTC
DAY = "2025-11-01"
NOON = dt.datetime(2025, 11, 1, 12, 30, tzinfo=UTC)


def hours_only(redis_client, merchant: str, metric: str, hour: str, amount: int, ttl: int = 604800) -> str:
    """What a writer that breaks the protocol sends: the hour and its expiry, no daily counter, no index."""
    key = hourly_key(merchant, DAY, metric)
    redis_client.execute_command("HINCRBY", key, hour, amount)
    redis_client.execute_command("EXPIRE", key, ttl)
    return key


def stored_hours(query, table) -> dict[tuple[str, str, int], int]:
    return {
        (m, t, h.astimezone(UTC).hour): q
        for m, t, h, q in query(f"SELECT merchant_id, metric_type, usage_hour, quantity FROM {table}_hourly")
    }


@pytest.mark.parametrize("discovery", ["scan", "auto"])
def test_an_hour_written_without_its_day_is_stored_and_reported(redis_client, pg_conn, table, query, discovery):
    hours_only(redis_client, "nodejs_shop", "api_calls", "14", 3)
    hours_only(redis_client, "nodejs_shop", "api_calls", "15", 4)
    if discovery == "auto":  # a day with no index is scanned whatever the discovery
        track_usage(redis_client, "acme", "queries", 2, at=NOON)
        redis_client.delete(index_key(DAY))
    result = aggregate_day(redis_client, pg_conn, DAY, table=table, discovery=discovery)
    assert stored_hours(query, table)[("nodejs_shop", "api_calls", 14)] == 3
    assert stored_hours(query, table)[("nodejs_shop", "api_calls", 15)] == 4
    assert result.hourly_mismatches == 1
    assert result.hourly_mismatch_samples == [
        {"merchant_id": "nodejs_shop", "metric_type": "api_calls", "daily": None, "hourly_sum": 7,
         "reason": NO_DAILY_COUNTER},
    ]  # fmt: skip
    assert not query(f"SELECT 1 FROM {table} WHERE merchant_id = 'nodejs_shop'")  # no day is invented
    again = aggregate_day(redis_client, pg_conn, DAY, table=table, discovery=discovery)
    assert (again.hourly_rows_written, again.hourly_mismatches) == (0, 1)  # stored once, reported every run

    redis_client.hincrby(hourly_key("nodejs_shop", DAY, "api_calls"), "15", 6)
    grown = aggregate_day(redis_client, pg_conn, DAY, table=table, discovery=discovery)
    assert grown.hourly_rows_written == 1
    assert stored_hours(query, table)[("nodejs_shop", "api_calls", 15)] == 10


def test_a_hash_whose_day_exists_is_read_once_with_its_day(redis_client, pg_conn, table):
    """SCAN meets the hash beside its counter; it is read through the counter, not a second time."""
    track_usage(redis_client, "acme", "queries", 5, at=NOON)
    result = aggregate_day(redis_client, pg_conn, DAY, table=table, discovery="scan")
    assert (result.keys_found, result.hourly_rows_written, result.hourly_mismatches) == (1, 1, 0)


def test_one_merchants_rerun_finds_its_own_hours_without_their_day_and_no_one_elses(
    redis_client, pg_conn, table, query
):
    hours_only(redis_client, "a*", "api_calls", "09", 2)  # the pattern is escaped: "a*" is not "acme"
    hours_only(redis_client, "acme", "api_calls", "09", 5)
    hours_only(redis_client, "acme:2025-11-01:x", "api_calls", "09", 7)  # another merchant whose id begins like it
    result = aggregate_day(redis_client, pg_conn, DAY, table=table, merchant_id="a*")
    assert (result.hourly_rows_written, result.hourly_mismatches) == (1, 1)
    assert stored_hours(query, table) == {("a*", "api_calls", 9): 2}
    aggregate_day(redis_client, pg_conn, DAY, table=table, merchant_id="acme")
    assert ("acme", "api_calls", 9) in stored_hours(query, table)
    assert ("acme:2025-11-01:x", "api_calls", 9) not in stored_hours(query, table)


def test_status_sees_hours_without_their_day_until_they_are_stored(redis_client, pg_conn, table):
    hours_only(redis_client, "nodejs_shop", "api_calls", "14", 3)
    track_usage(redis_client, "acme", "queries", 2, at=NOON)
    before = reconcile_date(redis_client, pg_conn, DAY, table=table, hourly=True)
    assert not before.in_sync and before.hourly_differing_rows == 2  # neither stored yet
    aggregate_day(redis_client, pg_conn, DAY, table=table)  # the index path: the hash is not in the index
    between = reconcile_date(redis_client, pg_conn, DAY, table=table, hourly=True)
    assert not between.in_sync and between.hourly_differing_rows == 1
    assert between.hourly_mismatch_samples[0]["reason"] == NO_DAILY_COUNTER
    assert [h["redis"] for h in between.hours if h["hour"] == "14"] == [3]
    for_merchant = reconcile_date(redis_client, pg_conn, DAY, table=table, merchant_id="nodejs_shop")
    assert not for_merchant.in_sync and for_merchant.hourly_differing_rows == 1


def test_the_expiry_check_indexes_hours_without_their_day_and_rescues_them_before_they_expire(
    redis_client, pg_conn, table, query
):
    track_usage(redis_client, "acme", "queries", 2, at=NOON)  # an indexed day
    hours_only(redis_client, "nodejs_shop", "api_calls", "14", 3)
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert ("nodejs_shop", "api_calls", 14) not in stored_hours(query, table)  # the index does not name it

    report = check_expiry(redis_client, pg_conn, table=table, today=dt.date(2025, 11, 2))
    (day,) = report.days
    assert (day.hours_without_day, day.unsaved_keys) == (1, 0)  # a week to live: not at risk yet
    assert redis_client.sismember(index_key(DAY), hourly_key("nodejs_shop", DAY, "api_calls"))
    result = aggregate_day(redis_client, pg_conn, DAY, table=table)  # the next run reads it from the index
    assert result.discovery == "index" and stored_hours(query, table)[("nodejs_shop", "api_calls", 14)] == 3

    late = hours_only(redis_client, "late_shop", "api_calls", "20", 8, ttl=3600)  # about to expire, never read
    rescued = []
    report = check_expiry(
        redis_client, pg_conn, table=table, today=dt.date(2025, 11, 7),
        rescue=lambda day: rescued.append(aggregate_day(redis_client, pg_conn, day, table=table)),
    )  # fmt: skip
    assert [r.usage_date for r in rescued] == [DAY] and not report.at_risk
    assert stored_hours(query, table)[("late_shop", "api_calls", 20)] == 8
    assert redis_client.ttl(late) > 0


def test_an_expiring_hour_not_stored_is_at_risk(redis_client, pg_conn, table):
    """Without a rescue, an hour about to expire whose value is not stored fails the check,
    even where its daily counter is stored (an hour grew and the day did not)."""
    track_usage(redis_client, "acme", "queries", 2, at=NOON)
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    report = check_expiry(redis_client, pg_conn, table=table, today=dt.date(2025, 11, 7))
    assert not report.at_risk
    redis_client.hincrby(hourly_key("acme", DAY, "queries"), "12", 1)
    for key in (build_key("acme", DAY, "queries"), hourly_key("acme", DAY, "queries")):
        redis_client.expire(key, 600)
    report = check_expiry(redis_client, pg_conn, table=table, today=dt.date(2025, 11, 7))
    assert [d.usage_date for d in report.at_risk] == [DAY]
    assert report.at_risk[0].unsaved_samples == [{"key": hourly_key("acme", DAY, "queries"), "ttl_seconds": 600}]


def test_an_expiring_bad_hour_is_saved_by_its_dead_letter(redis_client, pg_conn, table):
    track_usage(redis_client, "acme", "queries", 2, at=NOON)
    redis_client.hset(hourly_key("acme", DAY, "queries"), "7", 1)  # not "07": a bad field
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    for key in (build_key("acme", DAY, "queries"), hourly_key("acme", DAY, "queries")):
        redis_client.expire(key, 600)
    assert not check_expiry(redis_client, pg_conn, table=table, today=dt.date(2025, 11, 7)).at_risk
    redis_client.hset(hourly_key("acme", DAY, "queries"), "7", 5)  # its value changed: the letter no longer holds it
    assert check_expiry(redis_client, pg_conn, table=table, today=dt.date(2025, 11, 7)).at_risk


def test_a_known_bad_hour_stays_visible_in_the_result_the_audit_and_the_event(redis_client, pg_conn, table, query):
    track_usage(redis_client, "acme", "queries", 5, at=NOON)
    redis_client.hset(hourly_key("acme", DAY, "queries"), mapping={"24": 1, "05": "x"})
    first = aggregate_day(redis_client, pg_conn, DAY, table=table)
    known = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (first.bad_hourly, first.new_bad_keys) == (2, 2)
    assert (known.bad_hourly, known.new_bad_keys, known.bad_keys) == (2, 0, 0)
    assert event_extra(known)["bad_hourly"] == 2
    schema = table.split(".")[0]
    assert query(f"SELECT outcome, bad_hourly, bad_keys FROM {schema}.usage_aggregation_runs ORDER BY id") == [
        ("new_bad_keys", 2, 0), ("known_bad_keys", 2, 0),
    ]  # fmt: skip
    redis_client.hdel(hourly_key("acme", DAY, "queries"), "24", "05")
    fixed = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (fixed.bad_hourly, event_extra(fixed)["bad_hourly"]) == (0, 0)
    assert query(f"SELECT outcome, bad_hourly FROM {schema}.usage_aggregation_runs ORDER BY id DESC LIMIT 1") == [
        ("success", 0)
    ]


def test_bad_hours_not_yet_recorded_make_the_status_out_of_sync(redis_client, pg_conn, table):
    """Status counts bad hourly data still only in Redis, as it counts bad daily keys
    (found by an adversarial review: it said in sync until a run recorded them)."""
    track_usage(redis_client, "m1", "calls", 10, at=NOON)
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    redis_client.hset(hourly_key("m1", DAY, "calls"), mapping={"1": 5, "03": "x"})  # a bad field, a bad value
    redis_client.rpush(hourly_key("m9", DAY, "calls"), "07")  # an hourly key of another type, no day
    whole = reconcile_date(redis_client, pg_conn, DAY, table=table)
    assert (whole.in_sync, whole.redis_bad_hours) == (False, 3)
    one = reconcile_date(redis_client, pg_conn, DAY, table=table, merchant_id="m1")
    assert (one.in_sync, one.redis_bad_hours) == (False, 2)


@pytest.mark.parametrize("discovery", ["scan", "auto"])
def test_the_hours_of_a_bad_daily_counter_are_stored_as_on_a_cluster(redis_client, pg_conn, table, query, discovery):
    """A single node stores the same hours as a cluster, whose parts read hashes on their own:
    hours beside a counter with a bad value or of another type are stored, the counter is a
    bad key (found by an adversarial review: a single node never stored them, and the expiry
    check called them at risk every hour until they expired)."""
    track_usage(redis_client, "ok", "calls", 1, at=NOON)  # an indexed day
    redis_client.set(build_key("m3", DAY, "calls"), "12abc")
    redis_client.hset(hourly_key("m3", DAY, "calls"), "03", 12)
    redis_client.rpush(build_key("m5", DAY, "calls"), "x")
    redis_client.hset(hourly_key("m5", DAY, "calls"), "04", 5)
    redis_client.sadd(index_key(DAY), build_key("m3", DAY, "calls"), build_key("m5", DAY, "calls"))
    if discovery == "auto":  # the index names the counters: the expiry check names their hashes
        check_expiry(redis_client, pg_conn, table=table, today=dt.date(2025, 11, 2))
    result = aggregate_day(redis_client, pg_conn, DAY, table=table, discovery=discovery)
    assert result.bad_keys == 2
    hours = stored_hours(query, table)
    assert (hours[("m3", "calls", 3)], hours[("m5", "calls", 4)]) == (12, 5)
    for key in (build_key("m3", DAY, "calls"), hourly_key("m3", DAY, "calls")):
        redis_client.expire(key, 600)
    assert not check_expiry(redis_client, pg_conn, table=table, today=dt.date(2025, 11, 7)).at_risk
