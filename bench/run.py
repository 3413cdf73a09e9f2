"""usage-agg benchmark: the package's aggregation against a naive job and the hardware limit.

One run seeds Redis with N keys per day for 7 days (as production holds them), then
measures on this machine, in rounds (``--repeat``, default 5), each round measuring
everything once, so a ratio is always between measurements taken side by side:

1. the package's aggregation of one day (aggregate_day, the operator's code path),
   finding keys through the day's index, and through SCAN (days of other writers);
2. a naive baseline shaped like the original job: SCAN with the default COUNT, one GET
   per key, one autocommit upsert per key (run ``--naive-repeat`` times: it is slow);
3. the raw limits: (a) finding and reading the day's keys alone with the fastest plain
   redis-py loop, through the index and through SCAN, (b) writing the same rows alone
   with COPY into a staging table plus one merge;
4. a second aggregation of the same, unchanged day (the hourly case);
5. a day whose keys also have hourly counts (8 active hours per key on average):
   daily + hourly against daily only, on the same day;
6. key discovery alone: the day's index (SSCAN) against SCAN of the whole keyspace;
7. peak memory of the aggregation (daily, and daily + hourly) for a day of
   ``--memory-keys`` keys and one of ten times as many, in a child process;
8. with ``--breakdown``, where one aggregation's time goes: the reader thread (Redis),
   the main thread's staging (COPY) and merges (PostgreSQL), and its waits for the reader.

Every ratio is printed as min / median / max over the rounds. Nothing is asserted.
usage: python bench/run.py [--keys N] [--repeat R] [--breakdown] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import io
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

import psycopg2
import redis

from usage_agg.aggregate import aggregate_day
from usage_agg.keys import build_key, day_pattern, hourly_key, index_key
from usage_agg.tracking import USAGE_KEY_TTL

DAYS = [dt.date(2025, 11, 1) + dt.timedelta(days=i) for i in range(7)]
TARGET = DAYS[3]
HOURLY_DAY = dt.date(2025, 11, 20)
MEMORY_DAY, MEMORY_DAY_10X = dt.date(2025, 12, 1), dt.date(2025, 12, 2)
HOURLY_MEMORY_DAY, HOURLY_MEMORY_DAY_10X = dt.date(2025, 12, 3), dt.date(2025, 12, 4)
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


def merchant_of(i: int) -> str:
    return f"merchant_{i // len(METRICS):07d}"


def keys_of_day(day: dt.date, n: int) -> list[str]:
    return [build_key(merchant_of(i), day, METRICS[i % len(METRICS)]) for i in range(n)]


def seed(client: redis.Redis, day: dt.date, n: int, *, hourly: bool = False) -> None:
    """The end state of usage_agg.tracking (counter, expiry, day index; hours if asked), written in bulk.

    With hours, each key has 1 to 15 active hours (8 on average) whose counts sum to its total.
    """
    ttl = int(USAGE_KEY_TTL.total_seconds())
    keys = keys_of_day(day, n)
    rng = random.Random(day.toordinal())
    for start in range(0, n, 10_000):
        pipe = client.pipeline(transaction=False)
        chunk = keys[start : start + 10_000]
        for offset, key in enumerate(chunk):
            i = start + offset
            total = i % 9_973 + 16
            pipe.set(key, total, ex=ttl)
            if hourly:
                active = rng.sample(range(24), rng.randint(1, 15))
                shares = [total // len(active)] * len(active)
                shares[0] += total - sum(shares)
                pipe.hset(hourly_key(merchant_of(i), day, METRICS[i % len(METRICS)]),
                          mapping={f"{h:02d}": q for h, q in zip(active, shares)})  # fmt: skip
                pipe.expire(hourly_key(merchant_of(i), day, METRICS[i % len(METRICS)]), ttl)
        pipe.sadd(index_key(day), *chunk)
        pipe.execute()
    client.expire(index_key(day), ttl)


def drop_day(client: redis.Redis, day: dt.date) -> None:
    """Delete a seeded day (its counters, hours and index), so Redis holds what production would."""
    batch = []
    for key in client.scan_iter(match=f"*{day.isoformat()}*", count=10_000):
        batch.append(key)
        if len(batch) == 10_000:
            client.unlink(*batch)
            batch = []
    if batch:
        client.unlink(*batch)


def fresh_table(conn, name: str) -> str:
    with conn.cursor() as cur:
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        for suffix in ("", "_hourly"):
            cur.execute(f"DROP TABLE IF EXISTS {SCHEMA}.{name}{suffix} CASCADE")
    conn.commit()
    return f"{SCHEMA}.{name}"


def truncate(conn, table: str) -> None:
    with conn.cursor() as cur:
        cur.execute(f"TRUNCATE {table}, {table}_hourly")
    conn.commit()


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


# -- the naive job -----------------------------------------------------------------------------


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


# -- the raw limits ----------------------------------------------------------------------------


def raw_read(client, keys) -> int:
    count = 0
    batch = []
    for key in keys:
        batch.append(key)
        if len(batch) == 5_000:
            count += len(client.mget(batch))
            batch = []
    return count + (len(client.mget(batch)) if batch else 0)


def raw_read_scan(client) -> int:
    return raw_read(client, client.scan_iter(match=day_pattern(TARGET), count=5_000))


def raw_read_index(client) -> int:
    return raw_read(client, client.sscan_iter(index_key(TARGET), count=5_000))


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


# -- memory ------------------------------------------------------------------------------------

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
aggregate_day(client, conn, dt.date.fromisoformat(sys.argv[5]), table=sys.argv[6], discovery="auto")
print(before, high_water_kib())
"""


