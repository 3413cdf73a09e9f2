"""Services cut for real in the middle of a run: a date is untouched or complete, never half-written."""

from __future__ import annotations

import threading

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import PG_DRIVERS, pg_connect
from usage_agg.aggregate import aggregate_day
from usage_agg.tracking import track_usage

DAY = "2025-11-01"
MERCHANTS = 300


def seed(client, amount: int) -> None:
    for i in range(MERCHANTS):
        track_usage(client, f"m{i:04d}", "queries", amount, usage_date=DAY)


def stored(query, table) -> dict[str, int]:
    return dict(query(f"SELECT merchant_id, quantity FROM {table}"))


def redis_totals(client) -> dict[str, int]:
    return {k.decode().split(":")[1]: int(client.get(k)) for k in client.scan_iter(match=f"usage:*:{DAY}:*")}


class CutAfterFirstBatch:
    """The real client; before the second batch is read, ``cut()`` really breaks a connection."""

    def __init__(self, client, cut):
        self.client, self.cut, self.batches = client, cut, 0

    def __getattr__(self, name):  # everything else is the real client's
        return getattr(self.client, name)

    def mget(self, keys):  # one MGET per batch
        self.batches += 1
        if self.batches == 2:
            self.cut()
        return self.client.mget(keys)


def killable_client(redis_client, name: str, retries: int):
    kwargs = redis_client.connection_pool.connection_kwargs
    client = redis.Redis(
        host=kwargs["host"], port=kwargs["port"], db=kwargs["db"], retry=Retry(NoBackoff(), retries)
    )
    client.client_setname(name)
    admin = redis.Redis(host=kwargs["host"], port=kwargs["port"])

    def kill():
        ids = [c["id"] for c in admin.client_list() if c.get("name") == name]
        assert ids and all(admin.client_kill_filter(_id=i) == 1 for i in ids)

    return client, kill


def test_redis_connection_killed_mid_run(redis_client, table, query):
    """CLIENT KILL between batches: redis-py reconnects, and the date ends complete.

    (The other outcome, a connection error that aborts the run and leaves the date
    untouched, is covered in test_aggregate.py and by the PostgreSQL test below.)
    """
    seed(redis_client, 1)
    conn = pg_connect()
    aggregate_day(redis_client, conn, DAY, table=table)
    seed(redis_client, 1)
    victim, kill = killable_client(redis_client, "usage-agg-victim", retries=3)  # redis-py's default
    before = victim.client_id()
    aggregate_day(CutAfterFirstBatch(victim, kill), conn, DAY, table=table, batch_size=50)
    assert victim.client_id() != before  # the connection really was replaced
    assert stored(query, table) == redis_totals(redis_client)
    assert set(stored(query, table).values()) == {2}
    conn.close()


@pytest.mark.parametrize("driver", PG_DRIVERS)
def test_postgres_backend_terminated_mid_run(redis_client, table, query, caplog, driver):
    seed(redis_client, 1)
    conn = pg_connect(driver)
    aggregate_day(redis_client, conn, DAY, table=table)
    seed(redis_client, 1)
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
    conn.rollback()

    def terminate():
        assert query("SELECT pg_terminate_backend(%s)", (pid,)) == [(True,)]

    with caplog.at_level("ERROR", logger="usage_agg"), pytest.raises(Exception) as raised:
        aggregate_day(CutAfterFirstBatch(redis_client, terminate), conn, DAY, table=table, batch_size=50)
    # The cause, not a bare "the connection is lost": the server's own last words when the
    # driver kept them (not when it noticed the closed socket mid-COPY), else what can end a session.
    assert raised.type.__name__ in ("OperationalError", "AdminShutdown", "InterfaceError"), raised.value
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Aggregation of 2025-11-01 failed: ")]
    assert "terminating connection due to administrator command" in line or "pg_terminate_backend" in line, line
    assert set(stored(query, table).values()) == {1}  # the date is as it was
    conn.close()

    retry = pg_connect(driver)  # Airflow's retry: a new task attempt, a new connection
    aggregate_day(redis_client, retry, DAY, table=table, batch_size=50)
    assert stored(query, table) == redis_totals(redis_client)
    retry.close()


