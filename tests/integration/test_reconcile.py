"""Reconciliation (``usage-agg status``) and health, on the real services."""

from __future__ import annotations

import pytest

from tests.redis_servers import LocalRedisServer
from usage_agg.aggregate import aggregate_day
from usage_agg.health import HealthReport, check_redis
from usage_agg.keys import build_key
from usage_agg.reconcile import reconcile_date
from usage_agg.tracking import track_usage

DAY = "2025-11-01"


def test_a_reset_row_is_in_sync_when_quantity_is_offset_plus_redis(redis_client, pg_conn, table):
    track_usage(redis_client, "acme", "queries", 100, usage_date=DAY)
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    redis_client.set(build_key("acme", DAY, "queries"), 30)  # a reset, not yet aggregated
    status = reconcile_date(redis_client, pg_conn, DAY, table=table)
    assert not status.in_sync
    assert status.differences == [
        {"merchant_id": "acme", "metric_type": "queries", "redis": 30, "stored": 100, "offset": 0}
    ]
    aggregate_day(redis_client, pg_conn, DAY, table=table)  # quantity 100 = offset 70 + Redis 30
    status = reconcile_date(redis_client, pg_conn, DAY, table=table)
    assert status.in_sync and status.differing_rows == 0
    assert status.redis_totals == {"queries": 30} and status.table_totals == {"queries": 100}


@pytest.mark.parametrize("merchant", ["a_b", "a%b", "a\\b", "x"])
def test_a_merchants_dead_letters_are_that_merchants_alone(redis_client, pg_conn, table, merchant):
    """LIKE patterns would match ``aXb`` for ``a_b``, ``a%b``'s neighbours, and ``x:2025-11-01:y`` for ``x``."""
    lookalikes = {"a_b": ["aXb", "a_bc"], "a%b": ["a%%b", "aZZb"], "a\\b": ["a\\\\b", "ab"], "x": ["x:2025-11-01:y", "xy"]}
    for other in [merchant, *lookalikes[merchant]]:
        redis_client.set(build_key(other, DAY, "q"), "oops")
    aggregate_day(redis_client, pg_conn, DAY, table=table, discovery="scan")
    status = reconcile_date(redis_client, pg_conn, DAY, table=table, merchant_id=merchant)
    assert status.open_dead_letters == 1
    assert [d["key"] for d in status.dead_letters] == [build_key(merchant, DAY, "q")]
    assert not status.in_sync


def test_only_a_never_aggregated_key_or_only_an_open_dead_letter_is_out_of_sync(redis_client, pg_conn, table, query):
    track_usage(redis_client, "acme", "queries", 1, usage_date=DAY)
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert reconcile_date(redis_client, pg_conn, DAY, table=table).in_sync
    track_usage(redis_client, "newcomer", "queries", 1, usage_date=DAY)
    status = reconcile_date(redis_client, pg_conn, DAY, table=table)
    assert (status.in_sync, status.keys_not_in_table, status.differing_rows) == (False, 1, 0)
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert reconcile_date(redis_client, pg_conn, DAY, table=table).in_sync

    redis_client.set(build_key("broken", DAY, "q"), "oops")
    aggregate_day(redis_client, pg_conn, DAY, table=table, discovery="scan")
    redis_client.delete(build_key("broken", DAY, "q"))  # gone from Redis, its dead letter still open
    status = reconcile_date(redis_client, pg_conn, DAY, table=table)
    assert (status.in_sync, status.open_dead_letters, status.redis_bad_keys, status.keys_not_in_table) == (False, 1, 0, 0)


POLICIES = {
    "noeviction": True,
    "volatile-lru": False, "volatile-lfu": False, "volatile-random": False, "volatile-ttl": False,
    "allkeys-lru": False, "allkeys-lfu": False, "allkeys-random": False,
}  # fmt: skip


def test_health_flags_every_policy_that_evicts_usage_keys(tmp_path):
    server = LocalRedisServer(tmp_path, "--appendonly", "yes").start()
    try:
        client = server.client()
        for policy, safe in POLICIES.items():
            client.config_set("maxmemory-policy", policy)
            report = HealthReport()
            check_redis(client, report)
            checks = {c.name: c for c in report.checks}
            assert checks["redis maxmemory-policy"].ok is safe, policy
            assert policy in checks["redis maxmemory-policy"].detail
            assert checks["redis persistence"].ok
    finally:
        server.stop()


def test_health_flags_evictions_and_missing_persistence(tmp_path):
    server = LocalRedisServer(tmp_path, "--maxmemory-policy", "allkeys-lru").start()
    try:
        client = server.client()
        client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 64 * 1024)
        for i in range(500):
            client.set(f"filler:{i}", b"x" * 1024)
        report = HealthReport()
        check_redis(client, report)
        checks = {c.name: c for c in report.checks}
        assert not checks["redis evicted_keys"].ok and "evicted since the server started" in checks["redis evicted_keys"].detail
        assert not checks["redis persistence"].ok and not report.healthy
    finally:
        server.stop()
