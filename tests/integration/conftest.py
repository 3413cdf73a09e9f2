from __future__ import annotations

import pytest

from tests.conftest import pg_connect


@pytest.fixture(params=["psycopg2", "psycopg"])
def pg_conn(request):
    """A connection of each driver PostgresHook may hand out (Airflow 2: psycopg2, 3: psycopg)."""
    conn = pg_connect(request.param)
    yield conn
    conn.close()


@pytest.fixture
def table(pg_schema):
    return f"{pg_schema}.merchant_usage"
