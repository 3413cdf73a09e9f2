"""How a Redis server's life is read from its INFO: when it began, and whether it began empty.

A stub stands in for the server here: what is tested is the reading of INFO fields
(real servers' restarts are in tests/integration/test_resets.py).
"""

from __future__ import annotations

import datetime as dt

import pytest

from usage_agg.servers import RedisIncarnation, RedisRestartedDuringRun, _is_zero_id, check_unchanged, read_incarnation

NOW_USEC = 1_764_547_200_123_456  # 2025-12-01 00:00:00.123456 UTC
EMPTY = {
    "server": {"run_id": "abc", "server_time_usec": NOW_USEC, "uptime_in_seconds": 59},
    "persistence": {"rdb_last_load_keys_loaded": 0, "aof_enabled": 0},
    "replication": {"role": "master", "master_replid2": "0" * 40},
    "commandstats": {"cmdstat_get": {"calls": 9}},
}


class Node:
    def __init__(self, info):
        self._info = info

    def pipeline(self, transaction=True):
        assert transaction is False
        node, sections = self, []

        class Pipe:
            def info(self, section):
                sections.append(section)

            def execute(self):
                return [node._info[s] for s in sections]

        return Pipe()

    def info(self, section):
        return self._info[section]


def changed(section, **fields):
    return {**EMPTY, section: {**EMPTY[section], **fields}}


def test_an_empty_start_is_recognised_with_its_times():
    life = read_incarnation(Node(EMPTY), "h:1")
    now = dt.datetime(2025, 12, 1, 0, 0, 0, 123456, tzinfo=dt.timezone.utc)
    assert life == RedisIncarnation("abc", "h:1", now - dt.timedelta(seconds=60), True, now)


@pytest.mark.parametrize(
    "info",
    [
        changed("persistence", rdb_last_load_keys_loaded=5),  # keys loaded from a snapshot
        changed("persistence", rdb_last_load_keys_loaded=None),  # Redis before 7.0: unknown
        {**EMPTY, "persistence": {"aof_enabled": 0}},  # the field is missing
        changed("persistence", aof_enabled=1),  # an AOF may have been loaded
        {**EMPTY, "persistence": {"rdb_last_load_keys_loaded": 0}},  # AOF unknown: assume on
        changed("replication", role="slave"),
        changed("replication", master_replid2="f" * 40),  # a promoted replica
        changed("replication", master_replid2=None),
        changed("commandstats", **{"cmdstat_restore": {"calls": 1}}),  # keys copied in
        changed("commandstats", **{"cmdstat_restore-asking": {"calls": 2}}),  # MIGRATE on a cluster
    ],
)
def test_anything_that_may_have_brought_old_counters_means_not_empty(info):
    assert read_incarnation(Node(info), "h:1").started_empty is False


def test_zero_calls_of_a_copy_command_still_means_empty():
    info = changed("commandstats", **{"cmdstat_restore": {"calls": 0}, "cmdstat_restore-asking": {"calls": 0}})
    assert read_incarnation(Node(info), "h:1").started_empty is True
    assert read_incarnation(Node(changed("persistence", aof_enabled="0")), "h:1").started_empty is True


@pytest.mark.parametrize(("value", "zero"), [("0" * 40, True), (0, True), ("00", True), ("0" * 39 + "1", False), ("zz", False), (None, False), ("", False)])
def test_a_zero_replication_id(value, zero):
    assert _is_zero_id(value) is zero


class Single(Node):
    """A single-node client (its address from connection_kwargs, as redis-py keeps it)."""

    def __init__(self, info):
        super().__init__(info)
        self.connection_pool = type("Pool", (), {"connection_kwargs": {"host": "h", "port": 1}})()


def test_a_restart_during_the_run_is_named():
    before = {"h:1": read_incarnation(Node(EMPTY), "h:1")}
    check_unchanged(Single(EMPTY), before)
    check_unchanged(Single(changed("server", run_id="other")), {})  # a server not seen before: nothing to compare
    with pytest.raises(RedisRestartedDuringRun) as caught:
        check_unchanged(Single(changed("server", run_id="def")), before)
    assert str(caught.value) == (
        "Redis at h:1 restarted, or took its data by replication, while the day was read (run_id abc -> def); "
        "nothing of this run is committed, and the retry reads the new server"
    )
    with pytest.raises(RedisRestartedDuringRun, match=r"\(run_id abc -> abc/r2\)"):  # a failback during the run
        check_unchanged(Single(changed("replication", master_replid="r2", master_replid2="r1")), before)


@pytest.mark.parametrize(
    ("replication", "life"),
    [
        ({"role": "master", "master_replid": "r1", "master_replid2": "0" * 40}, "abc"),  # never a replica
        ({"role": "master", "master_replid": "r2", "master_replid2": "r1"}, "abc/r2"),  # promoted, or failed back
        ({"role": "master", "master_replid": "r3", "master_replid2": "r2"}, "abc/r3"),  # and again: another life
        ({"role": "slave", "master_replid": "m1", "master_replid2": "0" * 40}, "abc/m1"),  # a replica of m1
    ],
)
def test_a_server_whose_data_came_by_replication_has_a_life_per_replication_history(replication, life):
    """A failback, or a snapshot restored through a replica link, replaces a server's counters
    but keeps its run_id. (Found by an adversarial review: a primary that restarted empty,
    failed over and back kept its run_id, and the old counts it got back were taken for
    growth: 20 stored for 12.)"""
    assert read_incarnation(Node(changed("replication", **replication)), "h:1").run_id == life


def test_keys_taken_in_during_the_run_by_a_server_that_started_empty_fail_it():
    """A reshard moving counted keys onto a primary that started empty: its values are then
    not counts begun from zero (tests/integration/test_cluster.py has it on a real cluster)."""
    migrated = {"cmdstat_restore-asking": {"calls": 1}}
    before = {"h:1": read_incarnation(Node(EMPTY), "h:1")}
    with pytest.raises(RedisRestartedDuringRun, match="^Redis at h:1 started empty, and received keys from elsewhere"):
        check_unchanged(Single(changed("commandstats", **migrated)), before)
    loaded = changed("persistence", aof_enabled=1)
    not_empty = {"h:1": read_incarnation(Node(loaded), "h:1")}
    check_unchanged(Single({**loaded, "commandstats": migrated}), not_empty)  # never taken for empty: no matter
