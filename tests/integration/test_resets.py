"""A Redis that loses counters never loses what was already counted, and never counts twice.

Each case happens for real, to a Redis server of the test's own (restart without
persistence, a snapshot restore, a lagging replica promoted, a real eviction), and the
totals are exactly those the reset rules in ``usage_agg.write_routes`` give.
"""

from __future__ import annotations

import time

import pytest
import redis

from tests.redis_servers import UPTIME_RESOLUTION, LocalRedisServer
from usage_agg.aggregate import aggregate_day
from usage_agg.keys import build_key
from usage_agg.servers import RedisRestartedDuringRun, read_incarnation
from usage_agg.tracking import track_usage

DAY = "2025-11-01"


@pytest.fixture
def servers(tmp_path):
    started: list[LocalRedisServer] = []

    def start(*options: str) -> LocalRedisServer:
        server = LocalRedisServer(tmp_path, *options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def totals(query, table) -> dict[tuple[str, str], tuple[int, int]]:
    """``(merchant, metric) -> (quantity, redis_offset)``."""
    return {(m, t): (q, o) for m, t, q, o in query(f"SELECT merchant_id, metric_type, quantity, redis_offset FROM {table}")}


def count(client, merchant: str, metric: str, amount: int) -> None:
    track_usage(client, merchant, metric, amount, usage_date=DAY)


@pytest.mark.usefixtures("merge_by")
def test_a_restart_without_persistence_keeps_the_count_and_adds_all_that_follows(servers, pg_conn, table, query):
    server = servers()
    client = server.client()
    count(client, "acme", "queries", 100)
    count(client, "acme", "storage", 40)
    first = aggregate_day(client, pg_conn, DAY, table=table)
    assert first.resets == 0

    time.sleep(UPTIME_RESOLUTION)
    server.restart()  # nothing on disk: every counter starts again from zero
    assert read_incarnation(client, "x").started_empty
    count(client, "acme", "queries", 120)  # passes the old total before the next run ...
    count(client, "acme", "storage", 10)  # ... or stays below it
    after = aggregate_day(client, pg_conn, DAY, table=table)
    assert (after.resets, after.decreases_refused) == (2, 1)
    assert {s["metric_type"]: s["reset"] for s in after.reset_samples} == {"queries": "restart", "storage": "restart"}
    assert totals(query, table) == {("acme", "queries"): (220, 100), ("acme", "storage"): (50, 40)}

    count(client, "acme", "queries", 5)
    grown = aggregate_day(client, pg_conn, DAY, table=table)
    assert (grown.resets, grown.rows_written, grown.rows_unchanged) == (0, 1, 1)
    assert totals(query, table)[("acme", "queries")] == (225, 100)
    assert aggregate_day(client, pg_conn, DAY, table=table).rows_written == 0  # and reruns change nothing


def test_a_key_first_written_after_the_restart_reset_is_read_whole(servers, pg_conn, table, query):
    """The restart rule belongs to each row until its key is read again, however late."""
    server = servers()
    client = server.client()
    count(client, "acme", "queries", 100)
    count(client, "globex", "queries", 7)
    aggregate_day(client, pg_conn, DAY, table=table)
    time.sleep(UPTIME_RESOLUTION)
    server.restart()
    count(client, "acme", "queries", 3)
    aggregate_day(client, pg_conn, DAY, table=table)  # globex has no key yet
    count(client, "globex", "queries", 9)
    late = aggregate_day(client, pg_conn, DAY, table=table)
    assert late.resets == 1
    assert totals(query, table) == {("acme", "queries"): (103, 100), ("globex", "queries"): (16, 7)}


@pytest.mark.usefixtures("merge_by")
def test_a_counter_back_at_its_last_read_value_after_a_restart_is_all_new(servers, pg_conn, table, query):
    """The value Redis holds equals the one last read, yet the server started empty since:
    all of it is new usage (a comparison of values alone would call it unchanged)."""
    server = servers()
    client = server.client()
    count(client, "acme", "queries", 100)
    aggregate_day(client, pg_conn, DAY, table=table)
    time.sleep(UPTIME_RESOLUTION)
    server.restart()
    count(client, "acme", "queries", 100)
    after = aggregate_day(client, pg_conn, DAY, table=table)
    assert (after.resets, after.rows_written, after.rows_unchanged) == (1, 1, 0)
    assert totals(query, table) == {("acme", "queries"): (200, 100)}


@pytest.mark.usefixtures("merge_by")
def test_a_plain_run_after_an_allow_decrease_run_at_the_same_value_after_a_restart_adds_nothing(
    servers, pg_conn, table, query
):
    """Found by the history test (tests/unit/test_counter_histories.py), here on a real server:
    100 read; Redis restarts empty; 100 counted since. ``allow_decrease`` makes Redis the truth,
    and 100 is the row's own total: the row must still take the new life, or the plain run
    after it took the old life for one Redis started empty after and stored 200."""
    server = servers()
    client = server.client()
    count(client, "acme", "queries", 100)
    aggregate_day(client, pg_conn, DAY, table=table)
    time.sleep(UPTIME_RESOLUTION)
    server.restart()
    count(client, "acme", "queries", 100)
    truth = aggregate_day(client, pg_conn, DAY, table=table, allow_decrease=True)
    assert (truth.resets, truth.rows_written) == (0, 1)  # the same total, now read from this life
    assert totals(query, table) == {("acme", "queries"): (100, 0)}
    after = aggregate_day(client, pg_conn, DAY, table=table)
    assert (after.resets, after.rows_written, after.rows_unchanged) == (0, 0, 1)
    assert totals(query, table) == {("acme", "queries"): (100, 0)}


@pytest.mark.usefixtures("merge_by")
def test_a_snapshot_restore_never_counts_restored_values_twice(servers, pg_conn, table, query):
    server = servers("--dbfilename", "dump.rdb")
    client = server.client()
    count(client, "acme", "queries", 60)
    count(client, "globex", "queries", 60)
    client.save()  # the snapshot holds 60 and 60
    count(client, "acme", "queries", 40)
    count(client, "globex", "queries", 40)
    aggregate_day(client, pg_conn, DAY, table=table)  # 100 and 100 counted

    server.restart()  # the snapshot is loaded: both roll back to 60, not to zero
    assert not read_incarnation(client, "x").started_empty
    count(client, "acme", "queries", 10)  # 70: below what was read
    count(client, "globex", "queries", 70)  # 130: past it
    after = aggregate_day(client, pg_conn, DAY, table=table)
    assert after.resets == 1 and after.reset_samples[0]["reset"] == "drop"
    # acme: 100 kept, growth counted from 70 on; globex: growth past 100 only (never 60 twice)
    assert totals(query, table) == {("acme", "queries"): (100, 30), ("globex", "queries"): (130, 0)}
    count(client, "acme", "queries", 50)
    aggregate_day(client, pg_conn, DAY, table=table)
    assert totals(query, table)[("acme", "queries")] == (150, 30)


@pytest.mark.slow  # two waits for Redis's uptime to tick (UPTIME_RESOLUTION), two restarts
@pytest.mark.usefixtures("merge_by")
def test_a_snapshot_restored_after_an_empty_restart_never_counts_its_values_twice(servers, pg_conn, table, query):
    """Redis comes back empty, writers count on, then an operator restores the last good
    snapshot, taken before the restart. (Found by an adversarial review: the restored 10,
    above the 2 last read, was taken for growth and added to the 10 the restart had already
    kept: 20 stored for 12 counted.) A row that holds an offset, read from another life that
    did not start empty, keeps the larger of its total and the value (a *rebase*); growth
    in the new life counts from there, in the daily and the hourly rows alike."""
    import datetime as dt
    import shutil

    ten = dt.datetime(2025, 11, 1, 10, tzinfo=dt.UTC)
    server = servers("--dbfilename", "dump.rdb")
    client = server.client()
    track_usage(client, "acme", "queries", 10, at=ten)
    count(client, "globex", "queries", 10)
    count(client, "initech", "queries", 5)
    aggregate_day(client, pg_conn, DAY, table=table)
    client.save()
    shutil.move(server.dir / "dump.rdb", server.dir / "before.rdb")  # the backup, taken aside
    time.sleep(UPTIME_RESOLUTION)
    server.restart()  # nothing to load: every counter starts again from zero
    track_usage(client, "acme", "queries", 2, at=ten)
    count(client, "globex", "queries", 30)
    count(client, "initech", "queries", 5)
    aggregate_day(client, pg_conn, DAY, table=table)
    assert totals(query, table) == {
        ("acme", "queries"): (12, 10), ("globex", "queries"): (40, 10), ("initech", "queries"): (10, 5)
    }  # fmt: skip
    time.sleep(UPTIME_RESOLUTION)
    server.crash()
    shutil.copy(server.dir / "before.rdb", server.dir / "dump.rdb")
    server.start()  # the backup is restored: 10, 10 and 5, as before the empty restart
    assert not read_incarnation(client, "x").started_empty
    restored = aggregate_day(client, pg_conn, DAY, table=table)
    assert {s["merchant_id"]: s["reset"] for s in restored.reset_samples} == {"acme": "rebase", "globex": "drop"}
    assert totals(query, table) == {
        ("acme", "queries"): (12, 2), ("globex", "queries"): (40, 30), ("initech", "queries"): (10, 5)
    }  # fmt: skip
    assert query(f"SELECT quantity, redis_offset FROM {table}_hourly") == [(12, 2)]
    # Growth in the restored life counts, also for initech, whose value had not moved when
    # the life changed (its row took the new life all the same).
    track_usage(client, "acme", "queries", 5, at=ten)
    count(client, "globex", "queries", 1)
    count(client, "initech", "queries", 3)
    grown = aggregate_day(client, pg_conn, DAY, table=table)
    assert grown.resets == 0
    assert totals(query, table) == {
        ("acme", "queries"): (17, 2), ("globex", "queries"): (41, 30), ("initech", "queries"): (13, 5)
    }  # fmt: skip
    assert query(f"SELECT quantity, redis_offset FROM {table}_hourly") == [(17, 2)]


def test_a_drop_then_a_snapshot_from_before_it_counts_nothing_twice(servers, pg_conn, table, query):
    """A counter deleted and begun again (a drop: 1 below the 10 read), then the snapshot
    from before the delete loaded. (Found by an adversarial review: the snapshot's 10 was
    growth over the 1, and 9 + 10 = 19 stored.) The rebase keeps the larger of the two."""
    server = servers("--dbfilename", "dump.rdb")
    client = server.client()
    count(client, "acme", "queries", 10)
    aggregate_day(client, pg_conn, DAY, table=table)
    client.save()
    client.delete(build_key("acme", DAY, "queries"))
    count(client, "acme", "queries", 1)
    aggregate_day(client, pg_conn, DAY, table=table)
    assert totals(query, table) == {("acme", "queries"): (10, 9)}
    server.restart()  # loads the snapshot: 10
    count(client, "acme", "queries", 3)  # 13 before the next run: past the 10 counted, so 3 are new at least
    assert aggregate_day(client, pg_conn, DAY, table=table).reset_samples[0]["reset"] == "rebase"
    assert totals(query, table) == {("acme", "queries"): (13, 0)}
    count(client, "acme", "queries", 4)
    aggregate_day(client, pg_conn, DAY, table=table)
    assert totals(query, table) == {("acme", "queries"): (17, 0)}


@pytest.mark.slow  # a wait for Redis's uptime to tick, a restart, a replica synced
def test_a_snapshot_restored_through_a_replica_link_never_counts_its_values_twice(
    servers, pg_conn, table, query, tmp_path
):
    """The last good snapshot restored into the running server by replication: a server
    started from it, the usage server made its replica, then a primary again. Its run_id
    stays. (Found by an adversarial review: the restored 10 was growth over the 2 last read
    in the same run_id, 20 stored for 12; a failover and back does the same.) The server's
    life changes with its replication history, so the rebase applies."""
    import shutil

    server = servers("--dbfilename", "dump.rdb")
    client = server.client()
    count(client, "acme", "queries", 10)
    aggregate_day(client, pg_conn, DAY, table=table)
    client.save()
    shutil.move(server.dir / "dump.rdb", tmp_path / "good.rdb")
    time.sleep(UPTIME_RESOLUTION)
    server.restart()  # nothing to load: the counter starts again from zero
    count(client, "acme", "queries", 2)
    aggregate_day(client, pg_conn, DAY, table=table)
    assert totals(query, table) == {("acme", "queries"): (12, 10)}
    backup = LocalRedisServer(tmp_path / "backup", "--dbfilename", "dump.rdb")
    shutil.copy(tmp_path / "good.rdb", backup.dir / "dump.rdb")
    backup.start()
    try:
        client.replicaof("127.0.0.1", backup.port)
        deadline = time.monotonic() + 30
        while client.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica never synced"
            time.sleep(0.05)
        client.replicaof("NO", "ONE")
    finally:
        backup.stop()
    assert client.get(build_key("acme", DAY, "queries")) == b"10"
    restored = aggregate_day(client, pg_conn, DAY, table=table)
    assert [s["reset"] for s in restored.reset_samples] == ["rebase"]
    assert totals(query, table) == {("acme", "queries"): (12, 2)}
    count(client, "acme", "queries", 3)
    aggregate_day(client, pg_conn, DAY, table=table)
    assert totals(query, table) == {("acme", "queries"): (15, 2)}


@pytest.mark.slow  # two Redis servers, one a synced replica
def test_a_replica_promoted_behind_its_primary(servers, pg_conn, table, query):
    primary = servers()
    replica = servers("--replicaof", "127.0.0.1", str(primary.port))
    to_primary, to_replica = primary.client(), replica.client()
    count(to_primary, "acme", "queries", 100)
    assert to_primary.wait(1, 10_000) == 1  # the replica has 100 ...
    # ... and is cut off before the primary counts 50 more: promoting it now is what a
    # failover does to a replica that lagged behind (the order does not matter to the reader)
    to_replica.execute_command("REPLICAOF", "NO", "ONE")
    count(to_primary, "acme", "queries", 50)
    aggregate_day(to_primary, pg_conn, DAY, table=table)  # 150 counted from the primary

    primary.crash()  # failover: the replica, which never saw +50, serves from now on
    assert to_replica.get(build_key("acme", DAY, "queries")) == b"100"
    assert not read_incarnation(to_replica, "x").started_empty  # a promoted replica is no empty restart
    count(to_replica, "acme", "queries", 30)
    after = aggregate_day(to_replica, pg_conn, DAY, table=table)
    assert (after.resets, after.reset_samples[0]["reset"]) == (1, "drop")
    assert totals(query, table) == {("acme", "queries"): (150, 20)}
    count(to_replica, "acme", "queries", 10)
    aggregate_day(to_replica, pg_conn, DAY, table=table)
    assert totals(query, table) == {("acme", "queries"): (160, 20)}


def test_an_evicted_key_recreated_by_incrby(servers, pg_conn, table, query):
    server = servers("--maxmemory-policy", "volatile-ttl")
    client = server.client()
    count(client, "acme", "queries", 100)
    aggregate_day(client, pg_conn, DAY, table=table)
    key = build_key("acme", DAY, "queries")
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 256 * 1024)
    filler = 0
    while client.exists(key):  # fill memory with longer-lived keys until Redis really evicts the counter
        client.set(f"filler:{filler}", b"x" * 1024, ex=30 * 86400)
        filler += 1
        assert filler < 10_000, "Redis never evicted the usage key"
    assert int(client.info("stats")["evicted_keys"]) > 0
    client.config_set("maxmemory", 0)  # the pressure passes (else the new counter, first to go, may go again)
    count(client, "acme", "queries", 30)  # the application counts on, from zero
    after = aggregate_day(client, pg_conn, DAY, table=table)
    assert (after.resets, after.reset_samples[0]["reset"]) == (1, "drop")
    assert totals(query, table) == {("acme", "queries"): (100, 70)}
    count(client, "acme", "queries", 20)
    aggregate_day(client, pg_conn, DAY, table=table)
    assert totals(query, table) == {("acme", "queries"): (120, 70)}


