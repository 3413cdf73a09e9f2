"""The hourly DAG on a real Redis Cluster through RedisHook's cluster mode, with and without fan-out."""

from __future__ import annotations

import json

import pendulum

from tests.dags.conftest import load_dagbag, run_dag
from tests.integration.test_cluster import DAY, rows, seed

LOGICAL_DATE = pendulum.datetime(DAY.year, DAY.month, DAY.day, tz="UTC")


def _point_at_cluster(monkeypatch, redis_cluster) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_USAGE_REDIS",
        json.dumps({"conn_type": "redis", "host": "127.0.0.1", "port": redis_cluster.ports[0], "extra": {"cluster": True}}),
    )


def test_fan_out_is_off_by_default():
    dag = load_dagbag().get_dag("usage_aggregation")
    assert "plan_redis_partitions" not in dag.task_ids
    assert not any(getattr(task, "_is_mapped", False) for task in dag.tasks)


def test_one_task_per_day_on_a_cluster_through_redis_hook(monkeypatch, redis_cluster, cluster_client, usage_env, query):
    _point_at_cluster(monkeypatch, redis_cluster)
    seed(cluster_client, bad_keys=False)  # bad keys fail a run by design; not the point here
    states = run_dag("usage_aggregation", logical_date=LOGICAL_DATE)
    assert states == {
        "aggregate_previous_day": "success", "aggregate_current_day": "success",
    }  # fmt: skip
    assert rows(query, usage_env)  # the day's and the day before's keys


def test_fanned_out_over_the_primaries_the_totals_equal_a_single_task_run(
    monkeypatch, redis_cluster, cluster_client, usage_env, pg_schema, query
):
    _point_at_cluster(monkeypatch, redis_cluster)
    seed(cluster_client, bad_keys=False)  # bad keys fail a run by design; not the point here
    run_dag("usage_aggregation", logical_date=LOGICAL_DATE)
    single_task = _totals(query, usage_env)

    fanned_table = f"{pg_schema}.fanned_out"
    monkeypatch.setenv("USAGE_AGG_TABLE", fanned_table)
    monkeypatch.setenv("USAGE_AGGREGATION_FAN_OUT", "redis_primaries")
    states = run_dag("usage_aggregation", logical_date=LOGICAL_DATE)
    assert states == {
        "plan_redis_partitions": "success",
        **{f"aggregate_{day}_day[{i}]": "success" for day in ("previous", "current") for i in range(3)},
    }
    assert _totals(query, fanned_table) == single_task
    parts = query(
        f"SELECT task_id, redis_partition, partition_count, keys_found FROM {pg_schema}.usage_aggregation_runs "
        "WHERE redis_partition IS NOT NULL AND usage_date = %s",
        (DAY,),
    )
    assert sorted(task for task, *_ in parts) == [f"aggregate_current_day[{i}]" for i in range(3)]
    assert sorted(part for _, part, _, _ in parts) == sorted(f"127.0.0.1:{port}" for port in redis_cluster.ports)
    assert {count for _, _, count, _ in parts} == {3}
    assert all(keys > 0 for *_, keys in parts)


def _totals(query, table) -> dict:
    return {
        (m, d.isoformat(), t): q
        for m, d, t, q in query(f"SELECT merchant_id, usage_date, metric_type, quantity FROM {table}")
    }


def test_an_unknown_fan_out_mode_is_an_import_error_naming_the_setting(monkeypatch):
    monkeypatch.setenv("USAGE_AGGREGATION_FAN_OUT", "per_merchant")
    errors = load_dagbag().import_errors
    assert any("USAGE_AGGREGATION_FAN_OUT: must be one of off, redis_primaries" in e for e in errors.values()), errors


def test_fanned_out_every_aggregation_is_still_a_leaf(monkeypatch):
    monkeypatch.setenv("USAGE_AGGREGATION_FAN_OUT", "redis_primaries")
    dag = load_dagbag().get_dag("usage_aggregation")
    assert {t.task_id for t in dag.leaves} == {"aggregate_previous_day", "aggregate_current_day"}
    assert dag.get_task("aggregate_current_day").upstream_task_ids == {"plan_redis_partitions"}
