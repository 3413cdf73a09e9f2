"""Redis Cluster: a real three-primary cluster gives the same rows as a single node.

Keys of one day hash to slots on every primary; the aggregation must scan each
primary, read values per slot (no CROSSSLOT error) and find the day's index, which
lives in yet another slot.
"""

from __future__ import annotations

import datetime as dt

import pytest
import redis
from redis.cluster import RedisCluster

from tests.redis_servers import UPTIME_RESOLUTION
from usage_agg.aggregate import aggregate_day
from usage_agg.expiry import check_expiry
from usage_agg.keys import build_key
from usage_agg.partitions import redis_partitions
from usage_agg.reconcile import reconcile_date
from usage_agg.tracking import track_usage

DAY = dt.date(2025, 11, 1)
MERCHANTS = [f"merchant_{n:03d}" for n in range(150)] + ["a*", "x:y", "[ab]", "{tag}"]


def seed(client, *, bad_keys: bool = True) -> None:
    """The same usage in any client: three days held, a key from another writer, bad keys."""
    for day in (DAY - dt.timedelta(days=1), DAY, DAY + dt.timedelta(days=1)):
        for n, merchant in enumerate(MERCHANTS):
            track_usage(client, merchant, "api_calls", n + day.day, usage_date=day)
            if n % 3 == 0:
                track_usage(client, merchant, "storage_mb", 7 * n, usage_date=day)
    client.incrby(build_key("other_writer", DAY, "api_calls"), 11)  # not in the day's index
    if bad_keys:
        client.set(build_key("broken", DAY, "api_calls"), b"12abc")
        client.hset(build_key("hashed", DAY, "api_calls"), "n", 1)


def rows(query, table) -> dict:
    return {(m, t): q for m, t, q in query(f"SELECT merchant_id, metric_type, quantity FROM {table}")}


def test_the_days_keys_spread_over_every_primary(cluster_client):
    seed(cluster_client)
    sizes = cluster_client.dbsize(target_nodes=RedisCluster.PRIMARIES)
    per_node = sizes.values() if isinstance(sizes, dict) else [sizes]
    assert len(cluster_client.get_primaries()) == 3
    assert all(size > 0 for size in per_node), sizes


@pytest.mark.parametrize("discovery", ["scan", "index"])
def test_a_cluster_writes_the_same_rows_as_a_single_node(
    cluster_client, redis_client, pg_conn, pg_schema, query, discovery
):
    seed(cluster_client)
    seed(redis_client)
    on_cluster = aggregate_day(cluster_client, pg_conn, DAY, table=f"{pg_schema}.on_cluster", discovery=discovery)
    on_node = aggregate_day(redis_client, pg_conn, DAY, table=f"{pg_schema}.on_node", discovery=discovery)

    assert rows(query, f"{pg_schema}.on_cluster") == rows(query, f"{pg_schema}.on_node")
    expected_keys = len(MERCHANTS) + len(MERCHANTS[::3])
    if discovery == "scan":  # SCAN also meets the other writer's key and the two bad ones
        expected_keys += 3
    assert on_cluster.keys_found == on_node.keys_found == expected_keys
    assert on_cluster.bad_keys == on_node.bad_keys == (2 if discovery == "scan" else 0)
    assert on_cluster.rows_written == expected_keys - on_cluster.bad_keys


@pytest.mark.parametrize("merchant", ["merchant_007", "a*", "{tag}"])
def test_one_merchant_on_a_cluster(cluster_client, pg_conn, table, query, merchant):
    seed(cluster_client)
    aggregate_day(cluster_client, pg_conn, DAY, table=table, merchant_id=merchant)
    n = MERCHANTS.index(merchant)
    expected = {(merchant, "api_calls"): n + DAY.day}
    if n % 3 == 0:
        expected[(merchant, "storage_mb")] = 7 * n
    assert rows(query, table) == expected


def test_status_and_the_expiry_check_see_the_whole_cluster(cluster_client, pg_conn, table):
    seed(cluster_client)
    aggregate_day(cluster_client, pg_conn, DAY, table=table, discovery="scan")
    status = reconcile_date(cluster_client, pg_conn, DAY, table=table)
    assert status.redis_keys == len(MERCHANTS) + len(MERCHANTS[::3]) + 3
    assert (status.redis_bad_keys, status.differing_rows, status.keys_not_in_table) == (2, 0, 0)
    expiry = check_expiry(cluster_client, pg_conn, table=table, today=DAY)
    assert expiry.unindexed_keys == 3  # the other writer's key and the two bad ones


