"""Data-aware downstream with the real scheduler: the example invoice DAG runs for exactly the changed dates.

A range rerun of every merchant writes three dates, then, after one date's counters
grew, the same range again: only that date changed. On Airflow 3 the invoice DAG is
scheduled on the usage asset's partitions (one run per changed date, none for the
unchanged ones); on Airflow 2, whose runs' triggering events are not exact (one can be
left out of every run, or counted by a later run), the events only start runs, and a run
recomputes the dates written lately whose totals are out of step.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.dags.conftest import AIRFLOW_V3
from tests.system.conftest import POOL_COMMAND
from tests.system.merchant_runs import DAG_ID, manual_runs, task_states, wait_for_run
from tests.system.stack import REPO
from usage_agg.tracking import track_usage

pytestmark = pytest.mark.system

INVOICES = "usage_invoice_totals"
DATES = ("2025-11-01", "2025-11-02", "2025-11-03")


def invoice_runs(metadata) -> list[tuple]:
    """``(run_id, state, partition_key)`` of the invoice DAG's runs, oldest first (no key on Airflow 2)."""
    key = "partition_key" if AIRFLOW_V3 else "NULL"
    return metadata(f"SELECT run_id, state, {key} FROM dag_run WHERE dag_id = %s ORDER BY id", (INVOICES,))


def computed_by(query, table) -> dict[str, set[str]]:
    """Which invoice run computed each date's totals."""
    schema = table.split(".")[0]
    found: dict[str, set[str]] = {}
    if query("SELECT to_regclass(%s)", (f"{schema}.usage_invoice_totals",)) == [(None,)]:
        return found  # no invoice run has created it yet
    for day, run_id in query(f"SELECT usage_date::text, computed_by_run FROM {schema}.usage_invoice_totals"):
        found.setdefault(day, set()).add(run_id)
    return found


def rerun_range(stack, metadata) -> None:
    before = {run_id for run_id, _ in manual_runs(metadata)}
    conf = {"all_merchants": True, "date": DATES[0], "end_date": DATES[-1]}
    stack.airflow("dags", "trigger", DAG_ID, "--conf", json.dumps(conf))
    (run_id,) = [run_id for run_id, _ in manual_runs(metadata) if run_id not in before]
    assert wait_for_run(metadata, run_id) == "success", task_states(metadata, run_id)


def settle(metadata, until, timeout: float = 180, quiet: float = 15) -> list[tuple]:
    """Wait until ``until(runs)`` holds with every invoice run finished, then ``quiet`` s more: nothing new starts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = invoice_runs(metadata)
        if until(runs) and all(state in ("success", "failed") for _, state, _ in runs):
            time.sleep(quiet)
            later = invoice_runs(metadata)
            assert later == runs, f"more invoice runs after the expected ones: {later[len(runs):]}"
            return runs
        time.sleep(2)
    raise AssertionError(f"invoice runs never settled: {invoice_runs(metadata)}")


def test_the_invoice_dag_runs_for_exactly_the_dates_that_changed(stack, usage_redis, usage_table, metadata, query):
    for dag_id in (INVOICES, DAG_ID):
        stack.unpause(dag_id)
    for day in DATES:
        track_usage(usage_redis, "acme", "queries", 10, usage_date=day)
        track_usage(usage_redis, "globex", "queries", 20, usage_date=day)
    rows = {day: {("acme", 10), ("globex", 20)} for day in DATES}
    old_runs = len(invoice_runs(metadata))

    rerun_range(stack, metadata)  # three dates written
    if AIRFLOW_V3:
        first = settle(metadata, lambda runs: len(runs) - old_runs >= 3)[old_runs:]
        assert sorted(key for _, _, key in first) == list(DATES)
    else:
        first = settle(metadata, lambda runs: set(computed_by(query, usage_table)) == set(DATES))[old_runs:]
    assert {state for _, state, _ in first} == {"success"}, first
    first_by_date = computed_by(query, usage_table)

    track_usage(usage_redis, "acme", "queries", 5, usage_date="2025-11-02")  # only this date grows
    rows["2025-11-02"] = {("acme", 15), ("globex", 20)}
    rerun_range(stack, metadata)  # the same three dates: one changed
    if AIRFLOW_V3:
        second = settle(metadata, lambda runs: len(runs) - old_runs >= 4)[old_runs + len(first) :]
        assert [(state, key) for _, state, key in second] == [("success", "2025-11-02")]
    else:
        settle(metadata, lambda runs: computed_by(query, usage_table)["2025-11-02"] != first_by_date["2025-11-02"])

    after = computed_by(query, usage_table)
    assert after["2025-11-01"] == first_by_date["2025-11-01"] and after["2025-11-03"] == first_by_date["2025-11-03"]
    assert after["2025-11-02"] != first_by_date["2025-11-02"]
    schema = usage_table.split(".")[0]
    totals = query(f"SELECT usage_date::text, merchant_id, quantity FROM {schema}.usage_invoice_totals")
    assert {day: {(m, q) for d, m, q in totals if d == day} for day in DATES} == rows
    # Every task ran in the pool the README has the deployment create and name.
    pools = metadata("SELECT DISTINCT pool FROM task_instance WHERE dag_id IN (%s, %s)", (DAG_ID, INVOICES))
    assert pools == [("usage_agg",)]


def test_the_readme_shows_the_pool_command_as_tested():
    assert f"\n{POOL_COMMAND}\n" in (REPO / "README.md").read_text()
