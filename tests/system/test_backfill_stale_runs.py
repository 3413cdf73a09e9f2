"""Three backfills in a row on Airflow 2.11 leave no finished run in state ``running``.

Airflow 2.11's ``airflow dags backfill`` used to leave, in about half of all week-long
backfills, a run or two whose tasks had all finished in state ``running``: a task that
skipped itself wrote back the run it had loaded at its start. Such a run holds a
``max_active_runs`` slot and can stall the hourly schedule. In a backfill, only the
midnight run reads Redis; on 2.11 the others now succeed at once instead of skipping
(``operators.RedisUsageToPostgresOperator.execute``). This test runs three backfills one
after the other (25 hourly runs each, 23 of them not reading Redis) and marks nothing
itself: every run must end ``success`` on its own, and the totals must equal Redis.

Airflow 3's backfills are run by the scheduler, not the CLI, and never showed this; the
week-long backfill of ``test_backfill.py`` covers them.
"""

from __future__ import annotations

import datetime as dt

import pytest
from tests.system.stack import AIRFLOW_V3

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(AIRFLOW_V3, reason="the stale runs came from Airflow 2's in-process backfill"),
]

DAG = "usage_aggregation"
#: the first day of each backfill: three one-day ranges, apart from every other test's dates
FIRST_DAYS = [dt.date(2025, 10, 1) + dt.timedelta(days=2 * n) for n in range(3)]
RUNS_PER_BACKFILL = 25  # hourly, from the day's midnight to the next one, both included


def backfill_runs(metadata, first: dt.date) -> dict[str, str]:
    """``run_id -> state`` of the backfill runs from ``first`` 00:00 to the next midnight."""
    return dict(
        metadata(
            "SELECT run_id, state FROM dag_run WHERE dag_id = %s AND run_type = 'backfill' "
            "AND execution_date BETWEEN %s AND %s",
            (DAG, f"{first}T00:00:00+00:00", f"{first + dt.timedelta(days=1)}T00:00:00+00:00"),
        )
    )


def runs_left_running_with_every_task_done(metadata) -> list[str]:
    return [
        run_id
        for (run_id,) in metadata(
            "SELECT dr.run_id FROM dag_run dr WHERE dr.dag_id = %s AND dr.run_type = 'backfill' "
            "AND dr.run_id LIKE %s AND dr.state = 'running' AND NOT EXISTS "
            "(SELECT 1 FROM task_instance ti WHERE ti.dag_id = dr.dag_id AND ti.run_id = dr.run_id "
            "AND ti.state NOT IN ('success', 'skipped'))",
            (DAG, "backfill__2025-10-%"),
        )
    ]


def test_three_backfills_in_a_row_leave_no_run_running(stack, usage_redis, usage_table, metadata, query):
    expected = {}
    for n, first in enumerate(FIRST_DAYS):
        for day in (first - dt.timedelta(days=1), first, first + dt.timedelta(days=1)):
            usage_redis.incrby(f"usage:acme:{day}:queries", 100 + n)
            expected[("acme", day.isoformat(), "queries")] = int(usage_redis.get(f"usage:acme:{day}:queries"))
    stack.wait_for_dag(DAG)

    for first in FIRST_DAYS:
        command = ("dags", "backfill", "-s", str(first), "-e", str(first + dt.timedelta(days=1)), DAG)
        done = stack.backfill(*command, timeout=900, check=False)
        assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        # The CLI returns when its backfill is done: every run must have ended by then, by itself.
        stale = runs_left_running_with_every_task_done(metadata)
        assert stale == [], f"backfill from {first} left {len(stale)} finished run(s) running: {stale}"
        states = backfill_runs(metadata, first)
        assert len(states) == RUNS_PER_BACKFILL and set(states.values()) == {"success"}, (
            f"{states}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )

    rows = {
        (merchant, day, metric): quantity
        for merchant, day, metric, quantity in query(
            f"SELECT merchant_id, usage_date::text, metric_type, quantity FROM {usage_table}"
        )
    }
    assert rows == expected
