"""Runs of ``usage_aggregation_merchant`` seen through the metadata DB, and their test data."""

from __future__ import annotations

import time

from tests.conftest import pg_connect

from usage_agg.schema import ensure_schema
from usage_agg.tracking import track_usage

DAG_ID = "usage_aggregation_merchant"
MERCHANT = "acme_electronics_2024"


def seed_two_merchants(stack, usage_redis, usage_table, query):
    """Redis ahead of PostgreSQL for two merchants; only the triggered one may move."""
    stack.unpause(DAG_ID)
    conn = pg_connect()
    ensure_schema(conn, usage_table)
    conn.commit()
    conn.close()
    for merchant in (MERCHANT, "globex"):
        track_usage(usage_redis, merchant, "api_calls", 500, usage_date="2025-11-01")
        query(
            f"INSERT INTO {usage_table} (merchant_id, usage_date, metric_type, quantity) "
            "VALUES (%s, '2025-11-01', 'api_calls', 1) RETURNING 1",
            (merchant,),
        )
    return usage_table


def rows(query, table) -> dict[str, int]:
    return dict(query(f"SELECT merchant_id, quantity FROM {table} WHERE usage_date = '2025-11-01'"))


def manual_runs(metadata) -> list[tuple[str, str]]:
    return metadata(f"SELECT run_id, state FROM dag_run WHERE dag_id = '{DAG_ID}' ORDER BY id")


def wait_for_run(metadata, run_id: str, timeout: float = 180, dag_id: str = DAG_ID) -> str:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        found = metadata("SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s", (dag_id, run_id))
        state = found[0][0] if found else None
        if state in ("success", "failed"):
            return state
        time.sleep(2)
    raise AssertionError(f"run {run_id} still {state} after {timeout} s")


def task_states(metadata, run_id: str) -> dict[str, str]:
    return {
        task if index < 0 else f"{task}[{index}]": state
        for task, index, state in metadata(
            "SELECT task_id, map_index, state FROM task_instance WHERE dag_id = %s AND run_id = %s", (DAG_ID, run_id)
        )
    }
