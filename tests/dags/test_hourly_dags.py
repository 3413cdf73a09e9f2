"""Both aggregation DAGs write the hourly rows beside the daily ones, under Airflow itself."""

from __future__ import annotations

import datetime as dt

import pendulum

from tests.dags.conftest import run_dag
from usage_agg.tracking import track_usage

UTC = dt.timezone.utc


def hours(query, table) -> dict[tuple[str, str], int]:
    return {
        (m, h.astimezone(UTC).strftime("%Y-%m-%dT%H")): q
        for m, h, q in query(f"SELECT merchant_id, usage_hour, quantity FROM {table}_hourly")
    }


def test_the_hourly_dag_and_the_rerun_form_write_hourly_rows(redis_client, usage_env, query):
    track_usage(redis_client, "acme", "queries", 4, at=dt.datetime(2025, 11, 2, 6, 10, tzinfo=UTC))
    track_usage(redis_client, "globex", "queries", 1, at=dt.datetime(2025, 11, 1, 22, 0, tzinfo=UTC))
    states = run_dag("usage_aggregation", logical_date=pendulum.datetime(2025, 11, 2, 7, tz="UTC"))
    assert set(states.values()) == {"success"}
    assert hours(query, usage_env) == {("acme", "2025-11-02T06"): 4, ("globex", "2025-11-01T22"): 1}

    track_usage(redis_client, "acme", "queries", 3, at=dt.datetime(2025, 11, 2, 9, 59, tzinfo=UTC))
    states = run_dag("usage_aggregation_merchant", conf={"merchant_id": "acme", "date": "2025-11-02"})
    assert set(states.values()) == {"success"}
    assert hours(query, usage_env) == {
        ("acme", "2025-11-02T06"): 4, ("acme", "2025-11-02T09"): 3, ("globex", "2025-11-01T22"): 1,
    }  # fmt: skip