# -- fan-out: one part per primary ---------------------------------------------------


@pytest.mark.parametrize("discovery", ["scan", "index"])
def test_the_parts_over_the_primaries_add_up_to_the_whole_day(cluster_client, pg_conn, pg_schema, query, discovery):
    seed(cluster_client)
    parts = redis_partitions(cluster_client)
    assert len(parts) == 3
    results = [
        aggregate_day(
            cluster_client, pg_conn, DAY, table=f"{pg_schema}.by_part", discovery=discovery,
            partition=part, partition_count=len(parts),
        )
        for part in parts
    ]  # fmt: skip
    whole = aggregate_day(cluster_client, pg_conn, DAY, table=f"{pg_schema}.whole", discovery=discovery)
    assert rows(query, f"{pg_schema}.by_part") == rows(query, f"{pg_schema}.whole")
    assert sum(r.keys_found for r in results) == whole.keys_found
    assert all(r.keys_found > 0 for r in results), [r.keys_found for r in results]
    assert sorted(r.redis_partition for r in results) == parts


def test_a_part_filters_its_keys_by_the_layout_it_noted_at_its_start(cluster_client, pg_conn, table, monkeypatch):
    """The layout a part checks before commit is the one its reader kept keys by: read once
    at the start, passed to the reader, read again only for the check."""
    import usage_agg.aggregate as aggregate_module
    from usage_agg.partitions import part_layout
    from usage_agg.source import read_day

    seed(cluster_client, bad_keys=False)
    part = redis_partitions(cluster_client)[0]
    layout = part_layout(cluster_client, part)
    assert list(read_day(cluster_client, DAY, partition=part, layout="epoch 0: ")) == []  # serves no slot
    assert sum(len(b.counters) for b in read_day(cluster_client, DAY, partition=part, layout=layout)) > 0
    layouts = []

    def noted(client, partition):
        layouts.append(part_layout(client, partition))
        return layouts[-1]

    monkeypatch.setattr(aggregate_module, "part_layout", noted)
    monkeypatch.setattr("usage_agg.source.part_layout", lambda *a: pytest.fail("the reader read the layout again"))
    result = aggregate_day(cluster_client, pg_conn, DAY, table=table, partition=part, partition_count=3)
    assert result.keys_found > 0 and layouts == [layout]


def test_a_single_node_is_one_part(redis_client):
    kwargs = redis_client.connection_pool.connection_kwargs
    assert redis_partitions(redis_client) == [f"{kwargs['host']}:{kwargs['port']}"]


def test_an_unknown_part_is_refused(cluster_client, pg_conn, table):
    with pytest.raises(ValueError, match=r"^redis_partition: '127\.0\.0\.1:1' is not a primary"):
        aggregate_day(cluster_client, pg_conn, DAY, table=table, partition="127.0.0.1:1", partition_count=3)
    with pytest.raises(ValueError, match="give both"):
        aggregate_day(cluster_client, pg_conn, DAY, table=table, partition="127.0.0.1:1")


def test_parts_write_side_by_side_but_never_beside_a_whole_day_writer(pg_schema):
    from tests.conftest import pg_connect
    from usage_agg.schema import ensure_schema
    from usage_agg.sink import DayWriter

    conns = [pg_connect() for _ in range(3)]
    names = ensure_schema(conns[0], f"{pg_schema}.merchant_usage")
    conns[0].commit()
    quick = dt.timedelta(milliseconds=300)
    with DayWriter(conns[0], names, DAY, partition="a:1", lock_timeout=quick):
        with DayWriter(conns[1], names, DAY, partition="b:2", lock_timeout=quick):
            pass  # another part of the same day: no wait
        with pytest.raises(Exception, match="lock timeout"):
            with DayWriter(conns[2], names, DAY, lock_timeout=quick):
                pass
        with pytest.raises(Exception, match="lock timeout"):
            with DayWriter(conns[1], names, DAY, partition="a:1", lock_timeout=quick):
                pass
    for conn in conns:
        conn.close()