def test_two_runs_of_the_same_date_at_once(redis_client, table, query, pg_schema):
    seed(redis_client, 3)
    aggregate_day(redis_client, pg_connect(), DAY, table=table)  # the schema exists before the race
    seed(redis_client, 2)
    errors = []

    def run():
        conn = pg_connect()
        try:
            kwargs = redis_client.connection_pool.connection_kwargs
            client = redis.Redis(host=kwargs["host"], port=kwargs["port"], db=kwargs["db"])
            aggregate_day(client, conn, DAY, table=table, batch_size=25)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)
        finally:
            conn.close()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert stored(query, table) == redis_totals(redis_client)
    assert set(stored(query, table).values()) == {5}
    written = query(
        f"SELECT rows_written, started_at, finished_at FROM {pg_schema}.usage_aggregation_runs ORDER BY started_at"
    )
    assert sorted(w for w, _, _ in written) == [0, 0, 0, MERCHANTS, MERCHANTS]


@pytest.mark.parametrize("driver", PG_DRIVERS)
def test_a_session_ended_between_runs_is_named_by_the_servers_own_words(redis_client, table, query, caplog, driver):
    """The next run on a connection the server ended says why, with either driver."""
    seed(redis_client, 1)
    conn = pg_connect(driver)
    aggregate_day(redis_client, conn, DAY, table=table)
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
    conn.rollback()
    assert query("SELECT pg_terminate_backend(%s)", (pid,)) == [(True,)]
    with caplog.at_level("ERROR", logger="usage_agg"), pytest.raises(Exception):
        aggregate_day(redis_client, conn, DAY, table=table)
    assert "failed before it began: " in caplog.text
    assert "terminating connection due to administrator command" in caplog.text  # the driver's, or the server's note
    conn.close()


def test_a_failed_run_leaves_no_reader_thread_behind(redis_client, table, monkeypatch):
    """The reader thread holds the Redis client: a run that fails while it reads ahead must stop
    it at once, not when the failed run's frames are garbage-collected (a task log keeps them)."""
    import threading

    from usage_agg.sink import DayWriter

    seed(redis_client, 1)
    calls = []
    stage = DayWriter.stage_plain_rows

    def stage_then_fail(self, rows):
        calls.append(len(rows))
        if len(calls) == 2:
            raise RuntimeError("the writer failed (injected)")
        return stage(self, rows)

    monkeypatch.setattr(DayWriter, "stage_plain_rows", stage_then_fail)
    conn = pg_connect()
    try:
        with pytest.raises(RuntimeError, match="injected") as failure:
            aggregate_day(redis_client, conn, DAY, table=table, batch_size=10)
        assert failure.value.__traceback__ is not None  # the run's frames are still referenced here
        assert not any(t.name == "usage-agg-reader" and t.is_alive() for t in threading.enumerate())
    finally:
        conn.close()


@pytest.mark.parametrize("driver", PG_DRIVERS)
def test_a_statement_timeout_names_the_setting_and_how_to_lift_it(redis_client, table, query, caplog, driver):
    """A role's statement_timeout that ends a day's statement fails every retry the same way, so
    the error says where the limit comes from and how the connection's extra lifts it.

    Here it ends the wait for the date's lock (another writer holds it): the same SQLSTATE and
    message as a comparison that runs too long, without a day big enough to take that long.
    """
    from tests.conftest import day_lock_held
    from usage_agg.db_errors import STATEMENT_TIMEOUT_HINT

    seed(redis_client, 1)
    first = pg_connect(driver)
    aggregate_day(redis_client, first, DAY, table=table)  # the schema and the date's rows
    first.close()
    seed(redis_client, 1)
    limited = pg_connect(driver, options="-c statement_timeout=300ms")  # as a role's ALTER ROLE would
    with day_lock_held(table, DAY):
        with caplog.at_level("ERROR", logger="usage_agg"), pytest.raises(Exception) as raised:
            aggregate_day(redis_client, limited, DAY, table=table)
    assert "statement timeout" in str(raised.value)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Aggregation of 2025-11-01 failed: ")]
    assert line.endswith(f"(SQLSTATE 57014): {STATEMENT_TIMEOUT_HINT}"), line
    assert set(stored(query, table).values()) == {1}  # nothing of the failed run committed
    [(error,)] = query(f"SELECT error FROM {table.split('.')[0]}.usage_aggregation_runs WHERE error IS NOT NULL")
    assert STATEMENT_TIMEOUT_HINT in error
    limited.close()

    lifted = pg_connect(driver, options="-c statement_timeout=0")  # the hint's extra, as the hook passes it
    aggregate_day(redis_client, lifted, DAY, table=table)
    lifted.close()
    assert stored(query, table) == redis_totals(redis_client)
