"""``usage-agg status DATE --hourly``: the day's hours against Redis, as the README shows it."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from tests.conftest import pg_connect
from tests.e2e.test_usage_agg_cli import usage_agg
from usage_agg.aggregate import aggregate_day
from usage_agg.keys import hourly_key
from usage_agg.tracking import track_usage

COMMAND = "usage-agg status 2025-11-01 --hourly"


def test_the_readme_shows_the_command():
    assert f"\n{COMMAND}\n" in (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_status_shows_the_24_hours_and_a_day_that_disagrees_with_its_hours(redis_client, usage_env):
    utc = dt.timezone.utc
    track_usage(redis_client, "acme", "queries", 5, at=dt.datetime(2025, 11, 1, 3, 20, tzinfo=utc))
    track_usage(redis_client, "acme", "queries", 2, at=dt.datetime(2025, 11, 1, 17, 45, tzinfo=utc))
    conn = pg_connect()
    aggregate_day(redis_client, conn, "2025-11-01", table=usage_env)
    conn.close()

    done = usage_agg(*COMMAND.split()[1:])
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "  03:00                              5             5" in lines
    assert "  17:00                              2             2" in lines
    assert sum(1 for line in lines if line.strip()[:3].rstrip(":").isdigit() and ":00" in line) == 24

    redis_client.hincrby(hourly_key("acme", "2025-11-01", "queries"), "17", 1)  # an hour grew, the day did not
    done = usage_agg(*COMMAND.split()[1:], "--json")
    assert done.returncode == 1
    status = json.loads(done.stdout)
    assert (status["hourly_differing_rows"], status["hourly_mismatches"]) == (1, 1)
    assert status["hours"][17] == {"hour": "17", "redis": 3, "stored": 2}


def test_status_names_stored_days_whose_hours_sum_differently_without_redis(redis_client, usage_env):
    track_usage(redis_client, "acme", "queries", 5, at=dt.datetime(2025, 11, 1, 3, 20, tzinfo=dt.UTC))
    track_usage(redis_client, "daily-only", "queries", 4, usage_date="2025-11-01")  # no hours: not compared
    conn = pg_connect()
    aggregate_day(redis_client, conn, "2025-11-01", table=usage_env)
    with conn.cursor() as cur:  # a writer breaking the protocol: one hour written straight into the table
        cur.execute(f"UPDATE {usage_env}_hourly SET quantity = 9 WHERE merchant_id = 'acme'")
    conn.commit()
    conn.close()
    redis_client.flushdb()  # every key expired

    done = usage_agg("status", "2025-11-01")
    assert done.returncode == 0, done.stdout + done.stderr  # reported, not a sync failure
    lines = done.stdout.splitlines()
    assert "  stored days whose hourly rows sum differently: 1" in lines
    assert "    'acme' queries: daily 5, hours sum to 9" in lines
    status = json.loads(usage_agg("status", "2025-11-01", "--merchant", "acme", "--json").stdout)
    assert status["stored_hourly_mismatches"] == 1 and status["in_sync"] is True
    assert status["stored_hourly_mismatch_samples"] == [
        {"merchant_id": "acme", "metric_type": "queries", "daily": 5, "hourly_sum": 9}
    ]


def test_status_names_an_hour_written_without_its_day(redis_client, usage_env):
    """A writer that sent HINCRBY and no INCRBY: not in sync until stored, then still named."""
    conn = pg_connect()
    aggregate_day(redis_client, conn, "2025-10-31", table=usage_env)  # the tables exist, the day is not read yet
    redis_client.hincrby(hourly_key("nodejs_shop", "2025-11-01", "api_calls"), "14", 3)
    done = usage_agg("status", "2025-11-01", "--hourly")
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "  hourly counts not stored: 1" in lines
    assert "  14:00                              3             0" in lines
    aggregate_day(redis_client, conn, "2025-11-01", table=usage_env)
    conn.close()
    done = usage_agg("status", "2025-11-01", "--merchant", "nodejs_shop")
    assert done.returncode == 0, done.stdout + done.stderr  # stored: in sync, and still reported
    lines = done.stdout.splitlines()
    assert "    'nodejs_shop' api_calls: no daily counter, hours sum to 3" in lines
    assert "    'nodejs_shop' api_calls: no daily row, hours sum to 3" in lines
