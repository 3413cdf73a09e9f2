"""One real Airflow deployment per test session, against the real Redis and PostgreSQL.

Its processes see the usage connections (Redis database 13) and a usage table in
a schema of this session's own; the tests share them, so each test empties Redis
and the usage tables first.
"""

from __future__ import annotations

import json
import shlex
import uuid

import pytest
from tests.conftest import PG_DATABASE, PG_HOST, PG_PORT, PG_USER, REDIS_HOST, REDIS_PORT, pg_connect
from tests.system.stack import AirflowStack, CeleryStack

REDIS_DB = 13
#: the Celery broker's database: never the usage data's (13, or the cluster the Celery tests read)
BROKER_REDIS_DB = 14
POOL_COMMAND = 'airflow pools set usage_agg 4 "usage-agg tasks: bounds how many wait on day locks"'


def _admin(sql: str) -> None:
    conn = pg_connect()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
    conn.close()


@pytest.fixture(scope="session")
def usage_schema():
    name = f"sys_{uuid.uuid4().hex[:10]}"
    yield name
    _admin(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture(scope="session")
def stack(tmp_path_factory, usage_schema):
    """Migrated metadata DB in PostgreSQL, then the API server and scheduler, stopped at the end."""
    metadata_db = f"airflow_meta_{uuid.uuid4().hex[:10]}"
    _admin(f'CREATE DATABASE "{metadata_db}"')
    home = tmp_path_factory.mktemp("airflow-home")
    stack = AirflowStack(
        home,
        f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{metadata_db}",
        {
            "AIRFLOW_CONN_USAGE_REDIS": json.dumps(
                {"conn_type": "redis", "host": REDIS_HOST, "port": REDIS_PORT, "extra": {"db": REDIS_DB}}
            ),
            "AIRFLOW_CONN_USAGE_POSTGRES": json.dumps(
                {"conn_type": "postgres", "host": PG_HOST, "port": PG_PORT, "login": PG_USER, "schema": PG_DATABASE}
            ),
            "USAGE_AGG_TABLE": f"{usage_schema}.merchant_usage",
            "AIRFLOW__USAGE_AGG__POOL": "usage_agg",
        },
    )
    try:
        stack.migrate()
        stack.airflow(*shlex.split(POOL_COMMAND)[1:])  # README.md, "Pool, timeouts and late runs"
        stack.start()
        yield stack
    finally:
        stack.stop()
        leftovers = stack.running_pids()
        _admin(f'DROP DATABASE IF EXISTS "{metadata_db}" WITH (FORCE)')
        assert leftovers == [], f"Airflow processes left running: {leftovers}"


@pytest.fixture(scope="module")
def celery_stack(tmp_path_factory, redis_cluster):
    """A CeleryExecutor deployment (two workers) whose hourly DAG fans out over the local Redis Cluster.

    Module-scoped: only tests/system/test_celery.py uses it, and it stops when that module is
    done, so it never runs beside the LocalExecutor ``stack``. Its usage table is in a schema of
    its own; the broker is Redis database ``BROKER_REDIS_DB``, emptied before and after.
    """
    import redis

    schema = f"sys_celery_{uuid.uuid4().hex[:10]}"
    metadata_db = f"airflow_meta_{uuid.uuid4().hex[:10]}"
    broker = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=BROKER_REDIS_DB)
    broker.flushdb()
    _admin(f'CREATE DATABASE "{metadata_db}"')
    cluster_node = redis_cluster.ports[0]
    stack = CeleryStack(
        tmp_path_factory.mktemp("airflow-celery-home"),
        f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{metadata_db}",
        {
            "AIRFLOW_CONN_USAGE_REDIS": json.dumps(
                {"conn_type": "redis", "host": "127.0.0.1", "port": cluster_node, "extra": {"cluster": True}}
            ),
            "AIRFLOW_CONN_USAGE_POSTGRES": json.dumps(
                {"conn_type": "postgres", "host": PG_HOST, "port": PG_PORT, "login": PG_USER, "schema": PG_DATABASE}
            ),
            "USAGE_AGG_TABLE": f"{schema}.merchant_usage",
            "USAGE_AGGREGATION_FAN_OUT": "redis_primaries",
        },
        broker_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/{BROKER_REDIS_DB}",
    )
    try:
        stack.migrate()
        stack.start()
        yield stack
    finally:
        stack.stop()
        leftovers = stack.running_pids()
        _admin(f'DROP DATABASE IF EXISTS "{metadata_db}" WITH (FORCE)')
        _admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        broker.flushdb()
        broker.close()
        assert leftovers == [], f"Airflow processes left running: {leftovers}"


@pytest.fixture
def usage_redis():
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def usage_table(stack, usage_schema, query):
    """The session's usage table, emptied (with its audit and dead letters) for this test."""
    table = f"{usage_schema}.merchant_usage"
    exists = query("SELECT to_regclass(%s) IS NOT NULL", (table,))[0][0]
    if exists:
        _admin(
            f'TRUNCATE "{usage_schema}".merchant_usage, "{usage_schema}".usage_aggregation_runs, '
            f'"{usage_schema}".usage_aggregation_errors'
        )
    return table


@pytest.fixture
def metadata(stack):
    """Run a query on the Airflow metadata database."""
    with stack.metadata_queries() as run:
        yield run


@pytest.fixture
def merchants(stack, usage_redis, usage_table, query):
    """Redis ahead of PostgreSQL for two merchants on 2025-11-01; only a triggered one may move."""
    from tests.system.merchant_runs import seed_two_merchants

    return seed_two_merchants(stack, usage_redis, usage_table, query)
