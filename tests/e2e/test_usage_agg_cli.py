"""The ``usage-agg`` console script as an operator runs it, against the real services."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import time
import uuid

import pytest
import redis

from tests.conftest import REDIS_HOST, REDIS_PORT, pg_connect, redis_server_binary
from usage_agg.aggregate import aggregate_day
from usage_agg.keys import hourly_key
from usage_agg.schema import ensure_schema
from usage_agg.tracking import track_usage

DAY = "2025-11-01"


def usage_agg(*args: str | bytes, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["usage-agg", *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture
def aggregated(redis_client, usage_env):
    for merchant, amount in (("acme", 5), ("a*b:c", 7)):
        track_usage(redis_client, merchant, "queries", amount, usage_date=DAY)
    track_usage(redis_client, "acme", "storage", 3, usage_date=DAY)
    conn = pg_connect()
    aggregate_day(redis_client, conn, DAY, table=usage_env, audit={"dag_id": "d", "run_id": "r1", "task_id": "t"})
    conn.close()
    return redis_client


def test_status_of_a_date_in_sync(aggregated, usage_env):
    done = usage_agg("status", DAY, "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["in_sync"] is True
    assert (status["redis_keys"], status["table_rows"]) == (3, 3)
    assert status["redis_totals"] == status["table_totals"] == {"queries": 12, "storage": 3}
    assert status["last_successful_run"]["run_id"] == "r1"

    human = usage_agg("status", DAY)
    assert human.returncode == 0
    assert "IN SYNC" in human.stdout and "total queries" in human.stdout


def test_status_shows_what_is_out_of_sync(aggregated, usage_env):
    track_usage(aggregated, "acme", "queries", 10, usage_date=DAY)  # grew since the run
    track_usage(aggregated, "newcomer", "queries", 1, usage_date=DAY)  # never aggregated ...
    aggregated.expire(f"usage:newcomer:{DAY}:queries", 3600)  # ... and expiring within the hour
    aggregated.set(f"usage:broken:{DAY}:queries", "NaN")
    done = usage_agg("status", DAY, "--json")
    assert done.returncode == 1
    status = json.loads(done.stdout)
    assert status["in_sync"] is False
    assert status["differences"] == [{"merchant_id": "acme", "metric_type": "queries", "redis": 15, "stored": 5, "offset": 0}]
    assert status["missing_keys"] == [f"usage:newcomer:{DAY}:queries"]
    assert status["expiring_unaggregated"] == 1 and 0 < status["expiring_keys"][0]["ttl_seconds"] <= 3600
    assert status["redis_bad_keys"] == 1
    assert status["redis_totals"]["queries"] == 23 and status["table_totals"]["queries"] == 12


def test_status_for_one_merchant_with_glob_characters(aggregated, usage_env):
    track_usage(aggregated, "acme", "queries", 1, usage_date=DAY)  # another merchant drifts
    done = usage_agg("status", DAY, "--merchant", "a*b:c", "--json")
    assert done.returncode == 0, done.stdout
    status = json.loads(done.stdout)
    assert (status["redis_keys"], status["table_rows"], status["redis_totals"]) == (1, 1, {"queries": 7})


def test_status_dead_letters_are_listed(redis_client, usage_env):
    redis_client.set(f"usage:broken:{DAY}:queries", "NaN")
    conn = pg_connect()
    aggregate_day(redis_client, conn, DAY, table=usage_env)
    conn.close()
    status = json.loads(usage_agg("status", DAY, "--json").stdout)
    assert status["open_dead_letters"] == 1
    assert status["dead_letters"][0]["key"] == f"usage:broken:{DAY}:queries"


def test_one_merchants_status_counts_its_hourly_dead_letters_as_the_whole_day_does(aggregated, usage_env):
    merchant = "a_b%:c"  # LIKE's wildcards, and a ':'
    track_usage(aggregated, merchant, "queries", 2, at=dt.datetime(2025, 11, 1, 9, tzinfo=dt.UTC))
    aggregated.hset(hourly_key(merchant, DAY, "queries"), "24", 1)  # a bad field: a dead letter of its own
    conn = pg_connect()
    aggregate_day(aggregated, conn, DAY, table=usage_env)
    conn.close()
    whole = usage_agg("status", DAY, "--json")
    alone = usage_agg("status", DAY, "--merchant", merchant, "--json")
    assert (whole.returncode, alone.returncode) == (1, 1), alone.stdout + alone.stderr
    letter = f"usage-hourly:{merchant}:{DAY}:queries field 24"
    assert [d["key"] for d in json.loads(alone.stdout)["dead_letters"]] == [letter]
    assert [d["key"] for d in json.loads(whole.stdout)["dead_letters"]] == [letter]
    assert usage_agg("status", DAY, "--merchant", "aXb%:c").returncode == 0  # LIKE would have matched it


def test_a_table_that_does_not_exist_could_not_be_checked(redis_client, usage_env, pg_schema):
    track_usage(redis_client, "acme", "queries", 1, usage_date=DAY)
    for table, shown in (
        ("no_such_table", "public.no_such_table"),
        (f"{pg_schema}.no_such_table", f"{pg_schema}.no_such_table"),
        ("no_such_schema.merchant_usage", "no_such_schema.merchant_usage"),
        (None, usage_env),  # the configured table, before any aggregation created it
    ):
        done = usage_agg("status", DAY, "--json", *(["--table", table] if table else []))
        line = one_line_error(done)
        assert line.startswith(f"usage-agg: table {shown} could not be checked: it does not exist"), line
        assert done.stdout == ""


def test_clear_one_line_errors(usage_env):
    assert "date: " in one_line_error(usage_agg("status", "2025-13-01"))
    assert "connection 'missing_conn' is not defined" in one_line_error(
        usage_agg("status", DAY, "--redis-conn-id", "missing_conn")
    )
    unreachable = one_line_error(usage_agg("health", env={"AIRFLOW_CONN_USAGE_REDIS": "redis://127.0.0.1:1"}))
    assert unreachable.startswith("usage-agg: cannot reach Redis through connection 'usage_redis'")
    secret = "s3cr3t-pw"
    refused = one_line_error(
        usage_agg("health", env={"AIRFLOW_CONN_USAGE_POSTGRES": f"postgresql://u:{secret}@127.0.0.1:1/x"})
    )
    assert "cannot reach PostgreSQL" in refused and secret not in refused


SECRET = "s3cr3t-pw"

#: Connection values Airflow cannot use, and the reason the error must give.
MALFORMED_CONNECTIONS = [
    ("USAGE_REDIS", "{not json", "(JSON): Expecting property name enclosed in double quotes (line 1 column 2)"),
    ("USAGE_REDIS", f"redis://user:{SECRET}@cache:sixthree/0", "(URI): Port could not be cast to integer value"),
    ("USAGE_REDIS", "cache.internal:7000", "(URI): not a JSON object and not a URI of the form type://"),
    ("USAGE_REDIS", "   ", ": it is empty"),
    # Airflow's own message quotes this URI whole, password included
    ("USAGE_POSTGRES", f"postgresql://user:{SECRET}@db://x://y", "(URI): Invalid connection string: ***"),
    ("USAGE_POSTGRES", json.dumps({"conn_type": "postgres", "password": SECRET, "port": "five"}),
     "(JSON): Expected integer value for `port`"),
    ("USAGE_POSTGRES", json.dumps({"conn_type": "postgres", "password": SECRET, "hots": "db"}),
     "got an unexpected keyword argument 'hots'"),
]  # fmt: skip


@pytest.mark.parametrize(("conn", "value", "reason"), MALFORMED_CONNECTIONS)
def test_a_set_but_malformed_connection_says_why_without_its_value(conn, value, reason, usage_env):
    done = usage_agg("health", env={f"AIRFLOW_CONN_{conn}": value})
    line = one_line_error(done)
    assert line.startswith(f"usage-agg: AIRFLOW_CONN_{conn} is set but cannot be parsed as an Airflow connection"), line
    assert reason in line
    assert SECRET not in done.stdout + done.stderr


def test_status_names_a_malformed_connection_too(usage_env):
    line = one_line_error(usage_agg("status", DAY, env={"AIRFLOW_CONN_USAGE_REDIS": f"redis://u:{SECRET}@h:x"}))
    assert "AIRFLOW_CONN_USAGE_REDIS is set but cannot be parsed" in line and SECRET not in line


def test_a_secrets_backend_entry_airflow_cannot_parse_shows_no_traceback_nor_secret(usage_env, tmp_path):
    secrets = tmp_path / "connections.json"
    secrets.write_text(json.dumps({"vaulted_redis": f"redis://user:{SECRET}@cache://x://y"}))
    env = {
        "AIRFLOW__SECRETS__BACKEND": "airflow.secrets.local_filesystem.LocalFilesystemBackend",
        "AIRFLOW__SECRETS__BACKEND_KWARGS": json.dumps({"connections_file_path": str(secrets)}),
    }
    done = usage_agg("health", "--redis-conn-id", "vaulted_redis", env=env)
    line = one_line_error(done)
    assert "connection 'vaulted_redis' is not defined" in line and "entry it cannot parse" in line
    assert SECRET not in done.stdout + done.stderr


def test_a_merchant_id_that_is_not_utf8_is_named(usage_env):
    line = one_line_error(usage_agg("status", DAY, "--merchant", b"acme\xff"))
    assert line == "usage-agg: --merchant: the merchant id is not valid UTF-8 (byte 0xff at byte offset 4)"


def _create_schema(table: str) -> None:
    """The tables, empty (a status of a table that does not exist could not be checked)."""
    conn = pg_connect()
    ensure_schema(conn, table)
    conn.close()


def test_connections_from_the_metadata_db(redis_client, usage_env):
    conn_id = f"usage_redis_{uuid.uuid4().hex[:8]}"
    db = redis_client.connection_pool.connection_kwargs["db"]
    add = ["airflow", "connections", "add", conn_id, "--conn-type", "redis", "--conn-host", REDIS_HOST,
           "--conn-port", str(REDIS_PORT), "--conn-extra", json.dumps({"db": db})]  # fmt: skip
    subprocess.run(add, check=True, capture_output=True, timeout=120)
    try:
        track_usage(redis_client, "acme", "queries", 1, usage_date=DAY)
        _create_schema(usage_env)
        status = json.loads(usage_agg("status", DAY, "--json", "--redis-conn-id", conn_id).stdout)
        assert status["redis_keys"] == 1
    finally:
        subprocess.run(["airflow", "connections", "delete", conn_id], capture_output=True, timeout=120)


def test_health_reports_data_loss_risks_of_this_machines_redis(usage_env):
    # The test Redis keeps nothing on disk (--save "" --appendonly no): a restart loses counters.
    done = usage_agg("health", "--json")
    report = json.loads(done.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert done.returncode == 1 and report["healthy"] is False
    assert checks["redis"]["ok"] and checks["postgres"]["ok"]
    assert not checks["redis persistence"]["ok"]
    assert not checks["postgres schema"]["ok"]  # this test's schema has no tables yet


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own, configured as each case needs (the machine's binary, or
    the embedded one where it has none)."""
    binary = redis_server_binary()
    processes = []

    def start(*options: str) -> int:
        port = free_port()
        processes.append(
            subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), *options],
                stdout=subprocess.DEVNULL,
            )
        )
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                return port
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


