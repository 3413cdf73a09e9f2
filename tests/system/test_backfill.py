"""Backfill the hourly DAG over a week with Airflow's own CLI, executed for real.

Airflow 2.11: ``airflow dags backfill`` runs the backfill in the CLI process with
the LocalExecutor. Airflow 3.3: ``airflow backfill create`` only records it; the
running scheduler executes the runs through the API server's execution API.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path

import pytest

from tests.conftest import pg_connect
from tests.system.stack import AIRFLOW_V3, AIRFLOW_VERSION, REPO
from usage_agg.schema import ensure_schema
from usage_agg.tracking import track_usage

pytestmark = pytest.mark.system

ARTIFACTS = Path(os.environ.get("USAGE_AGG_ARTIFACTS", REPO / "build" / "artifacts"))
FIRST, LAST = dt.date(2025, 11, 1), dt.date(2025, 11, 7)
#: a day whose keys Redis no longer holds; its stored rows must survive the backfill
EXPIRED = dt.date(2025, 11, 4)
BACKFILL_COMMANDS = {
    3: f"airflow backfill create --dag-id usage_aggregation --from-date {FIRST} --to-date {LAST}",
    2: f"airflow dags backfill -s {FIRST} -e {LAST} usage_aggregation",
}
BACKFILL_COMMAND = BACKFILL_COMMANDS[3 if AIRFLOW_V3 else 2]
UNPAUSE_COMMAND = "airflow dags unpause usage_aggregation"
#: this test's runs only (other system tests backfill other dates of the same DAG)
IN_RANGE = (
    f"{'logical_date' if AIRFLOW_V3 else 'execution_date'} BETWEEN '{FIRST}T00:00:00+00:00' AND '{LAST}T00:00:00+00:00'"
)


def test_the_readme_shows_the_commands_as_tested():
    readme = (REPO / "README.md").read_text()
    for command in (*BACKFILL_COMMANDS.values(), UNPAUSE_COMMAND):
        assert f"\n{command}\n" in readme, command


def _days(first: dt.date, last: dt.date) -> list[dt.date]:
    return [first + dt.timedelta(days=n) for n in range((last - first).days + 1)]


@pytest.fixture
def week_in_redis(usage_redis, usage_table, query):
    """Counters for the week before and around the range; the expired day only in PostgreSQL."""
    expected = {}
    for n, day in enumerate(_days(FIRST - dt.timedelta(days=1), LAST)):
        if day == EXPIRED:
            continue
        for merchant, metric, amount in (("acme_electronics_2024", "api_calls", 100 + n), ("globex", "storage_mb", 7 * n + 1)):
            track_usage(usage_redis, merchant, metric, amount, usage_date=day)
            expected[(merchant, day.isoformat(), metric)] = amount
    return expected


def _wait_for_backfill_runs(metadata, expected_runs: int, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = dict(
            metadata(
                "SELECT state, count(*) FROM dag_run WHERE dag_id = 'usage_aggregation' "
                f"AND run_type = 'backfill' AND {IN_RANGE} GROUP BY state"
            )
        )
        if sum(states.values()) >= expected_runs and set(states) <= {"success", "failed"}:
            assert states == {"success": expected_runs}, states
            return
        time.sleep(5)
    raise AssertionError(f"backfill runs not finished after {timeout} s: {states}")


def _runs_left_running_with_every_task_done(metadata) -> list[str]:
    """Airflow 2.11's backfill now and then leaves a run whose tasks have all finished in
    state running (seen here in 2 of 5 backfills: 2 of 145 runs each). Its work is done;
    only the run's own state is stale. Named in the test output, and in README.md."""
    return [
        run_id
        for (run_id,) in metadata(
            "SELECT dr.run_id FROM dag_run dr WHERE dr.dag_id = 'usage_aggregation' AND dr.run_type = 'backfill' "
            f"AND dr.{IN_RANGE} AND dr.state = 'running' AND NOT EXISTS (SELECT 1 FROM task_instance ti WHERE ti.dag_id = dr.dag_id "
            "AND ti.run_id = dr.run_id AND ti.state NOT IN ('success', 'skipped'))"
        )
    ]


