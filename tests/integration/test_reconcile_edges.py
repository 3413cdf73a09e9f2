"""Edges of ``usage-agg status``: the default table, a partly missing schema, batches, TTL bounds, odd ids."""

from __future__ import annotations

import pytest

from usage_agg.aggregate import aggregate_day
from usage_agg.keys import build_key
from usage_agg.reconcile import EXPIRY_WARNING, SchemaMissing, reconcile_date
from usage_agg.tracking import track_usage

DAY = "2025-11-01"


def test_the_default_table_is_merchant_usage_where_search_path_puts_it(redis_client, pg_conn, pg_schema, query):
    with pg_conn.cursor() as cur:
        cur.execute(f'CREATE SCHEMA "{pg_schema}"')
        cur.execute(f'SET search_path TO "{pg_schema}"')
    pg_conn.commit()
    track_usage(redis_client, "acme", "queries", 3, usage_date=DAY)
    aggregate_day(redis_client, pg_conn, DAY)
    status = reconcile_date(redis_client, pg_conn, DAY)
    assert (status.table, status.schema_exists, status.table_rows, status.in_sync) == (
        f"{pg_schema}.merchant_usage", True, 1, True,
    )  # fmt: skip


@pytest.mark.parametrize("dropped", ["merchant_usage CASCADE", "usage_aggregation_errors", "usage_aggregation_runs"])
def test_any_missing_table_of_the_three_means_no_schema(redis_client, pg_conn, table, pg_schema, query, dropped):
    track_usage(redis_client, "acme", "queries", 3, usage_date=DAY)
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    query(f"DROP TABLE {pg_schema}.{dropped}; SELECT 1")
    status = reconcile_date(redis_client, pg_conn, DAY, table=table)
    assert (status.schema_exists, status.in_sync, status.redis_keys) == (False, False, 1)


class NoRedis:
    """A Redis client that must not be used."""

    def __getattr__(self, name):
        raise AssertionError(f"Redis was used ({name}) although the date could not be checked")


@pytest.mark.parametrize("dropped", ["merchant_usage CASCADE", "usage_aggregation_errors", "merchant_usage_hourly"])
def test_a_missing_table_with_require_schema_stops_before_redis(
    redis_client, pg_conn, table, pg_schema, query, dropped
):
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    query(f"DROP TABLE {pg_schema}.{dropped}; SELECT 1")
    missing = "it" if dropped.startswith("merchant_usage ") else f"{pg_schema}.{dropped} beside it"
    with pytest.raises(SchemaMissing) as raised:
        reconcile_date(NoRedis(), pg_conn, DAY, table=table, require_schema=True)
    assert str(raised.value).startswith(f"table {table} could not be checked: {missing} does not exist (")
    with pytest.raises(SchemaMissing) as raised:
        reconcile_date(NoRedis(), pg_conn, DAY, table="no_such_schema.merchant_usage", require_schema=True)
    assert str(raised.value).startswith("table no_such_schema.merchant_usage could not be checked: it does not exist")


class CountingReads:
    """The real client, counting the MGETs (one per batch)."""

    def __init__(self, client):
        self.client, self.mgets = client, 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    def mget(self, keys):
        self.mgets += 1
        return self.client.mget(keys)


def test_redis_is_read_in_batches_of_the_size_asked(redis_client, pg_conn, table):
    for i in range(5):
        track_usage(redis_client, f"m{i}", "q", 1, usage_date=DAY)
    counting = CountingReads(redis_client)
    assert reconcile_date(counting, pg_conn, DAY, table=table, batch_size=2).redis_keys == 5
    assert counting.mgets == 3


class FixedTTLs:
    """The real client, whose TTL answers are the given ones (the bounds, without racing a clock)."""

    def __init__(self, client, ttls):
        self.client, self.ttls = client, ttls

    def __getattr__(self, name):
        return getattr(self.client, name)

    def pipeline(self, transaction=True):
        outer = self

        class Pipe:
            keys: list = []

            def ttl(self, key):
                self.keys = [*self.keys, key]

            def execute(self):
                return [outer.ttls[key] for key in self.keys]

        return Pipe()


def test_expiring_means_a_ttl_from_zero_to_just_under_a_day(redis_client, pg_conn, table):
    day_seconds = int(EXPIRY_WARNING.total_seconds())
    ttls = {"zero": 0, "one": 1, "under": day_seconds - 1, "day": day_seconds, "forever": -1, "gone": -2}
    for merchant in ttls:
        redis_client.set(build_key(merchant, DAY, "q"), 1)
    client = FixedTTLs(redis_client, {build_key(m, DAY, "q"): ttl for m, ttl in ttls.items()})
    status = reconcile_date(client, pg_conn, DAY, table=table)
    assert status.keys_not_in_table == 6
    assert sorted((e["key"], e["ttl_seconds"]) for e in status.expiring_keys) == sorted(
        (build_key(m, DAY, "q"), ttls[m]) for m in ("zero", "one", "under")
    )
    assert status.expiring_unaggregated == 3


def test_ttls_are_read_without_a_transaction_so_a_cluster_can_answer(cluster_client, pg_conn, table):
    for i in range(6):  # keys in several slots, on several primaries
        cluster_client.set(build_key(f"merchant-{i}", DAY, "q"), 1, ex=60)
    status = reconcile_date(cluster_client, pg_conn, DAY, table=table)
    assert (status.keys_not_in_table, status.expiring_unaggregated) == (6, 6)
