"""What a PostgreSQL error means for the aggregation, with either driver.

psycopg2 (Airflow 2) names the SQLSTATE ``pgcode``, psycopg 3 (Airflow 3) ``sqlstate``.
Errors of a single row (bad data, a value or index entry too large) are isolated and
dead-lettered; everything else (a lost connection, a lock wait that timed out) fails
the run, which Airflow retries.
"""

from __future__ import annotations

LOCK_NOT_AVAILABLE = "55P03"
QUERY_CANCELED = "57014"
UNIQUE_VIOLATION = "23505"
#: SQLSTATE classes a single row can cause: data exceptions, integrity constraint
#: violations, program limits (an index entry over a third of a page).
ROW_ERROR_CLASSES = ("22", "23", "54")


class LockWaitTimeout(RuntimeError):
    """A bounded wait for a lock ran out; transient, so Airflow retries the task."""


def sqlstate(err: BaseException) -> str | None:
    return getattr(err, "sqlstate", None) or getattr(err, "pgcode", None)


def is_row_error(err: BaseException) -> bool:
    """Whether ``err`` is PostgreSQL refusing some row's data (not the connection, not a lock)."""
    code = sqlstate(err)
    return code is not None and code[:2] in ROW_ERROR_CLASSES


def is_unique_violation(err: BaseException) -> bool:
    """A row already there: for a plain INSERT, a reason to merge instead, not bad data."""
    return sqlstate(err) == UNIQUE_VIOLATION


def is_lock_timeout(err: BaseException) -> bool:
    return sqlstate(err) == LOCK_NOT_AVAILABLE


def describe(err: BaseException, conn=None) -> str:
    """One line: the server's own message; for a lost connection its cause, and for a
    statement timeout where the limit comes from and how to lift it (recognised by the
    server's English message: a server with translated ``lc_messages`` gets the short form).

    A session the server ended leaves its last words (``FATAL: terminating connection
    due to administrator command``) in the connection's error message, which both
    drivers expose as ``conn.info.error_message``; the exception alone often says only
    "server closed the connection unexpectedly" or "the connection is lost".
    """
    message = " ".join(str(err).split()) or type(err).__name__
    code = sqlstate(err)
    if code == QUERY_CANCELED and "statement timeout" in message:
        return f"{message} (SQLSTATE {code}): {STATEMENT_TIMEOUT_HINT}"
    if code:
        return f"{message} (SQLSTATE {code})"
    if "closed the connection" in message or "connection is lost" in message or "connection already closed" in message:
        last_words = next(
            (note.removeprefix(SERVER_SAID) for note in getattr(err, "__notes__", ()) if note.startswith(SERVER_SAID)),
            None,
        ) or server_said(conn)
        if last_words:
            return f"{message}: the server said {last_words!r}"
        return (
            f"{message}: PostgreSQL ended the session (a backend terminated by an administrator or "
            "pg_terminate_backend, a server restart or crash, idle_in_transaction_session_timeout, or the "
            "network); the server log says which"
        )
    return message


SERVER_SAID = "the server said: "
#: A retry meets the same limit again, so the error says where it comes from and how to lift it.
STATEMENT_TIMEOUT_HINT = (
    "the statement_timeout in force for this session (set for its role, its database, the server "
    "or the connection) ended it, and every retry meets it again (a day's once-a-day comparison "
    "is one statement over all its rows); raise it for this role (ALTER ROLE ... SET "
    "statement_timeout), or in the Airflow connection's extra: "
    '{"options": "-c statement_timeout=0"}'
)


def note_server_said(err: BaseException, conn) -> None:
    """Keep the server's last words on ``err`` (as a note) before anything else touches ``conn``:
    a rollback on a lost session can replace them with "no connection to the server"."""
    last_words = server_said(conn)
    if last_words and not any(n.startswith(SERVER_SAID) for n in getattr(err, "__notes__", ())):
        err.add_note(SERVER_SAID + last_words)


def server_said(conn) -> str | None:
    """The FATAL (or PANIC) line the server sent before it closed ``conn``, if the driver kept it."""
    try:
        text = getattr(getattr(conn, "info", None), "error_message", None) or ""
    except Exception:  # a closed psycopg2 connection may refuse even this
        return None
    for line in str(text).splitlines():
        if line.startswith(("FATAL:", "PANIC:")):
            return " ".join(line.split())
    return None