def peak_memory_kib(db: int, day: dt.date, table: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, os.environ.get("USAGE_AGG_REDIS_HOST", "127.0.0.1"),
         os.environ.get("USAGE_AGG_REDIS_PORT", "6379"), str(db), pg_dsn(), day.isoformat(), table],
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


# -- where the time goes -----------------------------------------------------------------------


def breakdown(client, conn, table: str, day: dt.date = TARGET, *, first: bool = True) -> dict[str, float]:
    """One aggregation of ``day``, timed by phase (the reader thread's time measured in it):
    its first (the table emptied before), or a rerun of the unchanged day (``first=False``)."""
    import usage_agg.aggregate as aggregate_module
    import usage_agg.sink as sink_module
    import usage_agg.source as source_module
    import usage_agg.write_routes as write_routes_module

    spent: collections.Counter = collections.Counter()
    originals = []

    def wrap(owner, name: str, label: str) -> None:
        original = getattr(owner, name)
        originals.append((owner, name, original))

        def timed_call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - started

        setattr(owner, name, timed_call)

    wrap(source_module, "_read_batch_in_bulk", "reader: read and split a batch (Redis MGET, parsing)")
    wrap(source_module, "_read_batch", "reader: read and split a batch (Redis MGET, parsing)")
    wrap(source_module, "_read_hours", "reader: hourly hashes (Redis)")
    wrap(write_routes_module.Stage, "stage_block", "main: build and COPY a block (PostgreSQL)")
    wrap(write_routes_module.Stage, "merge", "main: merge statements (PostgreSQL)")
    wrap(sink_module.DayWriter, "_begin", "main: begin, locks, temp tables (PostgreSQL)")
    wrap(sink_module.DayWriter, "_end", "main: commit (PostgreSQL)")
    wrap(sink_module.DayWriter, "record_bad_keys", "main: dead letters (PostgreSQL)")
    wrap(aggregate_module, "ensure_schema", "main: schema check (PostgreSQL)")
    wrap(aggregate_module, "register_incarnations", "main: Redis lives (Redis INFO, PostgreSQL)")
    wrap(aggregate_module, "check_unchanged", "main: Redis lives (Redis INFO, PostgreSQL)")
    original_prefetched = aggregate_module.prefetched

    def waited(make_items, depth=2):
        items = original_prefetched(make_items, depth)
        while True:
            started = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                spent["main: waiting for the reader"] += time.perf_counter() - started
                return
            spent["main: waiting for the reader"] += time.perf_counter() - started
            yield item

    aggregate_module.prefetched = waited
    try:
        if first:
            truncate(conn, table)
        total = timed(lambda: aggregate_day(client, conn, day, table=table))
    finally:
        aggregate_module.prefetched = original_prefetched
        for owner, name, original in originals:
            setattr(owner, name, original)
    return {"total": total, **dict(spent)}


