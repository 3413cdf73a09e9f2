"""The provider's ``[usage_agg]`` configuration section: its options, and how each is read.

An option's value comes from the first of these that is set and not empty:

1. its older environment variable (``USAGE_AGG_TABLE``, ``USAGE_AGGREGATION_SCHEDULE``, ...),
   kept working: set, it wins;
2. Airflow's configuration, section ``[usage_agg]``: ``AIRFLOW__USAGE_AGG__<OPTION>`` in the
   environment, ``airflow.cfg``, or ``..._CMD`` / ``..._SECRET``, as Airflow reads any option;
3. the option's default.

``get_provider_info()`` declares the same options (with their defaults and descriptions), so
``airflow config list`` and the UI's configuration page show the section. This module imports
no Airflow until a value is read: the provider manager and ``usage-agg --help`` load it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

SECTION = "usage_agg"


@dataclass(frozen=True)
class Option:
    name: str
    env: str  #: the older environment variable, which wins when set
    default: str
    description: str
    type: str = "string"
    example: str | None = None

    def provider_info(self) -> dict:
        """The option as Airflow's provider info schema declares one."""
        return {
            "description": f"{self.description}\nThe environment variable {self.env}, when set, takes precedence.\n",
            "version_added": "0.1.0",
            "type": self.type,
            "example": self.example,
            "default": self.default,
        }


OPTIONS = (
    Option(
        "schedule",
        "USAGE_AGGREGATION_SCHEDULE",
        "@hourly",
        "Schedule of the DAG usage_aggregation (a cron expression or preset). In a backfill, the "
        "earliest run of the backfill that reads a day reads it; the others leave it (README).",
        example="*/15 * * * *",
    ),
    Option(
        "expiry_check_schedule",
        "USAGE_EXPIRY_CHECK_SCHEDULE",
        "@hourly",
        "Schedule of the DAG usage_expiry_check, which saves or alerts on usage about to expire in Redis.",
        example="30 */6 * * *",
    ),
    Option(
        "table",
        "USAGE_AGG_TABLE",
        "merchant_usage",
        "The PostgreSQL table the usage is written to, name or schema.name; its companion tables and "
        "views are created beside it.",
        example="billing.merchant_usage",
    ),
    Option(
        "redis_conn_id",
        "USAGE_AGG_REDIS_CONN_ID",
        "usage_redis",
        "Airflow connection of the Redis that holds the usage counters.",
    ),
    Option(
        "postgres_conn_id",
        "USAGE_AGG_POSTGRES_CONN_ID",
        "usage_postgres",
        "Airflow connection of the PostgreSQL that holds the usage table.",
    ),
    Option(
        "fan_out",
        "USAGE_AGGREGATION_FAN_OUT",
        "off",
        "off: one task per day. redis_primaries: on Redis Cluster, each day's aggregation is mapped "
        "once per primary, so an executor with several workers spreads a day over them.",
        example="redis_primaries",
    ),
    Option(
        "max_active_runs",
        "USAGE_AGGREGATION_MAX_ACTIVE_RUNS",
        "8",
        "How many runs of usage_aggregation may run at once (runs of one day wait for each other).",
        type="integer",
    ),
    Option(
        "alert_conn_id",
        "USAGE_AGG_ALERT_CONN_ID",
        "usage_agg_alert",
        "Airflow connection whose password holds the webhook URL that failures are posted to. "
        "An Airflow Variable USAGE_AGG_ALERT_CONN_ID also takes precedence.",
    ),
    Option(
        "pool",
        "USAGE_AGG_POOL",
        "default_pool",
        "Airflow pool of every task of the usage DAGs. Create a pool usage_agg and name it here: its size "
        "bounds how many tasks run (and wait on the day locks) at once, whatever else the cluster runs.",
        example="usage_agg",
    ),
    Option(
        "asset_uri",
        "USAGE_AGG_ASSET_URI",
        "",
        "URI of the asset (dataset on Airflow 2) that the aggregation tasks update, in the postgres "
        "provider's form postgres://host:port/database/schema/table. Empty: postgres://usage-postgres:5432/"
        "usage/<schema>/<table> from the table option. Downstream DAGs use usage_agg.assets.usage_asset().",
        example="postgres://db.internal:5432/billing/public/merchant_usage",
    ),
    Option(
        "late_after_minutes",
        "USAGE_AGGREGATION_LATE_AFTER_MINUTES",
        "0",
        "Alert when a run of usage_aggregation has not succeeded this many minutes after it was queued "
        "(a DeadlineAlert on Airflow 3, whose callback runs in the triggerer; the tasks' SLA on Airflow 2). "
        "0, the default, turns it off: on Airflow 3.3 a DAG with a deadline cannot be run by "
        "`airflow dags test` (it fails when the run ends).",
        type="integer",
    ),
)

OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}


def provider_config() -> dict:
    """The ``config`` entry of ``get_provider_info()``."""
    return {
        SECTION: {
            "description": "Settings of the usage-agg provider's DAGs and of the usage-agg command.\n",
            "options": {option.name: option.provider_info() for option in OPTIONS},
        }
    }


def lookup(name: str) -> tuple[str, str]:
    """``(value, where it came from)`` of the option ``name``; ``where`` names it for an error message."""
    option = OPTIONS_BY_NAME[name]
    value = os.environ.get(option.env)
    if value:
        return value, option.env
    value = _airflow_option(name)
    if value:
        return value, f"[{SECTION}] {name}"
    return option.default, f"[{SECTION}] {name} (default)"


def value(name: str) -> str:
    return lookup(name)[0]


def _airflow_option(name: str) -> str | None:
    from airflow.providers.common.compat.sdk import conf

    found = conf.get(SECTION, name, fallback=None)
    return found.strip() if isinstance(found, str) else None
