"""Every field of ``usage-agg status``'s report, on the real services, for a day and for one merchant."""

from __future__ import annotations

import datetime as dt

from usage_agg.aggregate import aggregate_day
from usage_agg.keys import build_key, hourly_key
from usage_agg.reconcile import SAMPLE_LIMIT, reconcile_date
from usage_agg.tracking import track_usage

DAY = "2025-11-01"
HOUR = 3600


def _seed(redis_client, pg_conn, table):
    track_usage(redis_client, "acme", "queries", 100, usage_date=DAY)
    track_usage(redis_client, "acme", "api", 5, usage_date=DAY)
    track_usage(redis_client, "acme", "api", 3, usage_date="2025-11-02")  # another day: never counted
    redis_client.set(build_key("broken", DAY, "q"), "oops")
    aggregate_day(
        redis_client, pg_conn, DAY, table=table, discovery="scan", audit={"dag_id": "d", "run_id": "r1", "task_id": "t"}
    )
    aggregate_day(
        redis_client, pg_conn, DAY, table=table, merchant_id="acme",
        audit={"dag_id": "m", "run_id": "r2", "task_id": "t"},
    )  # fmt: skip
    redis_client.incrby(build_key("acme", DAY, "queries"), 20)  # grown since: redis 120, stored 100
    redis_client.set(build_key("beta", DAY, "queries"), 7, ex=HOUR)  # never aggregated, expiring
    redis_client.set(build_key("gamma", DAY, "q"), 9, ex=3 * 24 * HOUR)  # never aggregated, not expiring yet
    redis_client.set(build_key("delta", DAY, "q"), 4)  # never aggregated, no expiry at all


def test_the_whole_day_report(redis_client, pg_conn, table):
    _seed(redis_client, pg_conn, table)
    status = reconcile_date(redis_client, pg_conn, DAY, table=table)
    report = status.to_dict()
    last_run = report.pop("last_successful_run")
    assert {k: last_run[k] for k in ("dag_id", "run_id", "task_id", "merchant_id")} == {
        "dag_id": "d", "run_id": "r1", "task_id": "t", "merchant_id": None,
    }  # fmt: skip  (the merchant rerun is later, but it does not cover the whole day)
    dt.datetime.fromisoformat(last_run["finished_at"])
    letters = report.pop("dead_letters")
    assert [{k: d[k] for k in ("key", "reason", "times_seen")} for d in letters] == [
        {"key": build_key("broken", DAY, "q"), "reason": "value is not a non-negative integer", "times_seen": 1}
    ]
    dt.datetime.fromisoformat(letters[0]["last_seen"])
    assert report.pop("expiring_keys")[0]["ttl_seconds"] in range(HOUR - 60, HOUR + 1)
    missing = [build_key("beta", DAY, "queries"), build_key("gamma", DAY, "q"), build_key("delta", DAY, "q")]
    assert sorted(report.pop("missing_keys")) == sorted(missing)
    assert report == {
        "usage_date": DAY,
        "merchant_id": None,
        "table": table,
        "schema_exists": True,
        "redis_keys": 6,
        "redis_bad_keys": 1,
        "redis_bad_hours": 0,
        "table_rows": 2,
        "redis_totals": {"api": 5, "q": 13, "queries": 127},
        "table_totals": {"api": 5, "queries": 100},
        "differing_rows": 1,
        "differences": [{"merchant_id": "acme", "metric_type": "queries", "redis": 120, "stored": 100, "offset": 0}],
        "keys_not_in_table": 3,
        "expiring_unaggregated": 1,
        "open_dead_letters": 1,
        "hourly_mismatches": 0,
        "hourly_mismatch_samples": [],
        "stored_hourly_mismatches": 0,
        "stored_hourly_mismatch_samples": [],
        "hourly_differing_rows": 0,
        "hours": [],
        "in_sync": False,
    }
    assert status.expiring_keys[0]["key"] == build_key("beta", DAY, "queries")


def test_one_merchants_report_counts_that_merchant_alone(redis_client, pg_conn, table):
    _seed(redis_client, pg_conn, table)
    status = reconcile_date(redis_client, pg_conn, DAY, table=table, merchant_id="acme")
    assert (status.merchant_id, status.redis_keys, status.redis_bad_keys, status.table_rows) == ("acme", 2, 0, 2)
    assert (status.redis_totals, status.table_totals) == ({"api": 5, "queries": 120}, {"api": 5, "queries": 100})
    assert (status.keys_not_in_table, status.missing_keys, status.open_dead_letters, status.dead_letters) == (0, [], 0, [])
    assert status.last_successful_run["run_id"] == "r2"  # its own rerun counts for it
    assert status.differing_rows == 1 and not status.in_sync
    redis_client.set(build_key("acme", DAY, "queries"), 100)
    assert reconcile_date(redis_client, pg_conn, DAY, table=table, merchant_id="acme").in_sync
    beta = reconcile_date(redis_client, pg_conn, DAY, table=table, merchant_id="beta")
    assert (beta.redis_keys, beta.keys_not_in_table, beta.table_rows, beta.table_totals) == (1, 1, 0, {})
    assert beta.last_successful_run["run_id"] == "r1"  # the whole-day run covers every merchant


def test_a_missing_schema_is_reported_not_raised(redis_client, pg_conn, table):
    track_usage(redis_client, "acme", "queries", 1, usage_date=DAY)
    status = reconcile_date(redis_client, pg_conn, DAY, table=table)
    assert (status.schema_exists, status.redis_keys, status.keys_not_in_table, status.table_rows) == (False, 1, 1, 0)
    assert status.last_successful_run is None and not status.in_sync


