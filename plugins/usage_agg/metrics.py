"""Metrics through Airflow's ``Stats``, so StatsD or OpenTelemetry settings route them.

Datadog, CloudWatch or Prometheus pick them up with Airflow's own ``[metrics]``
configuration; nothing here knows which. Emitting never fails a task.
"""

from __future__ import annotations

import datetime as dt
import logging

log = logging.getLogger(__name__)

PREFIX = "usage_agg"


def _stats():
    from airflow.providers.common.compat.sdk import Stats

    return Stats


def emit_aggregation(result, *, dag_id: str | None) -> None:
    """Counters and timing of one date's aggregation."""
    tags = {"dag_id": dag_id or "none", "table": result.table}
    try:
        stats = _stats()
        for name in ("keys_found", "rows_written", "rows_unchanged", "bad_keys", "decreases_refused", "resets"):
            stats.incr(f"{PREFIX}.{name}", getattr(result, name), tags=tags)
        stats.timing(f"{PREFIX}.duration", dt.timedelta(seconds=result.duration_seconds), tags=tags)
    except Exception:  # metrics are never worth a failed aggregation
        log.warning("Could not emit usage_agg metrics", exc_info=True)


def emit_lag(lag_days: int, at_risk_days: int, *, table: str) -> None:
    """Age of the oldest day with keys but no successful aggregation, and days about to expire."""
    tags = {"table": table}
    try:
        stats = _stats()
        stats.gauge(f"{PREFIX}.unaggregated_lag_days", lag_days, tags=tags)
        stats.gauge(f"{PREFIX}.days_expiring_unaggregated", at_risk_days, tags=tags)
    except Exception:
        log.warning("Could not emit usage_agg metrics", exc_info=True)
