"""Isolation of refused rows: a row PostgreSQL refuses is set aside, the rest go through.

A refusal of one row's data (a value too long for an index entry, a total past the
bigint) must not roll back the day: the statement that met it is undone to a savepoint,
the rows are split in halves until each refused row stands alone (:func:`isolate_refused`),
and the refused ones become bad keys (dead letters) while every other row is written.
Any other error (the connection, a lock) still fails the transaction.
"""

from __future__ import annotations

from collections.abc import Callable

from usage_agg.db_errors import is_row_error
from usage_agg.source import BadKey


class Savepoint:
    """A savepoint around statements PostgreSQL may refuse. Released when they succeed; on
    an error ``undo_on`` accepts, rolled back to and released, and the error kept in
    :attr:`error` instead of raised (any other error propagates: the transaction fails)."""

    def __init__(self, cur, name: str, undo_on: Callable[[BaseException], bool]) -> None:
        self.cur, self.name, self.undo_on = cur, name, undo_on
        self.error: Exception | None = None

    def __enter__(self) -> Savepoint:
        self.cur.execute(f"SAVEPOINT {self.name}")
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.cur.execute(f"RELEASE SAVEPOINT {self.name}")
            return False
        if not (isinstance(exc, Exception) and self.undo_on(exc)):
            return False
        self.cur.execute(f"ROLLBACK TO SAVEPOINT {self.name}")
        self.cur.execute(f"RELEASE SAVEPOINT {self.name}")
        self.error = exc
        return True


def isolate_refused(
    cur,
    rows: list,
    attempt: Callable[[list], object],
    refuse: Callable[[tuple, str], BadKey],
    *,
    failed_whole: bool = False,
) -> list[BadKey]:
    """Run ``attempt(rows)``; if PostgreSQL refuses a row, find it and set it aside.

    Each attempt runs in a savepoint. A refusal of the data (not of the connection
    or a lock) splits the rows in halves until every refused row stands alone; the
    others go through. Costs one savepoint when nothing is refused.
    """
    refused: list[BadKey] = []
    middle = len(rows) // 2
    pending = [rows[middle:], rows[:middle]] if failed_whole and len(rows) > 1 else [rows]
    while pending:
        part = pending.pop()
        with Savepoint(cur, "usage_agg_rows", is_row_error) as rows_part:
            attempt(part)
        if rows_part.error is None:
            continue
        if len(part) == 1:
            refused.append(refuse(part[0], f"PostgreSQL refused the row: {first_line(rows_part.error)}"))
        else:
            middle = len(part) // 2
            pending += [part[middle:], part[:middle]]
    return refused


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
