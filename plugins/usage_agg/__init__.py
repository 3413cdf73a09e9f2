"""usage-agg: move merchant usage counters from Redis into PostgreSQL, with Airflow."""

from __future__ import annotations

__version__ = "0.1.0"

#: Plain text: Airflow's CLI shows a provider's description without its backticks, underscores
#: and angle brackets (reStructuredText markup) and without a trailing period.
DESCRIPTION = (
    "Copies merchant usage counters from Redis into PostgreSQL: hourly aggregation, reruns, "
    "an expiry check and failure alerts"
)


def get_provider_info() -> dict:
    """Airflow provider metadata, found through the ``apache_airflow_provider`` entry point.

    Called by Airflow's providers manager in every Airflow process: it imports nothing of Airflow.
    """
    from usage_agg.config import provider_config

    return {
        "package-name": "usage-agg",
        "name": "Usage Aggregation",
        "description": DESCRIPTION,
        "versions": [__version__],
        "operators": [
            {"integration-name": "Usage Aggregation", "python-modules": ["usage_agg.operators"]},
        ],
        "integrations": [{"integration-name": "Usage Aggregation", "tags": ["software"]}],
        "notifications": ["usage_agg.alerts.UsageAlertNotifier"],
        "config": provider_config(),
        # Airflow 3 adds these commands to its own CLI (airflow usage-agg status|health);
        # Airflow 2 ignores the entry and keeps the console script alone.
        "cli": ["usage_agg.cli.get_airflow_cli_commands"],
    }
