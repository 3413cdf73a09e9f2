"""What one date's aggregation reports, exactly: its result, its log lines, its audit row, its refusals.

Real Redis and PostgreSQL; the log is the operator's task log, so its wording is checked too.
"""

from __future__ import annotations

import datetime as dt
import logging

import pytest
import redis

from usage_agg.aggregate import BAD_KEY_LOG_LIMIT, aggregate_day
from usage_agg.keys import build_key
from usage_agg.tracking import track_usage

DAY = "2025-11-01"
AUDIT = {"dag_id": "d", "run_id": "r", "task_id": "t"}


def _unreachable_redis() -> redis.Redis:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))


@pytest.fixture
def log_lines(caplog):
    caplog.set_level(logging.DEBUG, logger="usage_agg")

    def lines() -> list[tuple[str, str]]:
        return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "usage_agg.aggregate"]

    return lines


def test_a_day_with_a_bad_key_and_a_reset(redis_client, pg_conn, table, pg_schema, query, log_lines):
    track_usage(redis_client, "acme", "queries", 100, usage_date=DAY)
    track_usage(redis_client, "acme", "api", 5, usage_date=DAY)
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    redis_client.set(build_key("acme", DAY, "queries"), 60)  # a drop: what was counted is kept
    redis_client.set(build_key("broken", DAY, "q"), "oops")
    redis_client.sadd(f"usage-index:{DAY}", build_key("broken", DAY, "q"))
    before = len(log_lines())

    result = aggregate_day(redis_client, pg_conn, DAY, table=table, audit=AUDIT).to_dict()

    assert 0 <= result.pop("duration_seconds") < 60
    reset = {"merchant_id": "acme", "metric_type": "queries", "reset": "drop", "stored": 100, "last_read": 100,
             "redis": 60, "quantity": 100}  # fmt: skip
    assert result == {
        "usage_date": DAY, "merchant_id": None, "table": table, "keys_found": 3, "rows_written": 1,
        "rows_unchanged": 1, "decreases_refused": 1, "resets": 1, "bad_keys": 1, "new_bad_keys": 1,
        "vanished_keys": 0, "allow_decrease": False, "unannounced_writes": False, "discovery": "index",
        "redis_partition": None,
        "bad_key_samples": [{"key": "usage:broken:2025-11-01:q", "reason": "value is not a non-negative integer",
                             "value": "oops"}],
        "reset_samples": [reset],
        "hourly_rows_written": 0, "hourly_rows_unchanged": 0, "hourly_resets": 0, "bad_hourly": 0,
        "hourly_mismatches": 0, "hourly_mismatch_samples": [],
    }  # fmt: skip
    lines = log_lines()[before:]
    keys = [line for line in lines if line[1].startswith("Key ")]  # in the order Redis returns them
    assert sorted(keys) == [("DEBUG", "Key acme:api = 5"), ("DEBUG", "Key acme:queries = 60")]
    assert [line for line in lines if line not in keys] == [
        ("INFO", "Starting aggregation for date: 2025-11-01"),
        ("WARNING", "Bad key 'usage:broken:2025-11-01:q': value is not a non-negative integer (value 'oops')"),
        ("INFO", "Found 3 usage keys to process"),
        ("DEBUG", "Keys found through the day's index"),
        ("WARNING", "Redis lost data: 1 counter(s) of 2025-11-01 were reset (restart, failover, snapshot restore or "
                    "eviction). What was counted before is kept and only growth since is added; rerun with "
                    f"allow_decrease only if Redis holds the true totals. First ones: {[reset]}"),
        ("INFO", "Completed. Records aggregated: 2, Errors: 1 (rows written: 1, unchanged: 1, resets: 1; "
                 "hourly rows written: 0)"),
    ]  # fmt: skip
    audit = query(
        f"SELECT dag_id, run_id, task_id, usage_table, usage_date, merchant_id, keys_found, rows_written,"
        f" rows_unchanged, decreases_refused, resets, bad_keys, new_bad_keys, outcome, error, redis_partition,"
        f" partition_count, started_at <= finished_at FROM {pg_schema}.usage_aggregation_runs ORDER BY id"
    )
    assert audit[-1] == ("d", "r", "t", table, dt.date(2025, 11, 1), None, 3, 1, 1, 1, 1, 1, 1, "new_bad_keys", None,
                         None, None, True)  # fmt: skip

    again = aggregate_day(redis_client, pg_conn, DAY, table=table, audit=AUDIT)
    assert (again.new_bad_keys, again.bad_keys, again.resets, again.rows_unchanged) == (0, 1, 0, 2)
    assert query(f"SELECT outcome FROM {pg_schema}.usage_aggregation_runs ORDER BY id")[-1] == ("known_bad_keys",)


