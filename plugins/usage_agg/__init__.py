"""usage-agg: move merchant usage counters from Redis into PostgreSQL, with Airflow."""

from __future__ import annotations

__version__ = "0.1.0"


def get_provider_info() -> dict:
    """Airflow provider metadata, found through the ``apache_airflow_provider`` entry point."""
    return {
        "package-name": "usage-agg",
        "name": "Usage Aggregation",
        "description": "Copies merchant usage counters from Redis into PostgreSQL (`merchant_usage`).",
        "versions": [__version__],
        "operators": [
            {"integration-name": "Usage Aggregation", "python-modules": ["usage_agg.operators"]},
        ],
        "integrations": [{"integration-name": "Usage Aggregation", "tags": ["software"]}],
    }
