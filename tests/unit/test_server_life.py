"""Server lives read from real Redis replies: what ``usage_agg.servers.server_life`` makes of them.

The replies in fixtures/server_life/ were recorded from real redis-server processes taken
through each case (fixtures/server_life/record.py shows how, and records them again):
a start and a restart without persistence, restarts loading a snapshot or an append-only
file, a replica promoted, a failover and back, keys taken in by ``MIGRATE`` and ``RESTORE``.
Each reply, and each pair of replies before and after a change, goes through the pure
functions (no server here); what they must say is what the README's rules rely on: a
restart empty is a new life that started empty; anything that may have brought old counters
(a load, replication, keys copied in) means not started empty; data taken by replication is
a new life though the ``run_id`` stays; a run that sees the life change fails.
"""

from __future__ import annotations

import datetime as dt
import json
from functools import cache
from pathlib import Path

import pytest

from usage_agg.servers import (
    INFO_SECTIONS,
    RedisRestartedDuringRun,
    RedisTookKeysIn,
    life_change,
    read_incarnation,
    server_life,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "server_life"


@cache
def recorded(case: str) -> dict:
    return json.loads((FIXTURES / f"{case}.json").read_text())["replies"]


def info(case: str, step: str) -> dict:
    return recorded(case)[step]["info"]


def life(case: str, step: str):
    return server_life(**info(case, step))


def incarnation(case: str, step: str):
    return life(case, step).incarnation("h:1")


def run_id(case: str, step: str) -> str:
    return info(case, step)["server"]["run_id"]


def replid(case: str, step: str) -> str:
    return info(case, step)["replication"]["master_replid"]


#: every recorded reply: (case, step, started empty, what may have brought old counters)
FACTS = [
    ("start_empty", "fresh", True, set()),
    ("start_empty", "counting", True, set()),
    ("start_empty", "restarted_empty", True, set()),
    ("restart_rdb", "before", True, set()),
    ("restart_rdb", "after", False, {"may_have_loaded_keys"}),
    ("restart_aof", "fresh", False, {"may_have_loaded_keys"}),  # appendonly on: a file may have been loaded
    ("restart_aof", "before", False, {"may_have_loaded_keys"}),
    ("restart_aof", "after", False, {"may_have_loaded_keys"}),
    ("restart_aof", "after_appendonly_off", True, set()),  # README: not covered (switched off before any run)
    ("replica_promoted", "primary", True, set()),
    ("replica_promoted", "replica", False, {"may_have_loaded_keys", "replicated"}),  # the full sync's RDB
    ("replica_promoted", "promoted", False, {"may_have_loaded_keys", "replicated"}),
    ("failover_and_back", "a_before", True, set()),
    ("failover_and_back", "b_before", False, {"may_have_loaded_keys", "replicated"}),
    ("failover_and_back", "a_failed_over", False, {"replicated"}),
    ("failover_and_back", "b_failed_over", False, {"may_have_loaded_keys", "replicated"}),
    ("failover_and_back", "a_back", False, {"replicated"}),
    ("failover_and_back", "b_back", False, {"may_have_loaded_keys", "replicated"}),
    ("migrate", "before", True, set()),
    ("migrate", "after", False, {"took_keys_in"}),
    ("restore", "before", True, set()),
    ("restore", "after", False, {"took_keys_in"}),
    ("restore", "after_resetstat", True, set()),  # README: statistics reset before a run saw them hide it
]
REASONS = ("may_have_loaded_keys", "replicated", "took_keys_in")


def test_every_recorded_reply_is_checked_and_holds_what_server_life_reads():
    replies = {(path.stem, step) for path in FIXTURES.glob("*.json") for step in recorded(path.stem)}
    assert replies == {(case, step) for case, step, *_ in FACTS}
    read = {
        "server": {"run_id", "server_time_usec", "uptime_in_seconds"},
        "persistence": {"rdb_last_load_keys_loaded", "aof_enabled"},
        "replication": {"role", "master_replid", "master_replid2"},
    }
    for case, step in replies:
        assert tuple(info(case, step)) == INFO_SECTIONS
        for section, fields in read.items():
            assert fields <= set(info(case, step)[section]), (case, step, section)


@pytest.mark.parametrize(("case", "step", "empty", "reasons"), FACTS, ids=[f"{c}-{s}" for c, s, *_ in FACTS])
def test_what_each_reply_says_about_its_life(case, step, empty, reasons):
    facts = life(case, step)
    assert facts.started_empty is empty
    assert {reason for reason in REASONS if getattr(facts, reason)} == reasons
    # the life id: the plain run_id unless the data came by replication, then run_id/replid
    expected = f"{run_id(case, step)}/{replid(case, step)}" if facts.replicated else run_id(case, step)
    assert facts.life_id == expected
    # the times, on the server's clock: its start rounded down a second more
    seen = dt.datetime.fromtimestamp(info(case, step)["server"]["server_time_usec"] / 1e6, dt.UTC)
    assert facts.seen_at == seen
    assert facts.started_at == seen - dt.timedelta(seconds=info(case, step)["server"]["uptime_in_seconds"] + 1)


@pytest.mark.parametrize(("case", "step"), [(c, s) for c, s, *_ in FACTS])
def test_read_incarnation_only_fetches_info_and_asks_server_life(case, step):
    class Replay:
        def pipeline(self, transaction=True):
            asked = []

            class Pipe:
                def info(self, section):
                    asked.append(section)

                def execute(self):
                    return [info(case, step)[section] for section in asked]

            return Pipe()

    assert read_incarnation(Replay(), "h:1") == incarnation(case, step)


def test_counting_keeps_the_life_and_a_restart_without_persistence_is_a_new_empty_one():
    assert life_change("h:1", incarnation("start_empty", "fresh"), incarnation("start_empty", "counting")) is None
    before, after = incarnation("start_empty", "counting"), incarnation("start_empty", "restarted_empty")
    assert after.run_id != before.run_id and after.started_empty
    # the sink takes an empty life begun after a row's last read for that row's successor
    assert before.seen_at < after.started_at
    change = life_change("h:1", before, after)
    assert type(change) is RedisRestartedDuringRun
    assert f"(run_id {before.run_id} -> {after.run_id})" in str(change)


@pytest.mark.parametrize(("case", "loaded"), [("restart_rdb", 1), ("restart_aof", 0)])
def test_a_restart_that_loaded_keys_is_a_new_life_that_did_not_start_empty(case, loaded):
    before, after = incarnation(case, "before"), incarnation(case, "after")
    assert after.run_id != before.run_id and not after.started_empty
    assert recorded(case)["after"]["dbsize"] == 1  # the counter came back
    # a snapshot says how many keys it loaded; an append-only file does not (Redis 7.0): aof_enabled tells
    assert info(case, "after")["persistence"]["rdb_last_load_keys_loaded"] == loaded
    assert type(life_change("h:1", before, after)) is RedisRestartedDuringRun


def test_appendonly_switched_off_after_loading_looks_empty_but_keeps_its_life():
    """README, not covered: switched off at runtime before any run read the server, the
    loaded life looks started empty. Once a run saw it with the file on, the same life
    stays noted as not empty (the sink ANDs what every read said) and no run fails."""
    loaded, switched_off = incarnation("restart_aof", "after"), incarnation("restart_aof", "after_appendonly_off")
    assert switched_off.run_id == loaded.run_id and switched_off.started_empty
    assert life_change("h:1", loaded, switched_off) is None


def test_a_replica_is_a_life_per_replication_history_and_promoting_it_starts_another():
    primary = life("replica_promoted", "primary")
    replica, promoted = life("replica_promoted", "replica"), life("replica_promoted", "promoted")
    assert primary.life_id == run_id("replica_promoted", "primary")
    assert replica.life_id == f"{run_id('replica_promoted', 'replica')}/{replid('replica_promoted', 'primary')}"
    # promoted: a new replication id, the old primary's kept as master_replid2
    old_primary = replid("replica_promoted", "primary")
    assert info("replica_promoted", "promoted")["replication"]["master_replid2"] == old_primary
    assert promoted.life_id not in (replica.life_id, primary.life_id) and not promoted.started_empty
    change = life_change("h:1", incarnation("replica_promoted", "replica"), incarnation("replica_promoted", "promoted"))
    assert type(change) is RedisRestartedDuringRun


def test_a_failover_and_back_gives_the_old_primary_a_new_life_though_its_run_id_stays():
    """The case behind "20 stored for 12": a primary that fails over and back keeps its
    run_id, but its counters came back by replication."""
    steps = ("a_before", "a_failed_over", "a_back")
    lives = [life("failover_and_back", step) for step in steps]
    assert {run_id("failover_and_back", step) for step in steps} == {run_id("failover_and_back", "a_before")}
    assert len({facts.life_id for facts in lives}) == 3
    assert [facts.started_empty for facts in lives] == [True, False, False]
    assert info("failover_and_back", "a_back")["replication"]["role"] == "master"
    before, back = incarnation("failover_and_back", "a_before"), incarnation("failover_and_back", "a_back")
    change = life_change("h:1", before, back)
    assert type(change) is RedisRestartedDuringRun
    assert f"(run_id {before.run_id} -> {before.run_id}/{replid('failover_and_back', 'a_back')})" in str(change)
    # the other server: a replica, the primary, a replica again: three lives, none empty
    other = [life("failover_and_back", step) for step in ("b_before", "b_failed_over", "b_back")]
    assert len({facts.life_id for facts in other}) == 3 and not any(facts.started_empty for facts in other)


@pytest.mark.parametrize("case", ["migrate", "restore"])
def test_keys_taken_in_keep_the_life_but_end_its_empty_start_and_fail_the_run(case):
    before, after = incarnation(case, "before"), incarnation(case, "after")
    assert after.run_id == before.run_id
    assert before.started_empty and not after.started_empty
    assert info(case, "after")["commandstats"]["cmdstat_restore"]["calls"] == 1  # MIGRATE sends RESTORE
    change = life_change("h:1", before, after)
    assert type(change) is RedisTookKeysIn and change.run_id == after.run_id
    assert life_change("h:1", after, after) is None


def test_statistics_reset_after_keys_were_taken_in_hide_them_but_fail_no_run():
    """README: once a run has seen the keys taken in, CONFIG RESETSTAT does not undo it (the
    sink keeps started_empty false); before any run saw them, they are hidden."""
    after, reset = incarnation("restore", "after"), incarnation("restore", "after_resetstat")
    assert reset.run_id == after.run_id and reset.started_empty
    assert life_change("h:1", after, reset) is None