# -- the run -----------------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=200_000, help="keys per day (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=5, help="measurement rounds (default %(default)s)")
    parser.add_argument("--naive-repeat", type=int, default=1,
                        help="runs of the slow naive baseline (0: none, and no ratio to it)")  # fmt: skip
    parser.add_argument("--memory-keys", type=int, default=200_000, help="the smaller memory day (default %(default)s)")
    parser.add_argument("--skip-memory", action="store_true", help="no memory measurement (no 10x days seeded)")
    parser.add_argument("--breakdown", action="store_true", help="also time one aggregation's phases")
    parser.add_argument("--redis-db", type=int, default=15, help="emptied before and after (default %(default)s)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    n, rounds = args.keys, args.repeat

    client = redis_client(args.redis_db)
    client.flushdb()
    conn = psycopg2.connect(pg_dsn())
    print(f"Seeding {n:,} keys/day x {len(DAYS)} days (and a day of {n:,} keys with hours) into Redis db "
          f"{args.redis_db} ...", flush=True)  # fmt: skip
    for day in DAYS:
        seed(client, day, n)
    seed(client, HOURLY_DAY, n, hourly=True)

    table = fresh_table(conn, "package")
    aggregate_day(client, conn, TARGET, table=table)  # creates the schema; also warms caches
    scan_table = fresh_table(conn, "package_scan")
    aggregate_day(client, conn, TARGET, table=scan_table)
    hourly_table = fresh_table(conn, "hourly")
    aggregate_day(client, conn, HOURLY_DAY, table=hourly_table)
    raw_table = fresh_table(conn, "raw")
    aggregate_day(client, conn, DAYS[0], table=raw_table)
    rows = "".join(f"{merchant_of(i)}\t{METRICS[i % len(METRICS)]}\t{i % 9_973 + 16}\n" for i in range(n))

    samples: dict[str, list[float]] = collections.defaultdict(list)
    updates_before = updated_tuples(conn, table)
    for round_number in range(rounds):
        print(f"  round {round_number + 1} of {rounds}", flush=True)
        truncate(conn, table)
        samples["package"].append(timed(lambda: aggregate_day(client, conn, TARGET, table=table)))
        samples["second_run"].append(timed(lambda: aggregate_day(client, conn, TARGET, table=table)))
        truncate(conn, scan_table)
        samples["package_scan"].append(timed(lambda: aggregate_day(client, conn, TARGET, table=scan_table, discovery="scan")))
        samples["raw_read_index"].append(timed(lambda: raw_read_index(client)))
        samples["raw_read_scan"].append(timed(lambda: raw_read_scan(client)))
        truncate(conn, raw_table)
        samples["raw_write"].append(timed(lambda: raw_write(conn, raw_table, rows)))
        truncate(conn, hourly_table)
        samples["daily_only"].append(timed(lambda: aggregate_day(client, conn, HOURLY_DAY, table=hourly_table, hourly=False)))
        truncate(conn, hourly_table)
        samples["daily_and_hourly"].append(timed(lambda: aggregate_day(client, conn, HOURLY_DAY, table=hourly_table)))
        samples["discover_index"].append(timed(lambda: sum(1 for _ in client.sscan_iter(index_key(TARGET), count=5_000))))
        samples["discover_scan"].append(timed(lambda: sum(1 for _ in client.scan_iter(match=day_pattern(TARGET), count=1_000))))
    # every round's second run left the table as its first run wrote it: n_tup_upd counts rewrites
    updates_after = updated_tuples(conn, table)
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table} WHERE updated_at <> created_at")
        rewritten_rows = cur.fetchone()[0]
    conn.commit()

    naive = []
    if args.naive_repeat:
        naive_table = fresh_table(conn, "naive")
        aggregate_day(client, conn, DAYS[0], table=naive_table)  # only to create the table
    for _ in range(args.naive_repeat):
        truncate(conn, naive_table)
        naive.append(timed(lambda: naive_run(client, conn, naive_table)))
    naive_seconds = statistics.median(naive) if naive else None

    per_round = list(zip(*(samples[k] for k in (
        "package", "package_scan", "raw_read_index", "raw_read_scan", "raw_write", "second_run", "daily_only",
        "daily_and_hourly", "discover_index", "discover_scan",
    ))))  # fmt: skip
    ratios = {
        **({"package_vs_naive": spread([naive_seconds / p for p, *_ in per_round])} if naive_seconds else {}),
        "package_vs_raw_read_plus_write": spread([p / (ri + w) for p, _, ri, _, w, *_ in per_round]),
        "scan_vs_raw_scan_plus_write": spread([ps / (rs + w) for _, ps, _, rs, w, *_ in per_round]),
        "second_run_vs_first": spread([s / p for p, _, _, _, _, s, *_ in per_round]),
        "daily_and_hourly_vs_daily_only": spread([h / d for *_, d, h, _, _ in per_round]),
        "discovery_scan_vs_index": spread([ds / di for *_, di, ds in per_round]),
    }

    memory = {}
    if not args.skip_memory:
        base = args.memory_keys
        print(f"  memory: days of {base:,} and {10 * base:,} keys (daily, and with hours) ...", flush=True)
        mem_table = fresh_table(conn, "memory")
        aggregate_day(client, conn, DAYS[0], table=mem_table)
        for label, small, large, hours in (
            ("daily", MEMORY_DAY, MEMORY_DAY_10X, False), ("daily_and_hourly", HOURLY_MEMORY_DAY, HOURLY_MEMORY_DAY_10X, True),
        ):  # fmt: skip
            seed(client, small, base, hourly=hours)
            first = peak_memory_kib(args.redis_db, small, mem_table)
            drop_day(client, small)
            seed(client, large, 10 * base, hourly=hours)
            second = peak_memory_kib(args.redis_db, large, mem_table)
            drop_day(client, large)
            memory[label] = {"keys": base, "mib": round(first / 1024, 1), "10x_mib": round(second / 1024, 1),
                             "growth_mib": round((second - first) / 1024, 1)}  # fmt: skip

    phases = breakdown(client, conn, table) if args.breakdown else {}
    rerun_phases = breakdown(client, conn, table, first=False) if args.breakdown else {}
    hourly_phases = breakdown(client, conn, hourly_table, HOURLY_DAY) if args.breakdown else {}
    redis_version = client.info()["redis_version"]
    client.flushdb()

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, " \
              f"Redis {redis_version}, PostgreSQL {conn.server_version // 10000}"  # fmt: skip
    medians = {k: statistics.median(v) for k, v in samples.items()}
    report = {
        "keys_per_day": n, "days_held": len(DAYS), "rounds": rounds, "machine": machine,
        "date": dt.date.today().isoformat(),
        "seconds": {**{k: round(v, 3) for k, v in medians.items()},
                    **({"naive": round(naive_seconds, 3)} if naive_seconds else {})},
        "ratios": {name: {k: round(v, 2) for k, v in values.items()} for name, values in ratios.items()},
        "second_run_updated_tuples": updates_after - updates_before,
        "second_run_rewritten_rows": int(rewritten_rows),
        "peak_memory_mib": memory,
        "breakdown_seconds": {k: round(v, 3) for k, v in phases.items()},
        "rerun_breakdown_seconds": {k: round(v, 3) for k, v in rerun_phases.items()},
        "hourly_breakdown_seconds": {k: round(v, 3) for k, v in hourly_phases.items()},
    }  # fmt: skip

    def rate(seconds: float) -> str:
        return f"{n / seconds:>12,.0f} keys/s  ({seconds:7.2f} s)"

    print(f"\nusage-agg benchmark: {n:,} keys/day, {len(DAYS)} days held, {rounds} rounds, medians ({machine})")
    print(f"  package aggregation (index)   {rate(medians['package'])}")
    print(f"  package aggregation (SCAN)    {rate(medians['package_scan'])}")
    print(f"  naive job                     {rate(naive_seconds) if naive_seconds else 'not run (--naive-repeat 0)'}")
    print(f"  raw read (index / SCAN)       {medians['raw_read_index']:.2f} s / {medians['raw_read_scan']:.2f} s")
    print(f"  raw write (COPY + merge)      {rate(medians['raw_write'])}")
    print(f"  second run, unchanged day     {rate(medians['second_run'])}")
    print(f"  day with hours: daily only {medians['daily_only']:.2f} s, daily + hourly {medians['daily_and_hourly']:.2f} s")
    print(f"  {'ratio':<34}{'min':>8}{'median':>8}{'max':>8}")
    for name, values in report["ratios"].items():
        print(f"  {name:<34}{values['min']:>8}{values['median']:>8}{values['max']:>8}")
    print(f"  second runs: {report['second_run_updated_tuples']} tuples updated, "
          f"{report['second_run_rewritten_rows']} rows rewritten")  # fmt: skip
    for label, values in memory.items():
        print(f"  peak memory, {label}: {values}")
    for label, timings in (("daily", phases), ("daily rerun", rerun_phases), ("with hours", hourly_phases)):
        for phase, seconds in sorted(timings.items(), key=lambda item: -item[1]):
            print(f"  breakdown, {label}: {phase:<58}{seconds:7.3f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    with conn.cursor() as cur:
        cur.execute(f"DROP SCHEMA {SCHEMA} CASCADE")
    conn.commit()


if __name__ == "__main__":
    main()