def test_counters_copied_to_a_new_server_are_not_taken_for_a_restart(servers, pg_conn, table, query):
    """A server that started empty but received keys by MIGRATE/RESTORE holds values already counted."""
    old = servers()
    old_client = old.client()
    count(old_client, "acme", "queries", 100)
    aggregate_day(old_client, pg_conn, DAY, table=table)
    time.sleep(UPTIME_RESOLUTION)
    new = servers()  # started after the last read, empty ...
    new_client = new.client()
    for key in old_client.scan_iter(match="usage*"):
        old_client.migrate("127.0.0.1", new.port, key, 0, 5000)  # ... then filled by MIGRATE
    count(new_client, "acme", "queries", 5)
    aggregate_day(new_client, pg_conn, DAY, table=table)
    assert totals(query, table) == {("acme", "queries"): (105, 0)}


def test_keys_taken_in_stay_known_when_the_statistics_are_reset(servers, pg_conn, table, query):
    """CONFIG RESETSTAT clears the RESTORE calls that told a server took keys in; what a run read
    of it stays known. (Found by an adversarial review: a row left unchanged still named the
    old server, the new one read as started empty again, and 100 + 105 was stored.)"""
    old = servers()
    old_client = old.client()
    count(old_client, "acme", "queries", 100)
    aggregate_day(old_client, pg_conn, DAY, table=table)
    time.sleep(UPTIME_RESOLUTION)
    new = servers()
    new_client = new.client()
    for key in old_client.scan_iter(match="usage*"):
        old_client.migrate("127.0.0.1", new.port, key, 0, 5000)
    assert aggregate_day(new_client, pg_conn, DAY, table=table).rows_unchanged == 1  # the row still names the old server
    new_client.config_resetstat()
    count(new_client, "acme", "queries", 5)
    assert aggregate_day(new_client, pg_conn, DAY, table=table).resets == 0
    assert totals(query, table) == {("acme", "queries"): (105, 0)}


class RestartsDuringRead:
    """The real client; the server restarts (empty) between two batches of one run."""

    def __init__(self, client, server: LocalRedisServer):
        self.client, self.server, self.batches = client, server, 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    def mget(self, keys):
        self.batches += 1
        if self.batches == 2:
            self.server.restart()
        return self.client.mget(keys)


def test_a_restart_during_a_run_commits_nothing_of_it(servers, pg_conn, table, query):
    server = servers()
    client = server.client(retry_on_error=[redis.ConnectionError])
    for i in range(30):
        count(client, f"m{i:02d}", "queries", 2)
    aggregate_day(client, pg_conn, DAY, table=table)
    for i in range(30):
        count(client, f"m{i:02d}", "queries", 1)
    with pytest.raises(RedisRestartedDuringRun, match="restarted, or took its data by replication, while the day was read"):
        aggregate_day(RestartsDuringRead(client, server), pg_conn, DAY, table=table, batch_size=10, discovery="scan")
    assert set(totals(query, table).values()) == {(2, 0)}  # as before the run
