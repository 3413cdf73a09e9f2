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
