from __future__ import annotations

import pytest

from tests.conftest import PG_DRIVERS, pg_connect


@pytest.fixture(params=PG_DRIVERS)
def pg_conn(request, pg_schema):
    """A connection of each driver PostgresHook may hand out (Airflow 2: psycopg2, 3: psycopg;
    ``PG_DRIVERS``, both unless USAGE_AGG_PG_DRIVERS names one).

    It asks for ``pg_schema`` so it is closed before the schema is dropped: a test that
    fails inside a transaction would otherwise leave the DROP waiting on its locks forever.
    """
    conn = pg_connect(request.param)
    yield conn
    conn.close()


@pytest.fixture
def table(pg_schema):
    return f"{pg_schema}.merchant_usage"


@pytest.fixture(params=["lookup", "day-scan"])
def merge_by(request, monkeypatch):
    """Both ways a day with rows compares its staged rows with the stored ones: a primary-key
    lookup per row (stages of up to ``write_routes.LOOKUP_ROWS`` rows), or one hash join with the
    stored day (bigger stages; here every stage, however small)."""
    import usage_agg.write_routes as write_routes

    if request.param == "day-scan":
        monkeypatch.setattr(write_routes, "LOOKUP_ROWS", 0)
    return request.param