def test_a_plain_day_logs_each_key_at_debug(redis_client, pg_conn, table, log_lines):
    track_usage(redis_client, "acme", "queries", 100, usage_date=DAY)
    track_usage(redis_client, "acme", "api", 5, usage_date=DAY)
    aggregate_day(redis_client, pg_conn, DAY, table=table)  # the bulk path: plain rows
    assert sorted(line for line in log_lines() if line[1].startswith("Key ")) == [
        ("DEBUG", "Key acme:api = 5"), ("DEBUG", "Key acme:queries = 100"),
    ]  # fmt: skip


def test_the_scope_of_a_merchant_and_of_a_part_is_in_the_log(redis_client, pg_conn, table, log_lines):
    track_usage(redis_client, "acme", "queries", 1, usage_date=DAY)
    aggregate_day(redis_client, pg_conn, DAY, table=table, merchant_id="acme")
    host, port = redis_client.connection_pool.connection_kwargs["host"], redis_client.connection_pool.connection_kwargs["port"]
    part = aggregate_day(redis_client, pg_conn, DAY, table=table, partition=f"{host}:{port}", partition_count=1)
    assert part.redis_partition == f"{host}:{port}"
    starts = [m for level, m in log_lines() if m.startswith("Starting")]
    assert starts == [
        "Starting aggregation for date: 2025-11-01 for merchant 'acme'",
        f"Starting aggregation for date: 2025-11-01 on Redis primary {host}:{port} (part of 1)",
    ]
    assert ("DEBUG", "Keys found through SCAN") in log_lines()  # a merchant rerun scans


def test_an_empty_day_says_so_and_keeps_its_rows(redis_client, pg_conn, table, log_lines):
    result = aggregate_day(redis_client, pg_conn, DAY, table=table, merchant_id="gone")
    assert (result.keys_found, result.rows_written) == (0, 0)
    assert (
        "WARNING",
        "No usage keys in Redis for 2025-11-01 for merchant 'gone' (expired or never tracked); "
        "stored rows are left as they are",
    ) in log_lines()
    assert log_lines()[-1] == ("INFO", "Completed. Records aggregated: 0, Errors: 0 (rows written: 0, unchanged: 0, resets: 0; hourly rows written: 0)")


def test_past_the_log_limit_bad_keys_are_counted_not_named(redis_client, pg_conn, table, pg_schema, log_lines):
    extra = 3
    for i in range(BAD_KEY_LOG_LIMIT + extra):
        redis_client.set(build_key(f"bad{i:03}", DAY, "q"), "x")
    result = aggregate_day(redis_client, pg_conn, DAY, table=table, discovery="scan")
    assert (result.bad_keys, result.new_bad_keys, len(result.bad_key_samples)) == (BAD_KEY_LOG_LIMIT + extra,) * 2 + (
        BAD_KEY_LOG_LIMIT,
    )
    named = [m for level, m in log_lines() if m.startswith("Bad key ")]
    assert len(named) == BAD_KEY_LOG_LIMIT
    assert ("WARNING", f"{extra} more bad keys not listed here; all are in {pg_schema}.usage_aggregation_errors") in log_lines()


def test_exactly_the_log_limit_needs_no_more_line(redis_client, pg_conn, table, log_lines):
    for i in range(BAD_KEY_LOG_LIMIT):
        redis_client.set(build_key(f"bad{i:03}", DAY, "q"), "x")
    result = aggregate_day(redis_client, pg_conn, DAY, table=table, discovery="scan")
    assert len(result.bad_key_samples) == result.bad_keys == BAD_KEY_LOG_LIMIT
    assert not any("more bad keys" in m for level, m in log_lines())


