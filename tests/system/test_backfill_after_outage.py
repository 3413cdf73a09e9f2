"""Backfill after an outage, as an operator does it: over a range that already holds runs.

The range holds a run that succeeded, two runs that failed on new bad keys (since mended:
the keys now hold numbers), and days with no run at all. The README's command for
this case (2.11: rerun failed tasks and go on past failures; 3.3: reprocess failed
runs) must then bring every day's totals to what Redis holds, without a run left
unfinished and without the backfill stopping part way.
"""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest

from tests.system.stack import AIRFLOW_V3, REPO

pytestmark = pytest.mark.system

DAG = "usage_aggregation"
FIRST, LAST = dt.date(2025, 11, 10), dt.date(2025, 11, 12)
COMMANDS = {
    3: f"airflow backfill create --dag-id {DAG} --from-date {FIRST} --to-date {LAST} --reprocess-behavior failed",
    2: f"airflow dags backfill -s {FIRST} -e {LAST} --rerun-failed-tasks --continue-on-failures {DAG}",
}
COMMAND = COMMANDS[3 if AIRFLOW_V3 else 2]
#: Runs already in the range when the operator backfills: logical date -> state it ended in
EARLIER_RUNS = {
    "2025-11-10T00:00:00+00:00": "success",
    "2025-11-11T05:00:00+00:00": "failed",  # a new bad key on 2025-11-11
    "2025-11-12T00:00:00+00:00": "failed",  # another new bad key, on 2025-11-12
}
BAD_KEYS = {"usage:broken:2025-11-11:queries": 7, "usage:broken:2025-11-12:queries": 9}


def test_the_readme_gives_the_backfill_after_outage_commands_as_tested():
    readme = (REPO / "README.md").read_text()
    for command in COMMANDS.values():
        assert f"\n{command}\n" in readme, command


def runs(metadata, first: dt.date = FIRST, last: dt.date = LAST) -> dict[str, tuple[str, str]]:
    """``logical date -> (run type, state)`` of the DAG's runs on the days from ``first`` to ``last``."""
    column = "logical_date" if AIRFLOW_V3 else "execution_date"
    found = metadata(
        f"SELECT {column}, run_type, state FROM dag_run WHERE dag_id = %s AND {column} >= %s AND {column} < %s",
        (DAG, f"{first}T00:00:00+00:00", f"{last + dt.timedelta(days=1)}T00:00:00+00:00"),
    )
    return {when.astimezone(dt.timezone.utc).isoformat(): (run_type, state) for when, run_type, state in found}