def test_health_is_green_with_persistence_and_no_eviction(own_redis, redis_client, usage_env):
    port = own_redis("--appendonly", "yes", "--maxmemory-policy", "noeviction")
    conn = pg_connect()
    aggregate_day(redis_client, conn, DAY, table=usage_env)  # creates the schema
    conn.close()
    done = usage_agg("health", env={"AIRFLOW_CONN_USAGE_REDIS": f"redis://127.0.0.1:{port}/0"})
    assert done.returncode == 0, done.stdout
    assert done.stdout.strip().endswith("healthy")


def test_health_flags_eviction_policy_and_evicted_keys(own_redis, usage_env):
    port = own_redis("--appendonly", "yes", "--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru")
    client = redis.Redis(port=port)
    for i in range(400):
        client.set(f"filler:{i}", b"x" * 10_000)
    done = usage_agg("health", "--json", env={"AIRFLOW_CONN_USAGE_REDIS": f"redis://127.0.0.1:{port}/0"})
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert done.returncode == 1
    assert not checks["redis maxmemory-policy"]["ok"] and "allkeys-lru" in checks["redis maxmemory-policy"]["detail"]
    assert not checks["redis evicted_keys"]["ok"]
    assert checks["redis persistence"]["ok"]


README_COMMANDS = [
    "usage-agg status 2025-11-01",
    "usage-agg status 2025-11-01 --merchant acme_electronics_2024 --json",
    "usage-agg health",
]


