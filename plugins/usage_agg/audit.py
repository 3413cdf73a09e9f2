"""The audit trail: one row per date (or part of a date) per run, in ``usage_aggregation_runs``.

A successful run's row is written in the date's own transaction, so it exists exactly
when the data does. A failed run's row is written afterwards in a transaction of its
own; it records what was committed (nothing), and in ``error`` how far the run got.

The audit also tells which writes no asset event announced (:func:`unannounced_dates`):
Airflow emits a task's events only when the task succeeds, so rows committed by a task
that then failed (new bad keys; an expiry check that saved one day and failed on
another) must be announced later: by the date's next run, even if that run changes
nothing, or by the next successful expiry check (for dates no run will read again).
"""

from __future__ import annotations

COLUMNS = (
    "dag_id", "run_id", "task_id", "usage_table", "usage_date", "merchant_id", "keys_found",
    "rows_written", "rows_unchanged", "decreases_refused", "resets", "bad_keys", "new_bad_keys",
    "started_at", "outcome", "error", "redis_partition", "partition_count", "hourly_rows_written",
    "hourly_mismatches", "bad_hourly",
)  # fmt: skip
#: What a rolled-back run did not commit: recorded as 0 in its audit row.
UNCOMMITTED = (
    "rows_written", "rows_unchanged", "decreases_refused", "resets", "bad_keys", "new_bad_keys", "hourly_rows_written",
    "hourly_mismatches", "bad_hourly",
)  # fmt: skip


def insert_run(cur, runs_table: str, audit: dict) -> None:
    """Insert one audit row; ``finished_at`` is the moment of the insert, not the transaction's start."""
    placeholders = ", ".join(f"%({c})s" for c in COLUMNS)
    cur.execute(
        f"INSERT INTO {runs_table} ({', '.join(COLUMNS)}, finished_at) VALUES ({placeholders}, clock_timestamp())",
        {c: audit.get(c) for c in COLUMNS},
    )


def record_failed_run(conn, runs_table: str, audit: dict) -> None:
    """Audit a run whose transaction was rolled back, in a transaction of its own."""
    with conn.cursor() as cur:
        insert_run(cur, runs_table, {**audit, **dict.fromkeys(UNCOMMITTED, 0), "outcome": "failed"})
    conn.commit()


#: ``error`` of a committed run whose task failed afterwards, so that no event announced it
NOT_ANNOUNCED = "not announced: the task failed after this date was committed"
#: ``error`` of such a run once the expiry check's event announced it (followed by the check's run)
ANNOUNCED_BY = "announced by "

#: Audit rows whose writes no event announced: committed, then the task failed (a run with new
#: bad keys fails after its commit; an expiry check marks its own), and no successful run of the
#: date started since (its event announced the date as changed, see ``assets.changed``).
_UNANNOUNCED = """
    FROM {runs} w
    WHERE w.usage_table = ANY(%(tables)s) {dates}
      AND (w.rows_written > 0 OR w.hourly_rows_written > 0)
      AND ((w.outcome = 'new_bad_keys' AND w.error IS NULL) OR w.error = %(not_announced)s)
      AND NOT EXISTS (
          SELECT 1 FROM {runs} a
          WHERE a.usage_table = ANY(%(tables)s) AND a.usage_date = w.usage_date
            AND a.outcome IN ('success', 'known_bad_keys') AND a.error IS NULL AND a.started_at > w.finished_at)"""


def unannounced_dates(cur, runs_table: str, usage_tables: list[str], usage_date=None) -> list:
    """The dates (or whether ``usage_date``) hold rows that no asset event announced."""
    where = "AND w.usage_date = %(day)s" if usage_date is not None else ""
    cur.execute(
        f"SELECT DISTINCT w.usage_date {_UNANNOUNCED.format(runs=runs_table, dates=where)} ORDER BY 1",
        {"tables": list(usage_tables), "day": usage_date, "not_announced": NOT_ANNOUNCED},
    )
    return [day for (day,) in cur.fetchall()]


def mark_not_announced(conn, runs_table: str, audit: dict, usage_dates: list[str]) -> None:
    """Mark the committed runs of one task (``dag_id``, ``run_id``, ``task_id`` of ``audit``)
    for ``usage_dates`` as not announced: the task is about to fail. Commits."""
    with conn.cursor() as cur:
        cur.execute(
            f"""UPDATE {runs_table} SET error = %(not_announced)s
                WHERE dag_id = %(dag_id)s AND run_id = %(run_id)s AND task_id = %(task_id)s
                  AND usage_date = ANY(%(dates)s::date[]) AND outcome <> 'failed' AND error IS NULL""",
            {**{k: audit.get(k) for k in ("dag_id", "run_id", "task_id")}, "dates": usage_dates,
             "not_announced": NOT_ANNOUNCED},
        )  # fmt: skip
    conn.commit()


def mark_announced(conn, runs_table: str, usage_tables: list[str], usage_dates: list, by: str) -> None:
    """Record that the expiry check run ``by`` announced the unannounced writes of ``usage_dates``. Commits."""
    with conn.cursor() as cur:
        cur.execute(
            f"""UPDATE {runs_table} u SET error = %(announced)s
                WHERE u.id IN (SELECT w.id {_UNANNOUNCED.format(runs=runs_table, dates="")})
                  AND u.usage_date = ANY(%(dates)s::date[])""",
            {"tables": list(usage_tables), "dates": list(usage_dates), "not_announced": NOT_ANNOUNCED,
             "announced": ANNOUNCED_BY + by},
        )  # fmt: skip
    conn.commit()
