"""Settings shared by the DAG files, read from the environment at parse time.

Only names and numbers live here (no connections are opened): the DAG files stay
cheap to parse and free of business logic.
"""

from __future__ import annotations

import datetime as dt
import os

from usage_agg.operators import DEFAULT_POSTGRES_CONN_ID, DEFAULT_REDIS_CONN_ID

DEFAULT_SCHEDULE = "@hourly"
#: Concurrent runs of the hourly DAG. Runs of one day wait for each other (an advisory
#: lock per day), so this only bounds the load; a backfill's 24 runs a day, most of
#: them skipped at once, go this many at a time.
DEFAULT_MAX_ACTIVE_RUNS = 8


def redis_conn_id() -> str:
    return os.environ.get("USAGE_AGG_REDIS_CONN_ID") or DEFAULT_REDIS_CONN_ID


def postgres_conn_id() -> str:
    return os.environ.get("USAGE_AGG_POSTGRES_CONN_ID") or DEFAULT_POSTGRES_CONN_ID


def usage_table() -> str:
    return os.environ.get("USAGE_AGG_TABLE") or "merchant_usage"


def aggregation_schedule() -> str:
    return os.environ.get("USAGE_AGGREGATION_SCHEDULE") or DEFAULT_SCHEDULE


def expiry_check_schedule() -> str:
    return os.environ.get("USAGE_EXPIRY_CHECK_SCHEDULE") or DEFAULT_SCHEDULE


def aggregation_max_active_runs() -> int:
    raw = os.environ.get("USAGE_AGGREGATION_MAX_ACTIVE_RUNS") or str(DEFAULT_MAX_ACTIVE_RUNS)
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"USAGE_AGGREGATION_MAX_ACTIVE_RUNS: expected a positive integer, got {raw!r}")
    return int(raw)


FAN_OUT_MODES = ("off", "redis_primaries")


def aggregation_fan_out() -> str:
    """``off`` (one task per day) or ``redis_primaries`` (one mapped task per cluster primary)."""
    mode = os.environ.get("USAGE_AGGREGATION_FAN_OUT") or "off"
    if mode not in FAN_OUT_MODES:
        raise ValueError(f"USAGE_AGGREGATION_FAN_OUT: must be one of {', '.join(FAN_OUT_MODES)}, got {mode!r}")
    return mode


#: No task of these DAGs runs longer: a hung read or a stuck worker is ended (and retried)
#: instead of holding a day's lock. A day of millions of keys takes minutes; waits for
#: locks are bounded by the operator's lock_timeout (10 minutes) per wait.
TASK_EXECUTION_TIMEOUT = dt.timedelta(hours=1)


def default_args() -> dict:
    """Retries with exponential backoff: connection failures are transient.

    Bad data fails with ``AirflowFailException``, which Airflow never retries. Every task
    has an ``execution_timeout``.
    """
    return {
        "owner": "usage-agg",
        "retries": 4,
        "retry_delay": dt.timedelta(seconds=30),
        "retry_exponential_backoff": True,
        "max_retry_delay": dt.timedelta(minutes=15),
        "execution_timeout": TASK_EXECUTION_TIMEOUT,
    }