def test_samples_stop_at_the_limit_across_batches_while_the_counts_go_on(redis_client, pg_conn, table):
    many = SAMPLE_LIMIT + 7
    for i in range(many):
        redis_client.set(build_key(f"m{i:03}", DAY, "q"), 1)
        redis_client.set(build_key(f"bad{i:03}", DAY, "q"), "x")
    aggregate_day(redis_client, pg_conn, DAY, table=table, discovery="scan")
    for i in range(many):  # after the run: every row grew, and new keys arrived
        redis_client.set(build_key(f"m{i:03}", DAY, "q"), 2)
        redis_client.set(build_key(f"new{i:03}", DAY, "q"), 1, ex=HOUR)
    status = reconcile_date(redis_client, pg_conn, DAY, table=table, batch_size=10)
    assert (status.differing_rows, len(status.differences)) == (many, SAMPLE_LIMIT)
    assert (status.keys_not_in_table, len(status.missing_keys)) == (many, SAMPLE_LIMIT)
    assert (status.expiring_unaggregated, len(status.expiring_keys)) == (many, SAMPLE_LIMIT)
    assert (status.open_dead_letters, len(status.dead_letters)) == (many, SAMPLE_LIMIT)
    assert status.redis_bad_keys == many and status.redis_keys == 3 * many
    assert [d["key"] for d in status.dead_letters] == sorted(d["key"] for d in status.dead_letters)
    assert status.dead_letters[0]["key"] == build_key("bad000", DAY, "q")
    assert status.redis_totals == {"q": 3 * many} and status.table_totals == {"q": many}


def test_stored_days_and_their_hours_are_compared_in_postgresql_alone(redis_client, pg_conn, table, query):
    at = dt.datetime(2025, 11, 1, 3, 20, tzinfo=dt.UTC)
    track_usage(redis_client, "acme", "queries", 5, at=at)
    track_usage(redis_client, "acme", "queries", 2, at=at.replace(hour=17))
    track_usage(redis_client, "a_b", "api", 3, at=at)
    track_usage(redis_client, "aXb", "api", 3, at=at)  # in agreement: its hours sum to its day
    track_usage(redis_client, "daily-only", "q", 4, usage_date=DAY)  # no hours at all: nothing to compare
    track_usage(redis_client, "acme", "queries", 6, at=at + dt.timedelta(days=1))  # the next day: never counted
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    aggregate_day(redis_client, pg_conn, "2025-11-02", table=table)
    # an allow_decrease rerun after the hours expired: the day falls to 3, its stored hours stay 5 + 2
    redis_client.set(build_key("acme", DAY, "queries"), 3)
    redis_client.delete(hourly_key("acme", DAY, "queries"))
    aggregate_day(redis_client, pg_conn, DAY, table=table, merchant_id="acme", allow_decrease=True)
    # a writer breaking the protocol: one hour written straight into the table
    query(f"UPDATE {table}_hourly SET quantity = quantity + 4 WHERE merchant_id = 'a_b' RETURNING 1")
    redis_client.flushdb()  # every key expired: PostgreSQL alone says it

    status = reconcile_date(redis_client, pg_conn, DAY, table=table)
    assert (status.redis_keys, status.table_rows) == (0, 4)
    assert status.stored_hourly_mismatches == 2
    assert status.stored_hourly_mismatch_samples == [
        {"merchant_id": "a_b", "metric_type": "api", "daily": 3, "hourly_sum": 7},
        {"merchant_id": "acme", "metric_type": "queries", "daily": 3, "hourly_sum": 7},
    ]
    assert status.in_sync  # reported, like the hourly mismatches Redis shows: not a sync failure
    acme = reconcile_date(redis_client, pg_conn, DAY, table=table, merchant_id="acme")
    assert (acme.stored_hourly_mismatches, acme.stored_hourly_mismatch_samples) == (
        1, [{"merchant_id": "acme", "metric_type": "queries", "daily": 3, "hourly_sum": 7}],
    )  # fmt: skip
    assert reconcile_date(redis_client, pg_conn, "2025-11-02", table=table).stored_hourly_mismatches == 0

    query(f"DELETE FROM {table} WHERE merchant_id = 'a_b' RETURNING 1")  # hours with no day at all
    status = reconcile_date(redis_client, pg_conn, DAY, table=table, merchant_id="a_b")
    assert status.stored_hourly_mismatch_samples == [
        {"merchant_id": "a_b", "metric_type": "api", "daily": None, "hourly_sum": 7}
    ]


def test_stored_days_against_their_hours_are_counted_past_the_names(redis_client, pg_conn, table, query):
    at = dt.datetime(2025, 11, 1, 23, 59, tzinfo=dt.UTC)
    many = SAMPLE_LIMIT + 3
    for i in range(many):
        track_usage(redis_client, f"m{i:03}", "q", 2, at=at)
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    query(f"UPDATE {table} SET quantity = 1 RETURNING 1")
    status = reconcile_date(redis_client, pg_conn, DAY, table=table)
    assert (status.stored_hourly_mismatches, len(status.stored_hourly_mismatch_samples)) == (many, SAMPLE_LIMIT)
    assert status.stored_hourly_mismatch_samples[0] == {"merchant_id": "m000", "metric_type": "q", "daily": 1,
                                                        "hourly_sum": 2}  # fmt: skip
