"""The demo's two ends: seed realistic usage through usage_agg.tracking, then show the table.

Both go through the same Airflow connections the DAGs use (``usage_redis``,
``usage_postgres``), so the demo exercises the real configuration path.
usage: python tools/demo.py seed|show
"""

from __future__ import annotations

import datetime as dt
import random
import sys

from airflow.providers.postgres.hooks.postgres import PostgresHook
from airflow.providers.redis.hooks.redis import RedisHook

from usage_agg.dag_config import postgres_conn_id, redis_conn_id, usage_table
from usage_agg.identifiers import TableName
from usage_agg.tracking import track_usage

MERCHANTS = ["acme_electronics_2024", "globex:eu-west", "initech*labs", "umbrella_café"]
METRICS = {"queries": (200, 2_000), "api_calls": (50, 500), "storage_mb": (1, 20)}
DAYS = 3


def seed() -> None:
    client = RedisHook(redis_conn_id=redis_conn_id()).get_conn()
    rng = random.Random(42)
    today = dt.datetime.now(dt.timezone.utc).date()
    events = 0
    for back in range(DAYS):
        day = today - dt.timedelta(days=back)
        for merchant in MERCHANTS:
            for metric, (low, high) in METRICS.items():
                # many small increments, as an application would send them
                for _ in range(rng.randint(3, 8)):
                    track_usage(client, merchant, metric, rng.randint(low, high) // 5, usage_date=day)
                    events += 1
    print(f"Seeded {events} usage events for {len(MERCHANTS)} merchants over {DAYS} days ending {today}")


def show() -> None:
    table = TableName.parse(usage_table())
    conn = PostgresHook(postgres_conn_id=postgres_conn_id()).get_conn()
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT usage_date, merchant_id, metric_type, quantity FROM {table.quoted}"
            " WHERE usage_date >= current_date - %s ORDER BY 1, 2, 3",
            (DAYS,),
        )
        rows = cur.fetchall()
    conn.close()
    print(f"{'usage_date':<12} {'merchant_id':<24} {'metric_type':<12} {'quantity':>10}")
    for day, merchant, metric, quantity in rows:
        print(f"{day.isoformat():<12} {merchant:<24} {metric:<12} {quantity:>10}")
    print(f"{len(rows)} rows in {table}")
    if len(rows) < DAYS * len(MERCHANTS) * len(METRICS):
        sys.exit("demo: fewer rows than seeded counters")


if __name__ == "__main__":
    {"seed": seed, "show": show}[sys.argv[1]]()
