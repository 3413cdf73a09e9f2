"""Both DAGs end to end with ``dag.test()`` against the real Redis and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import re

import pendulum
import pytest

from tests.dags.conftest import run_dag
from usage_agg.tracking import track_usage


def totals(query, table) -> dict[tuple[str, str, str], int]:
    return {
        (m, d.isoformat(), t): q
        for m, d, t, q in query(f"SELECT merchant_id, usage_date, metric_type, quantity FROM {table}")
    }


def test_hourly_run_aggregates_its_day_and_the_day_before(redis_client, usage_env, query):
    track_usage(redis_client, "acme", "queries", 5, usage_date="2025-11-01")  # includes 23:00-24:00
    track_usage(redis_client, "acme", "queries", 6, usage_date="2025-11-02")
    track_usage(redis_client, "acme", "queries", 7, usage_date="2025-10-31")  # out of this run's reach
    states = run_dag("usage_aggregation", logical_date=pendulum.datetime(2025, 11, 2, 0, tz="UTC"))
    assert states == {"aggregate_previous_day": "success", "aggregate_current_day": "success"}
    assert totals(query, usage_env) == {
        ("acme", "2025-11-01", "queries"): 5,
        ("acme", "2025-11-02", "queries"): 6,
    }
    runs = query(f"SELECT dag_id, task_id, usage_date, outcome FROM {usage_env.split('.')[0]}.usage_aggregation_runs")
    assert sorted(runs) == [
        ("usage_aggregation", "aggregate_current_day", dt.date(2025, 11, 2), "success"),
        ("usage_aggregation", "aggregate_previous_day", dt.date(2025, 11, 1), "success"),
    ]


def test_rerunning_the_hourly_dag_never_double_counts(redis_client, usage_env, query):
    track_usage(redis_client, "acme", "queries", 5, usage_date="2025-11-02")
    for hour in (1, 2, 2):
        run_dag("usage_aggregation", logical_date=pendulum.datetime(2025, 11, 2, hour, tz="UTC"))
    assert totals(query, usage_env) == {("acme", "2025-11-02", "queries"): 5}


def test_a_run_without_logical_date_aggregates_today_and_yesterday_utc(redis_client, usage_env, query):
    today = dt.datetime.now(dt.timezone.utc).date()
    yesterday = today - dt.timedelta(days=1)
    track_usage(redis_client, "acme", "queries", 3, usage_date=today)
    track_usage(redis_client, "acme", "queries", 4, usage_date=yesterday)
    states = run_dag("usage_aggregation", logical_date=None)
    assert set(states.values()) == {"success"}
    assert totals(query, usage_env) == {
        ("acme", today.isoformat(), "queries"): 3,
        ("acme", yesterday.isoformat(), "queries"): 4,
    }


def test_a_new_bad_key_fails_once_without_retry_and_good_keys_are_committed(redis_client, usage_env, query):
    # Both written by another writer than usage_agg.tracking: no day index, so SCAN finds both.
    redis_client.incrby("usage:acme:2025-11-02:queries", 5)
    redis_client.set("usage:broken:2025-11-02:queries", "not-a-number")
    dag = "usage_aggregation"
    first = run_dag(dag, logical_date=pendulum.datetime(2025, 11, 2, 3, tz="UTC"))
    assert first == {"aggregate_previous_day": "success", "aggregate_current_day": "failed"}
    assert totals(query, usage_env) == {("acme", "2025-11-02", "queries"): 5}
    schema = usage_env.split(".")[0]
    assert query(f"SELECT redis_key, reason FROM {schema}.usage_aggregation_errors") == [
        ("usage:broken:2025-11-02:queries", "value is not a non-negative integer")
    ]
    # one attempt only: bad data is not retried
    assert query(f"SELECT count(*) FROM {schema}.usage_aggregation_runs WHERE usage_date = '2025-11-02'") == [(1,)]

    second = run_dag(dag, logical_date=pendulum.datetime(2025, 11, 2, 4, tz="UTC"))
    assert second == {"aggregate_previous_day": "success", "aggregate_current_day": "success"}


def test_merchant_rerun_touches_that_merchant_alone(redis_client, usage_env, query):
    for merchant in ("a*", "a", "ab"):
        track_usage(redis_client, merchant, "queries", 1, usage_date="2025-11-01")
    run_dag("usage_aggregation", logical_date=pendulum.datetime(2025, 11, 1, 12, tz="UTC"))
    for merchant in ("a*", "a", "ab"):
        track_usage(redis_client, merchant, "queries", 10, usage_date="2025-11-01")

    states = run_dag("usage_aggregation_merchant", conf={"merchant_id": "a*", "date": "2025-11-01"})
    assert states == {"validate_request": "success", "aggregate_merchant_day[0]": "success"}
    assert totals(query, usage_env) == {
        ("a*", "2025-11-01", "queries"): 11,
        ("a", "2025-11-01", "queries"): 1,
        ("ab", "2025-11-01", "queries"): 1,
    }


def test_merchant_rerun_over_a_range_with_decrease_allowed(redis_client, usage_env, query):
    for day in ("2025-11-01", "2025-11-02", "2025-11-03"):
        track_usage(redis_client, "acme", "queries", 10, usage_date=day)
    dag = "usage_aggregation_merchant"
    run_dag(dag, conf={"merchant_id": "acme", "date": "2025-11-01", "end_date": "2025-11-03"})
    redis_client.set("usage:acme:2025-11-02:queries", 4)

    refused = run_dag(dag, conf={"merchant_id": "acme", "date": "2025-11-02"})
    assert refused == {"validate_request": "success", "aggregate_merchant_day[0]": "success"}
    assert totals(query, usage_env)[("acme", "2025-11-02", "queries")] == 10

    states = run_dag(
        dag, conf={"merchant_id": "acme", "date": "2025-11-01", "end_date": "2025-11-03", "allow_decrease": True}
    )
    assert states == {
        "validate_request": "success",
        "aggregate_merchant_day[0]": "success",
        "aggregate_merchant_day[1]": "success",
        "aggregate_merchant_day[2]": "success",
    }
    assert totals(query, usage_env) == {
        ("acme", "2025-11-01", "queries"): 10,
        ("acme", "2025-11-02", "queries"): 4,
        ("acme", "2025-11-03", "queries"): 10,
    }


def test_a_range_over_every_merchant_in_one_run(redis_client, usage_env, query):
    """The original job's aggregate-range FROM TO: one mapped task per date, every merchant."""
    for day in ("2025-11-01", "2025-11-02", "2025-11-03"):
        for merchant in ("acme", "globex", "a*b"):
            track_usage(redis_client, merchant, "queries", 2, usage_date=day)
    track_usage(redis_client, "acme", "queries", 9, usage_date="2025-11-04")  # outside the range
    states = run_dag(
        "usage_aggregation_merchant", conf={"all_merchants": True, "date": "2025-11-01", "end_date": "2025-11-03"}
    )
    assert states == {
        "validate_request": "success",
        "aggregate_merchant_day[0]": "success",
        "aggregate_merchant_day[1]": "success",
        "aggregate_merchant_day[2]": "success",
    }
    assert totals(query, usage_env) == {
        (merchant, day, "queries"): 2
        for day in ("2025-11-01", "2025-11-02", "2025-11-03")
        for merchant in ("acme", "globex", "a*b")
    }
    schema = usage_env.split(".")[0]
    assert query(f"SELECT DISTINCT merchant_id FROM {schema}.usage_aggregation_runs") == [(None,)]  # whole days


