"""Settings shared by the DAG files, read at parse time.

Each comes from the provider's ``[usage_agg]`` configuration section, or from its older
``USAGE_AGG*`` environment variable, which wins when set (``usage_agg.config``). Only names
and numbers live here (no connections are opened): the DAG files stay cheap to parse and
free of business logic.
"""

from __future__ import annotations

import datetime as dt

from usage_agg import config


def redis_conn_id() -> str:
    return config.value("redis_conn_id")


def postgres_conn_id() -> str:
    return config.value("postgres_conn_id")


def usage_table() -> str:
    return config.value("table")


def aggregation_schedule() -> str:
    return config.value("schedule")


def expiry_check_schedule() -> str:
    return config.value("expiry_check_schedule")


def aggregation_max_active_runs() -> int:
    """Concurrent runs of the hourly DAG. Runs of one day wait for each other (an advisory lock
    per day), so this only bounds the load; a backfill's 24 runs a day, most of them skipped at
    once, go this many at a time."""
    raw, where = config.lookup("max_active_runs")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{where}: expected a positive integer, got {raw!r}")
    return int(raw)


FAN_OUT_MODES = ("off", "redis_primaries")


def aggregation_fan_out() -> str:
    """``off`` (one task per day) or ``redis_primaries`` (one mapped task per cluster primary)."""
    mode, where = config.lookup("fan_out")
    if mode not in FAN_OUT_MODES:
        raise ValueError(f"{where}: must be one of {', '.join(FAN_OUT_MODES)}, got {mode!r}")
    return mode


#: No task of these DAGs runs longer: a hung read or a stuck worker is ended (and retried)
#: instead of holding a day's lock. A day of millions of keys takes minutes; waits for
#: locks are bounded by the operator's lock_timeout (10 minutes) per wait.
TASK_EXECUTION_TIMEOUT = dt.timedelta(hours=1)


def default_args() -> dict:
    """Retries with exponential backoff: connection failures are transient.

    Bad data fails with ``AirflowFailException``, which Airflow never retries. Every task
    has an ``execution_timeout``, and runs in the configured pool.
    """
    return {
        "owner": "usage-agg",
        "retries": 4,
        "retry_delay": dt.timedelta(seconds=30),
        "retry_exponential_backoff": True,
        "max_retry_delay": dt.timedelta(minutes=15),
        "execution_timeout": TASK_EXECUTION_TIMEOUT,
        "pool": pool(),
    }


def pool() -> str:
    """The Airflow pool of every task (``default_pool`` unless a ``usage_agg`` pool is configured)."""
    return config.value("pool")


def late_after() -> dt.timedelta | None:
    """How long a run of the hourly DAG may take before it alerts; ``None``: never."""
    raw, where = config.lookup("late_after_minutes")
    if not raw.isdigit():
        raise ValueError(f"{where}: expected a whole number of minutes (0 turns it off), got {raw!r}")
    return dt.timedelta(minutes=int(raw)) if int(raw) else None


def late_run_alert() -> dict:
    """``DAG`` arguments that alert when a run is late: a ``DeadlineAlert`` on Airflow 3 (from the
    run's queueing; its callback runs in the triggerer), the tasks' SLA on Airflow 2."""
    late = late_after()
    if late is None:
        return {}
    from airflow.providers.common.compat.version_compat import AIRFLOW_V_3_0_PLUS

    if AIRFLOW_V_3_0_PLUS:
        from airflow.sdk.definitions.callback import AsyncCallback
        from airflow.sdk.definitions.deadline import DeadlineAlert, DeadlineReference

        return {
            "deadline": DeadlineAlert(
                reference=DeadlineReference.DAGRUN_QUEUED_AT,
                interval=late,
                callback=AsyncCallback("usage_agg.alerts.late_run_alert"),
            )
        }
    from usage_agg.alerts import late_run_sla_miss

    return {"sla_miss_callback": late_run_sla_miss}


def late_run_default_args() -> dict:
    """The tasks' ``sla`` on Airflow 2 (Airflow 3 has no SLA: :func:`late_run_alert`'s deadline)."""
    late = late_after()
    from airflow.providers.common.compat.version_compat import AIRFLOW_V_3_0_PLUS

    return {} if late is None or AIRFLOW_V_3_0_PLUS else {"sla": late}
