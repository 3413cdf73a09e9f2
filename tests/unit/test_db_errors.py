"""What a PostgreSQL error means, with either driver's attribute for the SQLSTATE."""

from __future__ import annotations

import pytest

from usage_agg.db_errors import describe, is_lock_timeout, is_row_error, sqlstate


class Psycopg3Error(Exception):
    def __init__(self, message="", sqlstate=None):
        super().__init__(message)
        self.sqlstate = sqlstate


class Psycopg2Error(Exception):
    def __init__(self, message="", pgcode=None):
        super().__init__(message)
        self.pgcode = pgcode


@pytest.mark.parametrize("error", [Psycopg3Error, Psycopg2Error])
def test_either_drivers_sqlstate_is_read(error):
    assert sqlstate(error("x", "23505")) == "23505"
    assert sqlstate(error("x", None)) is None
    assert sqlstate(ValueError("x")) is None


@pytest.mark.parametrize(
    ("code", "row_error"),
    [("22003", True), ("22P02", True), ("23505", True), ("23514", True), ("54000", True),
     ("55P03", False), ("57P01", False), ("08006", False), ("40001", False), ("42P01", False), (None, False)],
)  # fmt: skip
def test_only_data_integrity_and_limit_errors_are_a_rows_fault(code, row_error):
    assert is_row_error(Psycopg3Error("x", code)) is row_error
    assert is_row_error(Psycopg2Error("x", code)) is row_error


def test_a_lock_timeout_is_55P03_alone():
    assert is_lock_timeout(Psycopg2Error("x", "55P03"))
    assert not is_lock_timeout(Psycopg2Error("x", "55000"))
    assert not is_lock_timeout(ValueError("55P03"))


def test_describe_is_one_line_with_the_sqlstate():
    assert describe(Psycopg3Error("  value too long\n  DETAIL:  x  ", "22001")) == "value too long DETAIL: x (SQLSTATE 22001)"
    assert describe(ValueError("plain\nmessage")) == "plain message"
    assert describe(TimeoutError()) == "TimeoutError"


@pytest.mark.parametrize(
    "message",
    [
        "server closed the connection unexpectedly",
        "the connection is lost",
        "connection already closed",
    ],
)
def test_a_lost_connection_says_what_can_cause_it(message):
    assert describe(Psycopg2Error(message)) == (
        f"{message}: PostgreSQL ended the session (a backend terminated by an administrator or "
        "pg_terminate_backend, a server restart or crash, idle_in_transaction_session_timeout, or the "
        "network); the server log says which"
    )


def test_a_lost_connection_with_a_sqlstate_keeps_the_short_form():
    assert describe(Psycopg3Error("server closed the connection unexpectedly", "57P01")) == (
        "server closed the connection unexpectedly (SQLSTATE 57P01)"
    )


def test_a_statement_timeout_says_where_the_limit_comes_from_and_how_to_lift_it():
    from usage_agg.db_errors import STATEMENT_TIMEOUT_HINT

    timed_out = Psycopg2Error("canceling statement due to statement timeout\n", "57014")
    assert describe(timed_out) == f"canceling statement due to statement timeout (SQLSTATE 57014): {STATEMENT_TIMEOUT_HINT}"
    assert '"options": "-c statement_timeout=0"' in STATEMENT_TIMEOUT_HINT
    # A cancel by hand (pg_cancel_backend) shares the SQLSTATE and keeps the short form.
    cancelled = Psycopg3Error("canceling statement due to user request", "57014")
    assert describe(cancelled) == "canceling statement due to user request (SQLSTATE 57014)"
