"""One day of usage on a Redis Cluster: one task against the fan-out over two Celery workers.

The deployment is the Celery system test's (tests/system/stack.py ``CeleryStack``): a
scheduler (and on Airflow 3 the API server and DAG processor), two ``airflow celery
worker`` processes of concurrency 1, the broker on a Redis database of its own, results
in a metadata PostgreSQL database created here; the usage Redis is a local three-primary
Redis Cluster (tests/redis_cluster.py). ``--keys`` counters (default 1,000,000) are
written for one day, spread over the primaries by their slots, as ``bench/run.py`` seeds
them (counter, expiry, the day's index).

Then the hourly DAG ``usage_aggregation`` runs twice for that day, each time into a fresh
table, on a fresh deployment: with ``USAGE_AGGREGATION_FAN_OUT=off`` (one task reads the
whole day) and with ``redis_primaries`` (one mapped task per primary; three parts on two
workers). Wall time comes from the audit table (``usage_aggregation_runs``): the single
task's ``finished_at - started_at``, and for the fan-out the first part's start to the
last part's finish; each part's own time and its worker (the task instance's hostname)
are printed too, and Airflow's task instance durations beside them.

Nothing is asserted; both runs must write the same rows (checked, and printed).
usage: tools/airflow-env.sh 3.3 python bench/celery_fan_out.py [--keys N] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg2
import redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from run import seed  # noqa: E402 - bench/run.py, beside this file
from tests.redis_cluster import LocalRedisCluster  # noqa: E402
from tests.system.stack import AIRFLOW_V3, AIRFLOW_VERSION, CeleryStack  # noqa: E402

DAG_ID = "usage_aggregation"
DAY = dt.date(2025, 11, 4)
BROKER_DB = 8  # a database of its own: not the Celery system test's broker (14) nor any tier's

REDIS_HOST = os.environ.get("USAGE_AGG_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("USAGE_AGG_REDIS_PORT", "6379"))
PG_HOST = os.environ.get("USAGE_AGG_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("USAGE_AGG_PG_PORT", "5432"))
PG_USER = os.environ.get("USAGE_AGG_PG_USER", "postgres")
PG_DATABASE = os.environ.get("USAGE_AGG_PG_DATABASE", "test")


def pg(dbname: str = PG_DATABASE):
    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname)
    conn.autocommit = True
    return conn


def sql(conn, statement: str, params=None) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(statement, params)
        return cur.fetchall() if cur.description else []


def run_once(cluster: LocalRedisCluster, fan_out: str, schema: str, workdir: Path) -> dict:
    """A fresh Celery deployment with this fan-out; one triggered run of DAY; its timings.

    The usage table, and so its audit, is in ``schema`` of this run's own (Airflow 2's run ids
    are the same in both deployments)."""
    metadata_db = f"airflow_meta_{uuid.uuid4().hex[:10]}"
    admin = pg()
    sql(admin, f'CREATE DATABASE "{metadata_db}"')
    broker = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=BROKER_DB)
    broker.flushdb()
    table = f"{schema}.merchant_usage"
    home = workdir / f"airflow-{fan_out}"
    home.mkdir()
    stack = CeleryStack(
        home,
        f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{metadata_db}",
        {
            "AIRFLOW_CONN_USAGE_REDIS": json.dumps(
                {"conn_type": "redis", "host": "127.0.0.1", "port": cluster.ports[0], "extra": {"cluster": True}}
            ),
            "AIRFLOW_CONN_USAGE_POSTGRES": json.dumps(
                {"conn_type": "postgres", "host": PG_HOST, "port": PG_PORT, "login": PG_USER, "schema": PG_DATABASE}
            ),
            "USAGE_AGG_TABLE": table,
            "USAGE_AGGREGATION_FAN_OUT": fan_out,
        },
        broker_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/{BROKER_DB}",
    )
    meta = None
    load_before = [round(x, 2) for x in os.getloadavg()]
    try:
        stack.migrate()
        stack.start()
        meta = pg(metadata_db)
        stack.wait_for_dag(DAG_ID)
        stack.airflow("dags", "unpause", DAG_ID)
        # Unpausing creates the latest scheduled run (today and yesterday: no keys); let it finish first.
        wait_until(lambda: not sql(meta, "SELECT 1 FROM dag_run WHERE state IN ('queued', 'running')"), 600)
        logical_date = f"{(DAY + dt.timedelta(days=1)).isoformat()}T00:00:00+00:00"  # its day before is DAY
        stack.airflow("dags", "trigger", DAG_ID, "--logical-date" if AIRFLOW_V3 else "-e", logical_date)
        ((run_id,),) = sql(meta, "SELECT run_id FROM dag_run WHERE run_type = 'manual'")
        wait_until(lambda: sql(meta, "SELECT state FROM dag_run WHERE run_id = %s", (run_id,))[0][0]
                   in ("success", "failed"), 3600)  # fmt: skip
        (state,) = sql(meta, "SELECT state FROM dag_run WHERE run_id = %s", (run_id,))[0]
        if state != "success":
            raise RuntimeError(f"run {run_id} {state}:\n" + "\n".join(map(stack.log_tail, stack.processes)))
        tasks = sql(
            meta,
            "SELECT task_id, map_index, hostname, extract(epoch FROM end_date - start_date) FROM task_instance "
            "WHERE run_id = %s AND task_id = 'aggregate_previous_day' ORDER BY map_index",
            (run_id,),
        )
        parts = sql(
            admin,
            f"SELECT task_id, redis_partition, keys_found, started_at, finished_at, "
            f"extract(epoch FROM finished_at - started_at) FROM {schema}.usage_aggregation_runs "
            "WHERE run_id = %s AND usage_date = %s AND outcome <> 'failed' ORDER BY started_at",
            (run_id, DAY),
        )
        (failed,) = sql(admin, f"SELECT count(*) FROM {schema}.usage_aggregation_runs WHERE outcome = 'failed'")[0]
        if failed:  # a retried attempt: the wall time would not be one attempt's
            raise RuntimeError(f"{failed} failed attempt(s) in the audit of run {run_id}")
        wall = (max(p[4] for p in parts) - min(p[3] for p in parts)).total_seconds()
        hosts = {f"{task}[{index}]" if index >= 0 else task: host for task, index, host, _ in tasks}
        return {
            "fan_out": fan_out,
            "wall_seconds": round(wall, 2),
            "keys": sum(p[2] for p in parts),
            "parts": [
                {
                    "task": task,
                    "redis_partition": part,
                    "keys": keys,
                    "seconds": round(float(seconds), 2),
                    "worker": hosts.get(task),
                }
                for task, part, keys, _, _, seconds in parts
            ],
            "task_instance_seconds": {
                (f"[{index}]" if index >= 0 else "single"): round(float(s), 2) for _, index, _, s in tasks
            },
            "rows": sql(admin, f"SELECT count(*), sum(quantity) FROM {table}")[0],
            # The machine is shared: its 1/5/15-minute load before this deployment started.
            "load_average_before": load_before,
        }
    finally:
        stack.stop()
        left = stack.running_pids()
        if meta is not None:
            meta.close()
        sql(admin, f'DROP DATABASE IF EXISTS "{metadata_db}" WITH (FORCE)')
        admin.close()
        broker.flushdb()
        broker.close()
        if left:
            raise RuntimeError(f"Airflow processes left running: {left}")


def wait_until(done, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done after {timeout} s")
        time.sleep(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    schema = f"bench_celery_{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="celery-fan-out-") as tmp:
        workdir = Path(tmp)
        cluster = LocalRedisCluster(workdir / "redis-cluster")
        admin = pg()
        try:
            cluster.start()
            client = cluster.client()
            started = time.monotonic()
            seed(client, DAY, args.keys)
            sizes = {node.port: client.dbsize(target_nodes=node) for node in client.get_primaries()}
            took = time.monotonic() - started
            print(f"seeded {args.keys:,} keys of {DAY} in {took:.0f} s; keys per primary: {sizes}")
            client.close()
            results = [
                run_once(cluster, fan_out, f"{schema}_{fan_out}", workdir) for fan_out in ("off", "redis_primaries")
            ]
        finally:
            cluster.stop()
            for fan_out in ("off", "redis_primaries"):
                sql(admin, f'DROP SCHEMA IF EXISTS "{schema}_{fan_out}" CASCADE')
            admin.close()

    single, fanned = results
    if single["rows"] != fanned["rows"]:
        raise RuntimeError(f"different rows: one task {single['rows']}, fanned out {fanned['rows']}")
    report = {
        "airflow": AIRFLOW_VERSION,
        "keys": args.keys,
        "primaries": 3,
        "workers": 2,
        "worker_concurrency": 1,
        "keys_per_primary": {str(k): v for k, v in sizes.items()},
        "one_task": single,
        "fanned_out": fanned,
        "speedup": round(single["wall_seconds"] / fanned["wall_seconds"], 2),
        "machine": {"cpus": os.cpu_count()},
    }
    print(f"Airflow {AIRFLOW_VERSION}, {args.keys:,} keys of one day over 3 primaries, rows {single['rows']}")
    print(f"  one task                        {single['wall_seconds']:8.1f} s (audit)")
    print(f"  fanned out, 2 workers x 1 slot  {fanned['wall_seconds']:8.1f} s (audit: first part start, last end)")
    for part in fanned["parts"]:
        where = f"{part['task']!s:28s} {part['redis_partition']!s:18s}"
        print(f"    {where} {part['keys']:>9,} keys {part['seconds']:7.1f} s  on {part['worker']}")
    print(f"  one task / fanned out           {report['speedup']:8.2f}")
    print(f"  load average before (1/5/15 min): one task {single['load_average_before']}, "
          f"fanned out {fanned['load_average_before']}")  # fmt: skip
    print(f"  task instance durations (Airflow): one task {single['task_instance_seconds']}, "
          f"fanned out {fanned['task_instance_seconds']}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
