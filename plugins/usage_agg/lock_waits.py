"""Bounded lock waits: every wait for a PostgreSQL lock the writer takes ends.

A wait that runs out fails the run with :class:`~usage_agg.db_errors.LockWaitTimeout`
naming the table, the date and who likely holds the lock, and Airflow retries the
task; a writer never hangs behind another one.
"""

from __future__ import annotations

import datetime as dt

from usage_agg.db_errors import LockWaitTimeout, is_lock_timeout

DEFAULT_LOCK_TIMEOUT = dt.timedelta(minutes=10)


def pg_milliseconds(duration: dt.timedelta) -> str:
    """``duration`` as a PostgreSQL setting in milliseconds (``lock_timeout``, ``*_timeout``)."""
    return f"{int(duration.total_seconds() * 1000)}ms"


class LockWaitNamed:
    """Turn a lock wait that timed out into :class:`LockWaitTimeout` naming the table and date."""

    def __init__(self, lock_timeout: dt.timedelta, table: object, usage_date: dt.date, what: str, holder: str) -> None:
        self.lock_timeout, self.table, self.usage_date = lock_timeout, table, usage_date
        self.what, self.holder = what, holder

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and is_lock_timeout(exc):
            raise LockWaitTimeout(
                f"lock timeout: waited {self.lock_timeout.total_seconds():g} s for {self.what} {self.table} "
                f"{self.usage_date.isoformat()}, {self.holder}; Airflow retries the task"
            ) from exc
