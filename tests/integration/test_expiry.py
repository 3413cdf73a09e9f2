"""Days about to expire without ever being aggregated, found on the real services."""

from __future__ import annotations

import datetime as dt

from usage_agg.aggregate import aggregate_day
from usage_agg.expiry import check_expiry
from usage_agg.tracking import track_usage

TODAY = dt.date(2025, 11, 8)


def test_a_never_aggregated_day_close_to_expiry_is_at_risk(redis_client, pg_conn, table):
    track_usage(redis_client, "acme", "queries", 1, usage_date="2025-11-01", ttl=dt.timedelta(hours=5))
    track_usage(redis_client, "acme", "queries", 1, usage_date="2025-11-07")
    track_usage(redis_client, "acme", "queries", 1, usage_date="2025-11-08")
    redis_client.set("usage:nonsense", 1)  # not a usage key of any day: ignored
    aggregate_day(redis_client, pg_conn, "2025-11-08", table=table)

    report = check_expiry(redis_client, pg_conn, table=table, today=TODAY)
    assert [d.usage_date for d in report.days] == ["2025-11-01", "2025-11-07", "2025-11-08"]
    assert [d.usage_date for d in report.at_risk] == ["2025-11-01"]
    assert 0 < report.at_risk[0].min_ttl_seconds <= 5 * 3600
    assert report.lag_days == 7  # 2025-11-01 has keys and no successful aggregation

    aggregate_day(redis_client, pg_conn, "2025-11-01", table=table)
    aggregate_day(redis_client, pg_conn, "2025-11-07", table=table)
    report = check_expiry(redis_client, pg_conn, table=table, today=TODAY)
    assert report.at_risk == [] and report.lag_days == 0


def test_a_merchant_rerun_does_not_count_as_the_day_aggregated(redis_client, pg_conn, table):
    track_usage(redis_client, "acme", "queries", 1, usage_date="2025-11-01", ttl=dt.timedelta(hours=1))
    track_usage(redis_client, "globex", "queries", 1, usage_date="2025-11-01", ttl=dt.timedelta(hours=1))
    aggregate_day(redis_client, pg_conn, "2025-11-01", table=table, merchant_id="acme")
    assert [d.usage_date for d in check_expiry(redis_client, pg_conn, table=table, today=TODAY).at_risk] == [
        "2025-11-01"
    ]


def test_without_the_schema_every_day_is_unaggregated(redis_client, pg_conn, table):
    track_usage(redis_client, "acme", "queries", 1, usage_date="2025-11-06")
    report = check_expiry(redis_client, pg_conn, table=table, today=TODAY)
    assert report.lag_days == 2 and report.at_risk == []


def test_a_counter_is_safe_only_once_its_current_value_is_stored(redis_client, pg_conn, table):
    """Whatever earlier runs did: a key written after the last whole-day run, or grown since, is at risk."""
    hour = dt.timedelta(hours=1)
    track_usage(redis_client, "acme", "queries", 5, usage_date="2025-11-01", ttl=hour)
    aggregate_day(redis_client, pg_conn, "2025-11-01", table=table)  # a successful whole-day run
    assert check_expiry(redis_client, pg_conn, table=table, today=TODAY).at_risk == []

    track_usage(redis_client, "late", "queries", 2, usage_date="2025-11-01", ttl=hour)  # written after it
    track_usage(redis_client, "acme", "queries", 1, usage_date="2025-11-01", ttl=hour)  # grown since
    report = check_expiry(redis_client, pg_conn, table=table, today=TODAY)
    [day] = report.at_risk
    assert (day.usage_date, day.aggregated, day.expiring_keys, day.unsaved_keys) == ("2025-11-01", True, 2, 2)
    assert sorted(s["key"] for s in day.unsaved_samples) == [
        "usage:acme:2025-11-01:queries", "usage:late:2025-11-01:queries",
    ]  # fmt: skip


def test_the_check_rescues_a_day_whose_expiring_counters_are_not_stored(redis_client, pg_conn, table, query):
    hour = dt.timedelta(hours=1)
    track_usage(redis_client, "acme", "queries", 5, usage_date="2025-11-01", ttl=hour)
    track_usage(redis_client, "globex", "queries", 3, usage_date="2025-11-01")  # not expiring: read with its day
    rescued = []

    def rescue(day):
        rescued.append(day)
        aggregate_day(redis_client, pg_conn, day, table=table)

    report = check_expiry(redis_client, pg_conn, table=table, today=TODAY, rescue=rescue)
    assert rescued == [dt.date(2025, 11, 1)]
    assert report.at_risk == [] and [d.usage_date for d in report.rescued] == ["2025-11-01"]
    assert dict(query(f"SELECT merchant_id, quantity FROM {table}")) == {"acme": 5, "globex": 3}
    again = check_expiry(redis_client, pg_conn, table=table, today=TODAY, rescue=rescue)
    assert rescued == [dt.date(2025, 11, 1)] and again.rescued == []  # nothing left to save


def test_a_failed_rescue_leaves_the_day_at_risk(redis_client, pg_conn, table):
    track_usage(redis_client, "acme", "queries", 5, usage_date="2025-11-01", ttl=dt.timedelta(hours=1))

    def rescue(day):
        raise ConnectionError("PostgreSQL went away")

    report = check_expiry(redis_client, pg_conn, table=table, today=TODAY, rescue=rescue)
    assert [(d.usage_date, d.rescued, d.unsaved_keys) for d in report.at_risk] == [("2025-11-01", True, 1)]


def test_an_expiring_bad_key_is_safe_while_its_dead_letter_holds_its_value(redis_client, pg_conn, table):
    redis_client.set("usage:acme:2025-11-01:queries", "oops", ex=3600)
    assert [d.unsaved_keys for d in check_expiry(redis_client, pg_conn, table=table, today=TODAY).days] == [1]
    aggregate_day(redis_client, pg_conn, "2025-11-01", table=table)  # dead-lettered with its value
    assert check_expiry(redis_client, pg_conn, table=table, today=TODAY).at_risk == []
    redis_client.set("usage:acme:2025-11-01:queries", "worse", ex=3600)  # a new value, not recorded
    assert [d.unsaved_keys for d in check_expiry(redis_client, pg_conn, table=table, today=TODAY).days] == [1]


def test_a_reset_row_is_safe_when_quantity_is_offset_plus_redis(redis_client, pg_conn, table):
    track_usage(redis_client, "acme", "queries", 100, usage_date="2025-11-01", ttl=dt.timedelta(hours=1))
    aggregate_day(redis_client, pg_conn, "2025-11-01", table=table)
    redis_client.set("usage:acme:2025-11-01:queries", 30, keepttl=True)
    assert check_expiry(redis_client, pg_conn, table=table, today=TODAY).at_risk != []
    aggregate_day(redis_client, pg_conn, "2025-11-01", table=table)  # 100 kept: offset 70 + Redis 30
    assert check_expiry(redis_client, pg_conn, table=table, today=TODAY).at_risk == []
