from __future__ import annotations

import pytest

from tests.conftest import pg_connect


@pytest.fixture(params=["psycopg2", "psycopg"])
def pg_conn(request, pg_schema):
    """A connection of each driver PostgresHook may hand out (Airflow 2: psycopg2, 3: psycopg).

    It asks for ``pg_schema`` so it is closed before the schema is dropped: a test that
    fails inside a transaction would otherwise leave the DROP waiting on its locks forever.
    """
    conn = pg_connect(request.param)
    yield conn
    conn.close()


@pytest.fixture
def table(pg_schema):
    return f"{pg_schema}.merchant_usage"
