"""usage-agg benchmark: the package's aggregation against a naive job and the hardware limit.

One run seeds Redis with N keys per day for 7 days (as production holds them), then
measures on this machine, each several times with the median reported:

1. the package's aggregation of one day (aggregate_day, the operator's code path);
2. a naive baseline shaped like the original job: SCAN with the default COUNT, one GET
   per key, one autocommit upsert per key;
3. the raw limit: (a) finding and reading the day's keys alone with the fastest plain
   redis-py loop, (b) writing the same rows alone with COPY into a staging table plus
   one merge;
4. a second aggregation of the same, unchanged day (the hourly case);
5. key discovery alone: the day's index (SSCAN) against SCAN of the whole keyspace;
6. peak memory of the aggregation at N and at 10 x N (in a child process).

Results are ratios measured in the same run; nothing here is asserted.
usage: python bench/run.py [--keys N] [--repeat R] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import psycopg2
import redis

from usage_agg.aggregate import aggregate_day
from usage_agg.keys import build_key, day_pattern, index_key
from usage_agg.tracking import USAGE_KEY_TTL

DAYS = [dt.date(2025, 11, 1) + dt.timedelta(days=i) for i in range(7)]
TARGET = DAYS[3]
METRICS = ("queries", "api_calls", "storage_mb", "events")
SCHEMA = "usage_agg_bench"


def redis_client(db: int) -> redis.Redis:
    return redis.Redis(
        host=os.environ.get("USAGE_AGG_REDIS_HOST", "127.0.0.1"),
        port=int(os.environ.get("USAGE_AGG_REDIS_PORT", "6379")),
        db=db,
    )


def pg_dsn() -> str:
    return (
        f"host={os.environ.get('USAGE_AGG_PG_HOST', '127.0.0.1')} port={os.environ.get('USAGE_AGG_PG_PORT', '5432')} "
        f"user={os.environ.get('USAGE_AGG_PG_USER', 'postgres')} dbname={os.environ.get('USAGE_AGG_PG_DATABASE', 'test')}"
    )


def keys_of_day(day: dt.date, n: int) -> list[str]:
    return [build_key(f"merchant_{i // len(METRICS):07d}", day, METRICS[i % len(METRICS)]) for i in range(n)]


def seed(client: redis.Redis, day: dt.date, n: int) -> None:
    """The end state of usage_agg.tracking (counter, expiry, day index), written in bulk."""
    ttl = int(USAGE_KEY_TTL.total_seconds())
    keys = keys_of_day(day, n)
    for start in range(0, n, 10_000):
        pipe = client.pipeline(transaction=False)
        chunk = keys[start : start + 10_000]
        for offset, key in enumerate(chunk):
            pipe.set(key, (start + offset) % 9_973 + 1, ex=ttl)
        pipe.sadd(index_key(day), *chunk)
        pipe.execute()
    client.expire(index_key(day), ttl)


def fresh_table(conn, name: str) -> str:
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {SCHEMA}.{name}")
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    conn.commit()
    return f"{SCHEMA}.{name}"


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def median_seconds(runs: int, prepare, action) -> float:
    samples = []
    for _ in range(runs):
        prepare()
        samples.append(timed(action))
    return statistics.median(samples)


# -- 1. the package -------------------------------------------------------------------------


def package_run(client, conn, table: str, discovery: str = "auto"):
    return aggregate_day(client, conn, TARGET, table=table, discovery=discovery)


# -- 2. the naive job -------------------------------------------------------------------------


def naive_run(client, conn, table: str) -> None:
    conn.autocommit = True
    with conn.cursor() as cur:
        for key in client.scan_iter(match=day_pattern(TARGET)):
            value = client.get(key)
            _, merchant, day, metric = key.decode().split(":")
            cur.execute(
                f"""INSERT INTO {table} (merchant_id, usage_date, metric_type, quantity) VALUES (%s, %s, %s, %s)
                    ON CONFLICT (merchant_id, usage_date, metric_type)
                    DO UPDATE SET quantity = EXCLUDED.quantity, updated_at = now()""",
                (merchant, day, metric, int(value)),
            )
    conn.autocommit = False


# -- 3. the raw limits ------------------------------------------------------------------------


def raw_read_scan(client) -> int:
    count = 0
    keys = []
    for key in client.scan_iter(match=day_pattern(TARGET), count=5_000):
        keys.append(key)
        if len(keys) == 5_000:
            count += len(client.mget(keys))
            keys = []
    return count + (len(client.mget(keys)) if keys else 0)


def raw_read_index(client) -> int:
    count = 0
    keys = []
    for key in client.sscan_iter(index_key(TARGET), count=5_000):
        keys.append(key)
        if len(keys) == 5_000:
            count += len(client.mget(keys))
            keys = []
    return count + (len(client.mget(keys)) if keys else 0)


def raw_write(conn, table: str, buffer_text: str) -> None:
    with conn.cursor() as cur:
        cur.execute("CREATE TEMPORARY TABLE raw_stage (merchant_id text, metric_type text, quantity bigint) ON COMMIT DROP")
        cur.copy_expert("COPY raw_stage FROM STDIN", io.StringIO(buffer_text))
        cur.execute(
            f"""INSERT INTO {table} (merchant_id, usage_date, metric_type, quantity)
                SELECT merchant_id, %s, metric_type, quantity FROM raw_stage
                ON CONFLICT (merchant_id, usage_date, metric_type) DO UPDATE SET quantity = EXCLUDED.quantity""",
            (TARGET,),
        )
    conn.commit()


# -- 6. memory --------------------------------------------------------------------------------

CHILD = """
import sys, psycopg2, redis, datetime as dt
from usage_agg.aggregate import aggregate_day