def test_a_bad_value_that_is_not_utf8_is_shown_escaped(redis_client, pg_conn, table):
    redis_client.set(build_key("bin", DAY, "q"), b"\xff1")
    result = aggregate_day(redis_client, pg_conn, DAY, table=table, discovery="scan")
    assert result.bad_key_samples == [
        {"key": "usage:bin:2025-11-01:q", "reason": "value is not a non-negative integer", "value": "\\xff1"}
    ]


def test_a_run_that_cannot_reach_redis_is_audited_as_failed(redis_client, pg_conn, table, pg_schema, query, log_lines):
    aggregate_day(redis_client, pg_conn, DAY, table=table)  # the schema exists
    unreachable = _unreachable_redis()
    with pytest.raises(redis.ConnectionError):
        aggregate_day(unreachable, pg_conn, DAY, table=table, discovery="scan", audit=AUDIT)
    (row,) = query(
        f"SELECT dag_id, outcome, keys_found, rows_written, error FROM {pg_schema}.usage_aggregation_runs"
        " WHERE outcome = 'failed'"
    )
    assert row[:4] == ("d", "failed", 0, 0)
    assert row[4].startswith("ConnectionError: ")
    assert row[4].endswith("(rolled back after reading 0 keys and merging 0 rows; nothing of this run was committed)")
    level, message = [line for line in log_lines() if line[0] == "ERROR"][-1]
    assert message.startswith("Aggregation of 2025-11-01 failed: ")


def test_a_failed_run_that_cannot_be_audited_says_so_and_raises_the_first_error(
    redis_client, pg_conn, table, pg_schema, query, log_lines
):
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    query(f"DROP TABLE {pg_schema}.usage_aggregation_runs; SELECT 1")  # nowhere to write the audit row
    unreachable = _unreachable_redis()
    with pytest.raises(redis.ConnectionError):
        aggregate_day(unreachable, pg_conn, DAY, table=table, discovery="scan", create_schema=False)
    assert any(
        level == "WARNING"
        and m.startswith(f"Could not record the failed run in {pg_schema}.usage_aggregation_runs: ")
        and f'relation "{pg_schema}.usage_aggregation_runs" does not exist' in m
        and m.endswith("(SQLSTATE 42P01)")
        for level, m in log_lines()
    )


class FailingRead:
    """The real client, whose first MGET fails with a very long message."""

    def __init__(self, client):
        self.client = client

    def __getattr__(self, name):
        return getattr(self.client, name)

    def mget(self, keys):
        raise redis.ConnectionError("x" * 3000)


def test_a_failed_runs_error_is_kept_to_2000_characters(redis_client, pg_conn, table, pg_schema, query):
    track_usage(redis_client, "acme", "queries", 1, usage_date=DAY)
    with pytest.raises(redis.ConnectionError):
        aggregate_day(FailingRead(redis_client), pg_conn, DAY, table=table, discovery="scan")
    ((error,),) = query(f"SELECT error FROM {pg_schema}.usage_aggregation_runs WHERE outcome = 'failed'")
    assert error == ("ConnectionError: " + "x" * 3000)[:2000]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"merchant_id": ""}, "merchant_id: must be a non-empty string or None, got ''"),
        ({"merchant_id": 7}, "merchant_id: must be a non-empty string or None, got 7"),
        ({"partition": "h:1"}, "redis_partition and partition_count: give both (a positive count) or neither, got 'h:1' and None"),
        ({"partition_count": 2}, "redis_partition and partition_count: give both (a positive count) or neither, got None and 2"),
        ({"partition": "h:1", "partition_count": 0}, "redis_partition and partition_count: give both (a positive count) or neither, got 'h:1' and 0"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_touched(redis_client, pg_conn, table, query, kwargs, message):
    with pytest.raises(ValueError) as caught:
        aggregate_day(redis_client, pg_conn, DAY, table=table, **kwargs)
    assert str(caught.value) == message
    assert query("SELECT to_regclass(%s)", (table,)) == [(None,)]