def test_a_merchant_id_that_looks_like_a_template_is_taken_literally(redis_client, usage_env, query):
    merchant = "{{ ds }}:{{ conn.usage_postgres.password }}"
    track_usage(redis_client, merchant, "queries", 2, usage_date="2025-11-01")
    states = run_dag("usage_aggregation_merchant", conf={"merchant_id": merchant, "date": "2025-11-01"})
    assert set(states.values()) == {"success"}
    assert totals(query, usage_env) == {(merchant, "2025-11-01", "queries"): 2}


SCHEMA_REFUSALS = [
    ({"merchant_id": "", "date": "2025-11-01"}, "merchant_id"),
    ({"merchant_id": "acme", "date": "2025/11/01"}, "date"),
    ({"merchant_id": "acme", "date": "2025-11-01", "end_date": "tomorrow"}, "end_date"),
]


@pytest.mark.parametrize(("conf", "field"), SCHEMA_REFUSALS)
def test_conf_the_form_schema_can_judge_is_refused_before_any_run(redis_client, usage_env, query, conf, field):
    from airflow.providers.common.compat.sdk import ParamValidationError

    track_usage(redis_client, "acme", "queries", 1, usage_date="2025-11-01")
    with pytest.raises(ParamValidationError, match=field):
        run_dag("usage_aggregation_merchant", conf=conf)
    assert query("SELECT to_regclass(%s)", (usage_env,)) == [(None,)]  # nothing touched, not even DDL


def _future(days: int) -> str:
    return (dt.datetime.now(dt.timezone.utc).date() + dt.timedelta(days=days)).isoformat()


RUN_REFUSALS = [
    ({"date": "2025-11-01"}, "merchant_id"),
    ({"merchant_id": "acme", "all_merchants": True, "date": "2025-11-01"}, "all_merchants"),
    ({"merchant_id": "acme", "date": "2025-11-05", "end_date": "2025-11-04"}, "end_date"),
    ({"merchant_id": "acme", "date": "2025-10-01", "end_date": "2025-11-01"}, "end_date"),
    ({"merchant_id": "acme", "date": "FUTURE"}, "date"),
]


@pytest.mark.parametrize(("conf", "field"), RUN_REFUSALS)
def test_conf_needing_both_dates_or_today_fails_the_first_task(
    redis_client, usage_env, query, conf, field, capfd
):
    conf = {k: (_future(2) if v == "FUTURE" else v) for k, v in conf.items()}
    track_usage(redis_client, "acme", "queries", 1, usage_date="2025-11-01")
    states = run_dag("usage_aggregation_merchant", conf=conf)
    assert states["validate_request"] == "failed"
    assert not any(k.startswith("aggregate_merchant_day[") for k in states)
    assert query("SELECT to_regclass(%s)", (usage_env,)) == [(None,)]
    # dag.test() prints task logs to this process's stdout on both majors (Airflow 2 through a
    # stdlib handler, Airflow 3 through structlog, which caplog never sees): the task's own
    # failure, not the alert line that repeats its reason.
    task_log = capfd.readouterr().out
    assert re.search(rf"AirflowFailException: Refused: {field}: ", task_log), task_log[-3000:]