def test_the_readme_commands_run_as_written(redis_client, usage_env):
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    track_usage(redis_client, "acme_electronics_2024", "queries", 4, usage_date=DAY)
    conn = pg_connect()
    aggregate_day(redis_client, conn, DAY, table=usage_env)
    conn.close()
    for command in README_COMMANDS:
        assert command in readme
        done = usage_agg(*shlex.split(command)[1:])
        assert done.returncode in (0, 1), done.stderr  # a verdict, not an error
        assert "Traceback" not in done.stderr
    merchant = json.loads(usage_agg(*shlex.split(README_COMMANDS[1])[1:]).stdout)
    assert merchant["in_sync"] is True and merchant["redis_totals"] == {"queries": 4}


def test_connections_from_a_secrets_backend(redis_client, usage_env, tmp_path, monkeypatch):
    db = redis_client.connection_pool.connection_kwargs["db"]
    secrets = tmp_path / "connections.json"
    secrets.write_text(json.dumps({"vaulted_redis": {"conn_type": "redis", "host": REDIS_HOST, "port": REDIS_PORT,
                                                     "extra": {"db": db}}}))  # fmt: skip
    env = {
        "AIRFLOW__SECRETS__BACKEND": "airflow.secrets.local_filesystem.LocalFilesystemBackend",
        "AIRFLOW__SECRETS__BACKEND_KWARGS": json.dumps({"connections_file_path": str(secrets)}),
    }
    track_usage(redis_client, "acme", "queries", 2, usage_date=DAY)
    _create_schema(usage_env)
    done = usage_agg("status", DAY, "--json", "--redis-conn-id", "vaulted_redis", env=env)
    assert json.loads(done.stdout)["redis_totals"] == {"queries": 2}, done.stderr