def high_water_kib():
    # VmHWM belongs to this process image; ru_maxrss would carry the forking parent's peak over exec
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

client = redis.Redis(host=sys.argv[1], port=int(sys.argv[2]), db=int(sys.argv[3]))
conn = psycopg2.connect(sys.argv[4])
before = high_water_kib()
aggregate_day(client, conn, dt.date.fromisoformat(sys.argv[5]), table=sys.argv[6], discovery=sys.argv[7])
print(before, high_water_kib())
"""


def peak_memory_kib(db: int, day: dt.date, table: str, discovery: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, os.environ.get("USAGE_AGG_REDIS_HOST", "127.0.0.1"),
         os.environ.get("USAGE_AGG_REDIS_PORT", "6379"), str(db), pg_dsn(), day.isoformat(), table, discovery],
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    return int(out[1])


def updated_tuples(conn, table: str) -> int:
    time.sleep(1.5)  # statistics reach pg_stat_user_tables at most a second after commit
    schema, name = table.split(".")
    with conn.cursor() as cur:
        cur.execute("SELECT n_tup_upd FROM pg_stat_user_tables WHERE schemaname = %s AND relname = %s", (schema, name))
        value = cur.fetchone()[0]
    conn.commit()
    return int(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=200_000, help="keys per day (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement, median reported")
    parser.add_argument("--naive-repeat", type=int, default=1, help="runs of the slow naive baseline")
    parser.add_argument("--redis-db", type=int, default=15, help="emptied before and after (default %(default)s)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    n, runs = args.keys, args.repeat

    client = redis_client(args.redis_db)
    client.flushdb()
    conn = psycopg2.connect(pg_dsn())
    print(f"Seeding {n} keys/day x {len(DAYS)} days into Redis db {args.redis_db} ...", flush=True)
    for day in DAYS:
        seed(client, day, n)

    table = fresh_table(conn, "package")
    aggregate_day(client, conn, TARGET, table=table)  # creates the schema; also warms caches

    def truncate(name=table):
        return lambda: (conn.cursor().execute(f"TRUNCATE {name}"), conn.commit())

    results: dict[str, float] = {}
    results["package"] = median_seconds(runs, truncate(), lambda: package_run(client, conn, table))
    results["package_scan"] = median_seconds(runs, truncate(), lambda: package_run(client, conn, table, "scan"))

    naive_table = fresh_table(conn, "naive")
    aggregate_day(client, conn, DAYS[0], table=naive_table)  # only to create the table
    results["naive"] = median_seconds(args.naive_repeat, truncate(naive_table), lambda: naive_run(client, conn, naive_table))

    results["raw_read_scan"] = median_seconds(runs, lambda: None, lambda: raw_read_scan(client))
    results["raw_read_index"] = median_seconds(runs, lambda: None, lambda: raw_read_index(client))
    results["raw_read"] = min(results["raw_read_scan"], results["raw_read_index"])
    rows = "".join(f"merchant_{i // len(METRICS):07d}\t{METRICS[i % len(METRICS)]}\t{i % 9_973 + 1}\n" for i in range(n))
    raw_table = fresh_table(conn, "raw")
    aggregate_day(client, conn, DAYS[0], table=raw_table)
    results["raw_write"] = median_seconds(runs, truncate(raw_table), lambda: raw_write(conn, raw_table, rows))

    conn.cursor().execute(f"TRUNCATE {table}")
    conn.commit()
    package_run(client, conn, table)
    updates_before = updated_tuples(conn, table)
    with conn.cursor() as cur:
        cur.execute(f"SELECT max(updated_at) FROM {table}")
        stamp_before = cur.fetchone()[0]
    second = [timed(lambda: package_run(client, conn, table)) for _ in range(runs)]
    results["second_run"] = statistics.median(second)
    updates_after = updated_tuples(conn, table)
    with conn.cursor() as cur:
        cur.execute(f"SELECT max(updated_at) FROM {table}")
        stamp_after = cur.fetchone()[0]
    conn.commit()

    results["discover_index"] = median_seconds(runs, lambda: None, lambda: sum(1 for _ in client.sscan_iter(index_key(TARGET), count=5_000)))
    results["discover_scan"] = median_seconds(runs, lambda: None, lambda: sum(1 for _ in client.scan_iter(match=day_pattern(TARGET), count=1_000)))

    big_day = dt.date(2025, 12, 1)
    seed(client, big_day, 10 * n)
    mem_table = fresh_table(conn, "memory")
    aggregate_day(client, conn, DAYS[0], table=mem_table)
    peak_n = peak_memory_kib(args.redis_db, TARGET, mem_table, "auto")
    peak_10n = peak_memory_kib(args.redis_db, big_day, mem_table, "auto")
    client.flushdb()

    def rate(seconds: float) -> str:
        return f"{n / seconds:>12,.0f} keys/s  ({seconds:7.2f} s)"

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, " \
              f"Redis {client.info()['redis_version']}, PostgreSQL {conn.server_version // 10000}"  # fmt: skip
    report = {
        "keys_per_day": n, "days_held": len(DAYS), "runs": runs, "machine": machine,
        "seconds": {k: round(v, 3) for k, v in results.items()},
        "ratios": {
            "package_vs_naive": round(results["naive"] / results["package"], 1),
            "package_vs_raw_read_plus_write": round(results["package"] / (results["raw_read"] + results["raw_write"]), 2),
            "second_run_vs_first": round(results["second_run"] / results["package"], 2),
            "discovery_index_vs_scan": round(results["discover_scan"] / results["discover_index"], 1),
        },
        "second_run_updated_tuples": updates_after - updates_before,
        "second_run_updated_at_unchanged": stamp_before == stamp_after,
        "peak_memory_mib": {"n": round(peak_n / 1024, 1), "10n": round(peak_10n / 1024, 1),
                            "growth": round((peak_10n - peak_n) / 1024, 1)},
    }  # fmt: skip
    print(f"\nusage-agg benchmark: {n:,} keys/day, {len(DAYS)} days held, median of {runs} ({machine})")
    print(f"  package aggregation (index)   {rate(results['package'])}")
    print(f"  package aggregation (SCAN)    {rate(results['package_scan'])}")
    print(f"  naive job                     {rate(results['naive'])}")
    print(f"  raw read (fastest loop)       {rate(results['raw_read'])}")
    print(f"  raw write (COPY + merge)      {rate(results['raw_write'])}")
    print(f"  second run, unchanged day     {rate(results['second_run'])}")
    print(f"  discovery: index {results['discover_index']:.2f} s, SCAN {results['discover_scan']:.2f} s")
    for name, value in report["ratios"].items():
        print(f"  {name:<34}{value}")
    print(f"  second run: {report['second_run_updated_tuples']} tuples updated, "
          f"updated_at unchanged: {report['second_run_updated_at_unchanged']}")  # fmt: skip
    print(f"  peak memory: {report['peak_memory_mib']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    with conn.cursor() as cur:
        cur.execute(f"DROP SCHEMA {SCHEMA} CASCADE")
    conn.commit()


if __name__ == "__main__":
    main()