def wait_for(
    metadata, condition, what: str, timeout: float = 600, days: tuple[dt.date, dt.date] = (FIRST, LAST)
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = runs(metadata, *days)
        if condition(current):
            return current
        time.sleep(3)
    raise AssertionError(f"{what} after {timeout} s: {runs(metadata, *days)}")


def test_a_backfill_over_failed_succeeded_and_missing_runs_fills_every_day(
    stack, usage_redis, usage_table, metadata, query
):
    expected = {}
    for n, day in enumerate(FIRST + dt.timedelta(days=d) for d in range(-1, (LAST - FIRST).days + 1)):
        for merchant in ("acme", "globex"):
            # plain INCRBY, as the platform's own writers count (no day index): every run SCANs
            usage_redis.incrby(f"usage:{merchant}:{day}:queries", 10 * n + len(merchant))
            expected[(merchant, day.isoformat(), "queries")] = 10 * n + len(merchant)
    for key in BAD_KEYS:
        usage_redis.set(key, "NaN")

    stack.unpause(DAG)  # the scheduler runs triggered runs (and 3.3's backfills) of unpaused DAGs
    for when in EARLIER_RUNS:  # the outage: runs one at a time, as the schedule made them
        date_flag = ("--logical-date", when) if AIRFLOW_V3 else ("--exec-date", when)
        stack.airflow("dags", "trigger", DAG, *date_flag)
        wait_for(metadata, lambda r, when=when: r.get(when, ("", ""))[1] in ("success", "failed"), f"run {when}")
    assert {when: state for when, (_, state) in runs(metadata).items()} == EARLIER_RUNS

    for key, value in BAD_KEYS.items():  # the data is mended
        usage_redis.set(key, value)
        expected[("broken", key.split(":")[2], "queries")] = value
    done = stack.backfill(*COMMAND.split()[1:])
    hours = (LAST - FIRST).days * 24 + 1
    final = wait_for(
        metadata,
        lambda r: len(r) == hours and all(state in ("success", "failed") for _, state in r.values()),
        f"{hours} finished runs",
        timeout=900 if AIRFLOW_V3 else 60,  # Airflow 2's CLI returns when its backfill is done
    )
    failed = {when: v for when, v in final.items() if v[1] != "success"}
    assert failed == {}, f"{failed}\n--- {COMMAND} ---\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}"

    rows = {
        (merchant, day, metric): quantity
        for merchant, day, metric, quantity in query(
            f"SELECT merchant_id, usage_date::text, metric_type, quantity FROM {usage_table}"
        )
    }
    assert rows == expected
    print(json.dumps({"command": COMMAND, "runs": hours, "earlier": EARLIER_RUNS}))


#: The README's plain backfill (no reprocess behaviour, no rerun of failed tasks), over three days
#: whose midnight runs already exist: a new user's first backfill after an outage.
PLAIN_FIRST, PLAIN_LAST = dt.date(2025, 10, 20), dt.date(2025, 10, 22)
PLAIN_COMMANDS = {
    3: f"airflow backfill create --dag-id {DAG} --from-date {PLAIN_FIRST} --to-date {PLAIN_LAST}",
    2: f"airflow dags backfill -s {PLAIN_FIRST} -e {PLAIN_LAST} {DAG}",
}
PLAIN_COMMAND = PLAIN_COMMANDS[3 if AIRFLOW_V3 else 2]
#: The midnight runs of the range's three days, already there. Airflow 3.3 leaves a failed run out
#: of a backfill without --reprocess-behavior; Airflow 2.11 takes every existing run into its backfill
#: but runs none of the tasks that already ended (a failed task stops a plain 2.11 backfill with
#: BackfillUnfinished, as the README says, so there the runs that are not rerun are successful ones).
#: The last day's midnight is its only run in the range: the day before reads it forward.
PLAIN_EARLIER_STATE = "failed" if AIRFLOW_V3 else "success"
PLAIN_EARLIER = [f"{PLAIN_FIRST + dt.timedelta(days=n)}T00:00:00+00:00" for n in (0, 1, 2)]


def test_the_readme_gives_the_plain_backfill_commands_as_tested():
    readme = (REPO / "README.md").read_text()
    for command in PLAIN_COMMANDS.values():
        assert f"\n{command}\n" in readme, command


def test_a_plain_backfill_reads_every_day_whatever_runs_its_midnights_already_have(
    stack, usage_redis, usage_table, metadata, query
):
    days = [PLAIN_FIRST + dt.timedelta(days=n) for n in range(-1, (PLAIN_LAST - PLAIN_FIRST).days + 1)]
    for n, day in enumerate(days):
        usage_redis.incrby(f"usage:acme:{day}:queries", 10 * n + 1)
    broken = {f"usage:broken:{when[:10]}:queries": 7 for when in PLAIN_EARLIER}
    if PLAIN_EARLIER_STATE == "failed":  # a new bad key on each of those days fails its midnight run
        for key in broken:
            usage_redis.set(key, "NaN")

    stack.unpause(DAG)
    date_flag = "--logical-date" if AIRFLOW_V3 else "--exec-date"
    for when in PLAIN_EARLIER:
        stack.airflow("dags", "trigger", DAG, date_flag, when)
        finished = wait_for(
            metadata,
            lambda r, when=when: r.get(when, ("", ""))[1] in ("success", "failed"),
            f"run {when}",
            days=(PLAIN_FIRST, PLAIN_LAST),
        )
    assert {when: state for when, (_, state) in finished.items()} == dict.fromkeys(PLAIN_EARLIER, PLAIN_EARLIER_STATE)

    # After the outage: the bad keys are mended and every day counted more, so only a read after now is right.
    for key, value in broken.items():
        usage_redis.set(key, value)
    for day in days:
        usage_redis.incrby(f"usage:acme:{day}:queries", 1000)
    expected = {
        (key.split(":")[1], key.split(":")[2], key.split(":")[3]): int(usage_redis.get(key))
        for key in (k.decode() for k in usage_redis.scan_iter("usage:*:*:queries"))
        if PLAIN_FIRST.isoformat() <= key.split(":")[2] <= PLAIN_LAST.isoformat()
    }

    done = stack.backfill(*PLAIN_COMMAND.split()[1:])
    hours = (PLAIN_LAST - PLAIN_FIRST).days * 24 + 1
    column = "logical_date" if AIRFLOW_V3 else "execution_date"
    window = (DAG, f"{PLAIN_FIRST}T00:00:00+00:00", f"{PLAIN_LAST}T00:00:00+00:00")
    deadline = time.monotonic() + (900 if AIRFLOW_V3 else 60)  # Airflow 2's CLI returns when its backfill is done
    while True:
        states = dict(
            metadata(
                f"SELECT state, count(*) FROM dag_run WHERE dag_id = %s AND {column} BETWEEN %s AND %s GROUP BY state",
                window,
            )
        )
        if sum(states.values()) == hours and set(states) <= {"success", "failed"}:
            break
        assert time.monotonic() < deadline, f"{states}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        time.sleep(3)
    # 3.3 keeps the failed runs as they were (they are not part of its backfill); every other run succeeds.
    left_out = len(PLAIN_EARLIER)
    assert states == ({"success": hours - left_out, "failed": left_out} if AIRFLOW_V3 else {"success": hours}), states

    rows = {
        (merchant, day, metric): quantity
        for merchant, day, metric, quantity in query(
            f"SELECT merchant_id, usage_date::text, metric_type, quantity FROM {usage_table} "
            "WHERE usage_date BETWEEN %s AND %s",
            (PLAIN_FIRST, PLAIN_LAST),
        )
    }
    assert rows == expected, f"--- {PLAIN_COMMAND} ---\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