def test_backfill_a_week_fills_every_day_reading_most_days_once_or_twice(stack, week_in_redis, usage_table, query, metadata):
    schema = usage_table.split(".")[0]
    # The expired day was aggregated long ago; Redis has since dropped its keys.
    conn = pg_connect()
    ensure_schema(conn, usage_table)
    conn.commit()
    conn.close()
    query(
        f"INSERT INTO {usage_table} (merchant_id, usage_date, metric_type, quantity) "
        "VALUES ('acme_electronics_2024', %s, 'api_calls', 4242) RETURNING 1",
        (EXPIRED,),
    )

    stack.wait_for_dag("usage_aggregation")
    if AIRFLOW_V3:  # Airflow 3's scheduler runs no backfill of a paused DAG
        stack.airflow(*UNPAUSE_COMMAND.split()[1:])
    started = time.monotonic()
    done = stack.backfill(*BACKFILL_COMMAND.split()[1:])
    runs_per_day = 24
    expected_runs = (LAST - FIRST).days * runs_per_day + 1  # both ends inclusive, hourly
    # Airflow 2's CLI returns when its backfill is done; Airflow 3's scheduler works on after.
    # Airflow 2.11 used to leave a finished run or two "running" now and then: tasks that
    # skipped themselves wrote back a stale copy of their run. They succeed at once there now.
    stale = [] if AIRFLOW_V3 else _runs_left_running_with_every_task_done(metadata)
    assert stale == [], f"Airflow 2.11 left {len(stale)} finished run(s) in state running: {stale}"
    try:
        _wait_for_backfill_runs(metadata, expected_runs, timeout=900 if AIRFLOW_V3 else 60)
    except AssertionError as err:
        raise AssertionError(f"{err}\n--- {BACKFILL_COMMAND} ---\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}") from None
    seconds = round(time.monotonic() - started)

    rows = {
        (merchant, day, metric): quantity
        for merchant, day, metric, quantity in query(
            f"SELECT merchant_id, usage_date::text, metric_type, quantity FROM {usage_table}"
        )
    }
    in_range = {k: v for k, v in week_in_redis.items() if FIRST.isoformat() <= k[1] <= LAST.isoformat()}
    assert {k: rows.get(k) for k in in_range} == in_range
    assert rows[("acme_electronics_2024", EXPIRED.isoformat(), "api_calls")] == 4242

    reads = dict(
        query(
            f"SELECT usage_date::text, count(*) FROM {schema}.usage_aggregation_runs "
            "WHERE dag_id = 'usage_aggregation' AND run_id LIKE 'backfill%%' AND usage_date BETWEEN %s AND %s "
            "GROUP BY usage_date",
            (FIRST - dt.timedelta(days=1), LAST),
        )
    )
    assert set(reads) >= {day.isoformat() for day in _days(FIRST, LAST)}  # every day, by the backfill
    # Of the 290 tasks, most leave their day to an earlier run of the backfill (usage_agg.backfill);
    # how many read depends on how many earlier runs are still running when a task decides.
    assert sum(reads.values()) < expected_runs, reads
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"backfill-airflow-{AIRFLOW_VERSION}.json").write_text(
        json.dumps({"command": BACKFILL_COMMAND, "runs": expected_runs, "seconds": seconds,
                    "stale_runs_marked": stale, "redis_reads_per_day": reads}, indent=2)  # fmt: skip
    )

    # The tasks that leave their day to an earlier run finish at once: skipped on Airflow 3,
    # succeeded (with the reason as XCom) on 2.11. None fails.
    states = dict(
        metadata(
            "SELECT ti.state, count(*) FROM task_instance ti JOIN dag_run dr ON dr.dag_id = ti.dag_id "
            "AND dr.run_id = ti.run_id WHERE ti.dag_id = 'usage_aggregation' AND dr.run_type = 'backfill' "
            f"AND dr.{IN_RANGE} GROUP BY ti.state"
        )
    )
    assert set(states) <= {"success", "skipped"} and sum(states.values()) == 2 * expected_runs, states

    expired_log = _task_log(stack, f"{EXPIRED}T00:00:00+00:00", "aggregate_current_day")
    assert f"No usage keys in Redis for {EXPIRED}" in expired_log
    assert "stored rows are left as they are" in expired_log


def _task_log(stack, logical_date: str, task_id: str) -> str:
    folder = stack.home / "logs" / "dag_id=usage_aggregation"
    matches = [p for p in folder.glob(f"run_id=backfill__{logical_date}*/task_id={task_id}/attempt=*.log")]
    assert matches, sorted(p.name for p in folder.iterdir())
    return "\n".join(p.read_text() for p in matches)
