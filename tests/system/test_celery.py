"""The hourly DAG fanned out over a real Redis Cluster by the real CeleryExecutor, on two workers.

The deployment (``celery_stack`` in conftest.py): a scheduler (and on 3.3 the API server
and DAG processor), two ``airflow celery worker`` processes with hostnames of their own,
the broker on a Redis database of its own, Celery's results in the metadata PostgreSQL,
and ``USAGE_AGGREGATION_FAN_OUT=redis_primaries`` with the usage connection pointing at
the local three-primary cluster (tests/redis_cluster.py).
"""

from __future__ import annotations

import datetime as dt
import shlex
import subprocess

import pytest
import redis
from redis.cluster import RedisCluster
from tests.conftest import pg_connect
from tests.system.merchant_runs import wait_for_run
from tests.system.stack import AIRFLOW_V3, REPO

from usage_agg.aggregate import aggregate_day
from usage_agg.tracking import track_usage

pytestmark = pytest.mark.system

DAG_ID = "usage_aggregation"
#: the run's day; the run aggregates it and the day before
RUN_DAY = dt.date(2025, 11, 2)
DAYS = (RUN_DAY - dt.timedelta(days=1), RUN_DAY)
MERCHANTS = 1_000  # x 2 metrics x 2 days: 4,000 keys over the three primaries
LOGICAL_DATE = f"{RUN_DAY.isoformat()}T00:00:00+00:00"
TRIGGER_COMMAND = (
    f"airflow dags trigger {DAG_ID} --logical-date {LOGICAL_DATE}"
    if AIRFLOW_V3
    else f"airflow dags trigger {DAG_ID} -e {LOGICAL_DATE}"
)


@pytest.fixture
def metadata(celery_stack):
    with celery_stack.metadata_queries() as run:
        yield run


@pytest.fixture
def seeded_cluster(redis_cluster):
    """Two days of counters written as applications write them, spread over the three primaries."""
    client = redis_cluster.client()
    client.flushall(target_nodes=RedisCluster.PRIMARIES)
    expected = {}
    for day in DAYS:
        for n in range(MERCHANTS):
            for metric, amount in (("api_calls", n + day.day), ("storage_mb", 3 * n + 1)):
                track_usage(client, f"merchant_{n:04d}", metric, amount, usage_date=day)
                expected[(f"merchant_{n:04d}", day, metric)] = amount
    sizes = [client.dbsize(target_nodes=node) for node in client.get_primaries()]
    assert len(sizes) == 3 and all(size > 0 for size in sizes), sizes
    yield client, expected
    client.flushall(target_nodes=RedisCluster.PRIMARIES)
    client.close()


def _rows(table: str) -> dict:
    conn = pg_connect()
    with conn.cursor() as cur:
        cur.execute(f"SELECT merchant_id, usage_date, metric_type, quantity FROM {table}")
        found = {(m, d, t): q for m, d, t, q in cur.fetchall()}
    conn.close()
    return found


def test_a_fanned_out_run_spreads_over_both_workers_and_writes_what_one_task_writes(
    celery_stack, seeded_cluster, metadata
):
    cluster, expected = seeded_cluster
    celery_stack.unpause(DAG_ID)
    celery_stack.airflow(*shlex.split(TRIGGER_COMMAND)[1:])
    ((run_id,),) = metadata("SELECT run_id FROM dag_run WHERE dag_id = %s AND run_type = 'manual'", (DAG_ID,))
    state = wait_for_run(metadata, run_id, timeout=600, dag_id=DAG_ID)
    tasks = metadata(
        "SELECT task_id, map_index, state, hostname, queue FROM task_instance WHERE dag_id = %s AND run_id = %s",
        (DAG_ID, run_id),
    )
    assert state == "success", tasks

    # Every part of both days ran, each on the worker its queue names (the stack's routing,
    # see CeleryStack), so the two workers shared them.
    mapped = [(task, index, host) for task, index, _, host, _ in tasks if index >= 0]
    assert sorted((task, index) for task, index, _ in mapped) == [
        (f"aggregate_{day}_day", i) for day in ("current", "previous") for i in range(3)
    ], tasks
    assert {state for _, _, state, _, _ in tasks} == {"success"}, tasks
    worker_of_queue = {queue: celery_stack.workers[name] for name, queue in celery_stack.part_queues.items()}
    assert all(host == worker_of_queue.get(queue) for _, index, _, host, queue in tasks if index >= 0), tasks
    assert {host for _, _, host in mapped} == set(celery_stack.workers.values()), tasks
    print("parts per worker:", {host: sum(h == host for *_, h in mapped) for host in celery_stack.workers.values()})

    # The totals: what was seeded, and what one task per day writes (aggregate_day, no partition).
    table = celery_stack.env["USAGE_AGG_TABLE"]
    fanned_out = _rows(table)
    assert fanned_out == expected
    single_table = f"{table.split('.')[0]}.single_task"
    conn = pg_connect()
    for day in DAYS:
        result = aggregate_day(cluster, conn, day, table=single_table)
        assert result.keys_found == 2 * MERCHANTS
    conn.close()
    assert _rows(single_table) == fanned_out

    # One audit row per part and day, each part one primary's share.
    parts = _audit_parts(table, run_id)
    assert sorted(parts) == sorted((day, f"127.0.0.1:{port}") for day in DAYS for port in cluster_ports(cluster))
    assert sum(parts.values()) == 4 * MERCHANTS

    # Celery carried it: its results are in the metadata DB, its messages in the broker's own database.
    (results,) = metadata("SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'")
    assert results[0] >= len(tasks), results
    broker = redis.Redis.from_url(celery_stack.broker_url)
    assert broker.keys("_kombu.binding.*"), "nothing of Celery's in the broker database"
    broker.close()


def cluster_ports(cluster) -> list[int]:
    return [node.port for node in cluster.get_primaries()]


def _audit_parts(table: str, run_id: str) -> dict[tuple[dt.date, str], int]:
    schema = table.split(".")[0]
    conn = pg_connect()
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT usage_date, redis_partition, keys_found FROM {schema}.usage_aggregation_runs "
            "WHERE run_id = %s AND outcome = 'success'",
            (run_id,),
        )
        found = {(day, part): keys for day, part, keys in cur.fetchall()}
    conn.close()
    return found


def test_the_compose_files_worker_healthcheck_answers_for_a_running_worker(celery_stack):
    """docker-compose.yaml's airflow-worker healthcheck, run against this deployment's workers."""
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    kind, command = compose["services"]["airflow-worker"]["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    for node in celery_stack.workers.values():
        # Compose turns $$ into $; in a container the node is celery@ its hostname.
        here = command.replace('"celery@$${HOSTNAME}"', shlex.quote(node))
        assert here != command
        done = subprocess.run(["sh", "-c", here], env=celery_stack.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{node}: OK" in done.stdout, done.stdout
