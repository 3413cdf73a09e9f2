"""The audit trail: one row per date (or part of a date) per run, in ``usage_aggregation_runs``.

A successful run's row is written in the date's own transaction, so it exists exactly
when the data does. A failed run's row is written afterwards in a transaction of its
own; it records what was committed (nothing), and in ``error`` how far the run got.
"""

from __future__ import annotations

COLUMNS = (
    "dag_id", "run_id", "task_id", "usage_table", "usage_date", "merchant_id", "keys_found",
    "rows_written", "rows_unchanged", "decreases_refused", "resets", "bad_keys", "new_bad_keys",
    "started_at", "outcome", "error", "redis_partition", "partition_count", "hourly_rows_written",
    "hourly_mismatches",
)  # fmt: skip
#: What a rolled-back run did not commit: recorded as 0 in its audit row.
UNCOMMITTED = (
    "rows_written", "rows_unchanged", "decreases_refused", "resets", "bad_keys", "new_bad_keys", "hourly_rows_written",
    "hourly_mismatches",
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