def test_a_fanned_out_day_counts_as_aggregated_once_every_part_succeeded(cluster_client, pg_conn, table):
    seed(cluster_client)
    parts = redis_partitions(cluster_client)
    audit = {"dag_id": "usage_aggregation", "run_id": "scheduled__1", "task_id": "aggregate_current_day"}
    for part in parts[:-1]:
        aggregate_day(cluster_client, pg_conn, DAY, table=table, partition=part, partition_count=3, audit=audit)
    aggregated = {d.usage_date: d.aggregated for d in check_expiry(cluster_client, pg_conn, table=table, today=DAY).days}
    assert aggregated[DAY.isoformat()] is False
    aggregate_day(cluster_client, pg_conn, DAY, table=table, partition=parts[-1], partition_count=3, audit=audit)
    aggregated = {d.usage_date: d.aggregated for d in check_expiry(cluster_client, pg_conn, table=table, today=DAY).days}
    assert aggregated[DAY.isoformat()] is True


# -- resets on a cluster: each primary has lives of its own -----------------------------


@pytest.fixture
def own_cluster(tmp_path):
    """A cluster of this test's own, whose primaries it may restart."""
    from tests.redis_cluster import LocalRedisCluster

    cluster = LocalRedisCluster(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow  # a cluster of its own, a wait for its uptime to tick, a primary restarted
@pytest.mark.parametrize("restarted", ["daily-counters-primary", "hourly-hashs-primary"])
def test_an_hour_is_never_counted_twice_when_another_primary_restarts(own_cluster, pg_conn, table, query, restarted):
    """A key's hourly hash hashes to another slot than its daily counter, here on another
    primary, whose life is not the counter's. (Found by an adversarial review: the hours took
    the counter's primary's life, so its restart counted an hour twice, 10 + 13 = 23.) Hours
    are read by the part that serves their hash and take that primary's life, so each row's
    reset follows the server it lives on."""
    import time

    from usage_agg.keys import hourly_key

    merchant = own_cluster.merchant_where(
        lambda m: own_cluster.port_of(build_key(m, DAY, "q")) != own_cluster.port_of(hourly_key(m, DAY, "q"))
    )
    at = dt.datetime(2025, 11, 1, 10, 30, tzinfo=dt.timezone.utc)
    client = own_cluster.client()
    track_usage(client, merchant, "q", 10, at=at)
    aggregate_day(client, pg_conn, DAY, table=table)
    client.close()
    time.sleep(UPTIME_RESOLUTION)  # a restart within two seconds of the last read is taken as a drop
    key = build_key(merchant, DAY, "q") if restarted == "daily-counters-primary" else hourly_key(merchant, DAY, "q")
    own_cluster.restart_empty(own_cluster.port_of(key))
    client = own_cluster.client()
    track_usage(client, merchant, "q", 3, at=at)
    result = aggregate_day(client, pg_conn, DAY, table=table)
    client.close()
    daily = query(f"SELECT quantity, redis_offset FROM {table}")
    hour = query(f"SELECT quantity, redis_offset FROM {table}_hourly")
    if restarted == "daily-counters-primary":  # the counter restarted (10 + 3); the hash kept all 13
        assert (daily, hour, result.resets, result.hourly_resets) == ([(13, 10)], [(13, 0)], 1, 0)
    else:  # the counter kept all 13; the hash's primary restarted (10 + 3)
        assert (daily, hour, result.resets, result.hourly_resets) == ([(13, 0)], [(13, 10)], 0, 1)


@pytest.mark.slow  # a cluster of its own, a wait for its uptime to tick, a primary restarted
@pytest.mark.parametrize("discovery", ["scan", "index"])
def test_an_hour_reset_before_never_counts_a_restored_snapshot_twice(own_cluster, pg_conn, table, query, discovery):
    """The rebase reaches hourly rows on a cluster (found by a review: hours took no server life,
    so an hour that had a reset took the last good snapshot's value for growth, 18 stored for
    12). The hash's primary restarts empty (10 kept, 2 counted since), then the last good
    snapshot (10) is restored: a life that did not start empty, so the row keeps the larger."""
    import time

    from usage_agg.keys import hourly_key, index_key

    def hashed_apart(m: str) -> bool:
        ports = {own_cluster.port_of(k) for k in (build_key(m, DAY, "q"), hourly_key(m, DAY, "q"), index_key(DAY))}
        return len(ports) == 3

    merchant = own_cluster.merchant_where(hashed_apart)
    hash_port = own_cluster.port_of(hourly_key(merchant, DAY, "q"))
    at = dt.datetime(2025, 11, 1, 10, 30, tzinfo=dt.timezone.utc)

    def run_and_read(count: int = 0):
        client = own_cluster.client()
        if count:
            track_usage(client, merchant, "q", count, at=at)
        result = aggregate_day(client, pg_conn, DAY, table=table, discovery=discovery)
        client.close()
        daily = query(f"SELECT quantity FROM {table}")
        hour = query(f"SELECT quantity, redis_offset FROM {table}_hourly")
        return result, daily, hour

    run_and_read(10)
    last_good = own_cluster.snapshot(hash_port)
    time.sleep(UPTIME_RESOLUTION)  # a restart within two seconds of the last read is taken as a drop
    own_cluster.restart_empty(hash_port)
    restarted, daily, hour = run_and_read(2)
    assert (daily, hour, restarted.hourly_resets) == ([(12,)], [(12, 10)], 1)
    own_cluster.restart_from(hash_port, last_good)  # the hash back at 10
    rebased, daily, hour = run_and_read()
    assert (daily, [q for q, _ in hour], rebased.hourly_resets) == ([(12,)], [12], 1)
    grown, daily, hour = run_and_read(1)  # growth in the restored life counts
    assert (daily, [q for q, _ in hour], grown.hourly_resets) == ([(13,)], [13], 0)


@pytest.mark.slow  # a cluster of its own, a wait for its uptime to tick, a primary restarted
@pytest.mark.parametrize("part", [True, False], ids=["its-part", "whole-day"])
def test_keys_moved_onto_a_primary_that_started_empty_are_not_a_restart(
    own_cluster, pg_conn, table, query, monkeypatch, part
):
    """A primary restarted empty, and a reshard moves a counted key onto it while a run reads
    the day. (Found by an adversarial review: the run took the moved 10 for counts begun
    from zero on the restarted primary and stored 10 + 10.) The run sees that the primary
    took in keys (MIGRATE) since it was noted, commits nothing, and its retry keeps 10."""
    import time

    import usage_agg.aggregate as aggregate_module
    from usage_agg.servers import RedisRestartedDuringRun

    first, *others = sorted(own_cluster.ports)  # noted first: the others' lives are then still the old ones
    merchant = own_cluster.merchant_where(lambda m: own_cluster.port_of(build_key(m, DAY, "q")) in others)
    key = build_key(merchant, DAY, "q")
    client = own_cluster.client()
    track_usage(client, merchant, "q", 10, usage_date=DAY)
    aggregate_day(client, pg_conn, DAY, table=table)
    time.sleep(UPTIME_RESOLUTION)  # a restart within two seconds of the last read is taken as a drop
    own_cluster.restart_empty(first)
    noted = aggregate_module.register_incarnations

    def noted_then_resharded(*args, **kwargs):
        sources = noted(*args, **kwargs)
        own_cluster.migrate_slot(own_cluster.slot_of(key), first)
        return sources

    monkeypatch.setattr(aggregate_module, "register_incarnations", noted_then_resharded)
    scope = {"partition": f"127.0.0.1:{first}", "partition_count": 3} if part else {}
    with pytest.raises(RedisRestartedDuringRun, match="started empty, and received keys from elsewhere"):
        aggregate_day(client, pg_conn, DAY, table=table, discovery="scan", **scope)
    assert query(f"SELECT quantity, redis_offset FROM {table}") == [(10, 0)]
    monkeypatch.undo()
    client.close()
    # The failed run recorded what it saw: statistics reset before the retry (which clear the
    # MIGRATE that told it) do not make the primary look started empty again. (Found by a third
    # review: the failed run had recorded nothing, and the retry stored 20.)
    with redis.Redis(port=first) as node:
        node.config_resetstat()
    client = own_cluster.client()
    retry = aggregate_day(client, pg_conn, DAY, table=table, discovery="scan", **scope)
    client.close()
    assert (retry.keys_found, retry.resets) == (1, 0)
    assert query(f"SELECT quantity, redis_offset FROM {table}") == [(10, 0)]


@pytest.mark.parametrize("and_back", [False, True], ids=["moved", "moved-and-back"])
@pytest.mark.parametrize("discovery", ["scan", "index"])
def test_a_part_whose_slots_moved_while_it_read_commits_nothing(
    own_cluster, pg_conn, pg_schema, table, query, monkeypatch, discovery, and_back
):
    """Parts of a day commit apart. A slot moving from one part's primary to another's while
    they read can have a key read by both, and the older read merged after the newer. (Found
    by an adversarial review: stored 10; part B read 11; the slot moved and the key grew to
    13; part A read 13 and committed; part B merged its 11 as a drop, (13, 2), and the next
    run stored 15; with the slot moved back before part B's commit, its slots looked the same
    at both ends.) A part whose primary's slots moved while it read commits nothing, and is
    retried: its primary's config epoch, bumped by taking the slot back, tells that case."""
    import usage_agg.source as source_module
    from tests.conftest import pg_connect
    from usage_agg.partitions import RedisReshardedDuringRun

    port_a, port_b = own_cluster.ports[:2]
    merchant = own_cluster.merchant_where(lambda m: own_cluster.port_of(build_key(m, DAY, "q")) == port_b)
    key = build_key(merchant, DAY, "q")
    client = own_cluster.client()
    track_usage(client, merchant, "q", 10, usage_date=DAY)
    for port in (port_a, port_b):  # an earlier reshard: neither primary counts as started empty any more
        own_cluster.migrate_slot(own_cluster.slot_of(key), port)
    aggregate_day(client, pg_conn, DAY, table=table, discovery=discovery)
    track_usage(client, merchant, "q", 1, usage_date=DAY)
    part = {"discovery": discovery, "partition_count": 3}
    read_values, reads = source_module.read_values, []

    def read_then_reshard(redis_client, raw_keys):
        values = read_values(redis_client, raw_keys)
        reads.append(raw_keys)
        if len(reads) == 1:  # part B has read 11: the slot moves to A, the key grows, A's part commits
            own_cluster.migrate_slot(own_cluster.slot_of(key), port_a)
            other, other_conn = own_cluster.client(), pg_connect()
            try:
                track_usage(other, merchant, "q", 2, usage_date=DAY)
                aggregate_day(other, other_conn, DAY, table=table, partition=f"127.0.0.1:{port_a}", **part)
                if and_back:
                    own_cluster.migrate_slot(own_cluster.slot_of(key), port_b)
            finally:
                other.close()
                other_conn.close()
        return values

    monkeypatch.setattr(source_module, "read_values", read_then_reshard)
    with pytest.raises(RedisReshardedDuringRun, match=f"primary 127.0.0.1:{port_b} moved while its part was read"):
        aggregate_day(client, pg_conn, DAY, table=table, partition=f"127.0.0.1:{port_b}", **part)
    assert query(f"SELECT quantity, redis_offset FROM {table}") == [(13, 0)]
    monkeypatch.undo()
    client.close()
    client = own_cluster.client()
    for port in own_cluster.ports:  # the retry, and the next run of every part
        aggregate_day(client, pg_conn, DAY, table=table, partition=f"127.0.0.1:{port}", **part)
    aggregate_day(client, pg_conn, DAY, table=table, discovery=discovery)
    client.close()
    assert query(f"SELECT quantity, redis_offset FROM {table}") == [(13, 0)]


@pytest.mark.parametrize("discovery", ["scan", "index"])
def test_a_part_reads_no_key_its_primary_holds_for_a_slot_it_does_not_serve(own_cluster, pg_conn, table, query, discovery):
    """A slot given to another primary by CLUSTER DELSLOTS/ADDSLOTS leaves its keys behind,
    with no mark on the first primary's line. (Found by a third review: the part of the first
    primary met the key by SCAN and read its value from the second through the client's
    routing, so two parts read one key.) A part keeps the keys of the slots its primary serves."""
    port_a, port_b = own_cluster.ports[:2]
    merchant = own_cluster.merchant_where(lambda m: own_cluster.port_of(build_key(m, DAY, "q")) == port_a)
    key = build_key(merchant, DAY, "q")
    client = own_cluster.client()
    track_usage(client, merchant, "q", 7, usage_date=DAY)
    own_cluster.reassign_slot(own_cluster.slot_of(key), port_b)  # the 7 stays on A
    client.close()
    client = own_cluster.client()
    track_usage(client, merchant, "q", 5, usage_date=DAY)  # counted on B from now on
    found = {
        port: aggregate_day(client, pg_conn, DAY, table=table, discovery=discovery, partition=f"127.0.0.1:{port}",
                            partition_count=3).keys_found
        for port in own_cluster.ports
    }  # fmt: skip
    client.close()
    assert (found[port_a], found[port_b]) == (0, 1)
    assert query(f"SELECT quantity FROM {table}") == [(5,)]
