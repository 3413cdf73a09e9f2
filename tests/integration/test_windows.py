"""Windows are right in every zone: bounds where the local period starts, numeric sums that
one merchant cannot overflow for the others, and bad ranges refused."""

from __future__ import annotations

import bisect
import datetime as dt
import re
from functools import cache
from zoneinfo import ZoneInfo, available_timezones

import pytest

from usage_agg.schema import ensure_schema
from usage_agg.windows import usage_windows

UTC = dt.timezone.utc
YEARS = range(2012, 2027)


def _local(t: dt.datetime, tz: ZoneInfo) -> dt.datetime:
    return t.astimezone(tz).replace(tzinfo=None)


@cache
def midnight_changes() -> list[tuple[str, dt.datetime]]:
    """(zone, instant of the change) for every change of offset in YEARS, in every zone
    zoneinfo knows, that crosses local midnight or starts or ends on it."""
    found = []
    midnight = dt.time(0, 0)
    for zone in sorted(available_timezones()):
        tz = ZoneInfo(zone)
        t = dt.datetime(YEARS[0], 1, 1, tzinfo=UTC)
        stop = dt.datetime(YEARS[-1] + 1, 1, 1, tzinfo=UTC)
        offset = t.astimezone(tz).utcoffset()
        while t < stop:
            nxt = t + dt.timedelta(days=1)
            if nxt.astimezone(tz).utcoffset() != offset:
                lo, hi = 0, 24 * 60  # the change lies in (t + lo, t + hi] minutes: bisect to the minute
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (mid, hi) if (t + dt.timedelta(minutes=mid)).astimezone(tz).utcoffset() == offset else (lo, mid)
                hi = t + dt.timedelta(minutes=hi)
                before = hi.replace(tzinfo=None) + offset
                after = _local(hi, tz)
                if before.date() != after.date() or midnight in (before.time(), after.time()):
                    found.append((zone, hi))
                offset = nxt.astimezone(tz).utcoffset()
            t = nxt
    return found


def period_start(local: dt.datetime, grain: str) -> dt.datetime:
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if grain == "day":
        return day
    if grain == "week":
        return day - dt.timedelta(days=day.weekday())
    return day.replace(day=1)


def next_period(start: dt.datetime, grain: str) -> dt.datetime:
    if grain == "day":
        return start + dt.timedelta(days=1)
    if grain == "week":
        return start + dt.timedelta(days=7)
    return (start + dt.timedelta(days=32)).replace(day=1)


@cache
def first_instant(local: dt.datetime, tz: ZoneInfo) -> dt.datetime:
    """The first instant at which ``tz``'s clocks read ``local``; if they never do (clocks
    jump over it), the instant they jump (zoneinfo reads such a time with the offset before)."""
    candidates = {local.replace(tzinfo=tz, fold=f).astimezone(UTC) for f in (0, 1)}
    real = [c for c in candidates if _local(c, tz) == local]
    return min(real) if real else local.replace(tzinfo=tz, fold=0).astimezone(UTC)


@pytest.mark.slow  # finds every zone's changes near midnight
def test_the_year_range_holds_changes_of_every_kind_near_midnight():
    """The zones below include clocks going back across midnight (it happens twice) and
    forward across it (it does not happen)."""
    kinds = set()
    for zone, change in midnight_changes():
        tz = ZoneInfo(zone)
        before, after = _local(change - dt.timedelta(minutes=1), tz), _local(change, tz)
        kinds.add("back" if after < before else "forward")
    assert kinds == {"back", "forward"}
    assert {"America/Havana", "America/Santiago", "America/Asuncion", "Asia/Beirut"} <= {z for z, _ in midnight_changes()}


@pytest.mark.slow  # every change near midnight in every zone
def test_every_window_starts_where_its_local_period_starts_in_every_zone(pg_conn, pg_schema):
    """For every change near midnight in every zone (hours from 3 days before it to 3 days
    after) and every grain: every hour lies in exactly one window, and that window's bounds
    are the first instants (zoneinfo) of the hour's own local period and of the next one;
    the quantities add up. One SQL call per zone and grain."""
    names = ensure_schema(pg_conn, f"{pg_schema}.merchant_usage")
    by_zone: dict[str, set[dt.datetime]] = {}
    for zone, change in midnight_changes():
        first = change.replace(minute=0) - dt.timedelta(days=3)
        by_zone.setdefault(zone, set()).update(first + dt.timedelta(hours=h) for h in range(24 * 6))
    with pg_conn.cursor() as cur:  # one merchant per zone
        for zone, hours in by_zone.items():
            cur.execute(
                f"INSERT INTO {names.hourly.quoted} (merchant_id, usage_hour, metric_type, quantity)"
                " SELECT %s, h, 'bytes', 1 FROM unnest(%s::timestamptz[]) AS h",
                (zone, sorted(hours)),
            )
    pg_conn.commit()
    wrong = []
    for zone, hour_set in sorted(by_zone.items()):
        tz = ZoneInfo(zone)
        hours = sorted(hour_set)
        for grain in ("hour", "day", "week", "month"):
            if grain == "hour":
                start, end = hours[0], hours[-1] + dt.timedelta(hours=1)
            else:
                start = first_instant(period_start(_local(hours[0], tz), grain), tz)
                end = first_instant(next_period(period_start(_local(hours[-1], tz), grain), grain), tz)
            windows = usage_windows(pg_conn, start, end, grain, zone, table=f"{pg_schema}.merchant_usage", merchant_id=zone)
            rows = sorted((w.window_start, w.window_end, w.quantity) for w in windows)
            starts = [s for s, _, _ in rows]
            for hour in hours:
                if grain == "hour":
                    want = (hour, hour + dt.timedelta(hours=1))
                else:
                    local = period_start(_local(hour, tz), grain)
                    want = (first_instant(local, tz), first_instant(next_period(local, grain), tz))
                k = bisect.bisect_right(starts, hour)
                holding = [(s, e) for s, e, _ in rows[max(k - 3, 0) : k + 3] if s <= hour < e]
                if holding != [want]:
                    wrong.append((zone, grain, hour.isoformat(), [w.isoformat() for w in want], holding))
            if sum(q for _, _, q in rows) != len(hours) or len({(s, e) for s, e, _ in rows}) != len(rows):
                wrong.append((zone, grain, "totals", len(hours), sum(q for _, _, q in rows)))
    assert not wrong, f"{len(wrong)} wrong, for example {wrong[:3]}"


BIG = 2**63 - 1  # the most a bigint holds: a merchant counting bytes can get there


def test_a_merchant_past_the_bigint_blocks_no_other_merchant(pg_conn, pg_schema, query):
    """Sums are numeric: the weekly and monthly views and the windows give a merchant whose
    total passes the bigint its exact total, and every other merchant theirs; a merchant
    asked for is filtered on before summing; the 4-argument SQL call still works."""
    names = ensure_schema(pg_conn, f"{pg_schema}.merchant_usage")
    query(f"""INSERT INTO {names.usage.quoted} (merchant_id, usage_date, metric_type, quantity)
              VALUES ('bytes_co', '2025-11-03', 'bytes', {BIG}), ('bytes_co', '2025-11-04', 'bytes', {BIG}),
                     ('small_co', '2025-11-03', 'bytes', 5);
              INSERT INTO {names.hourly.quoted} (merchant_id, usage_hour, metric_type, quantity)
              VALUES ('bytes_co', '2025-11-03 01:00+00', 'bytes', {BIG}), ('bytes_co', '2025-11-03 02:00+00', 'bytes', {BIG}),
                     ('small_co', '2025-11-03 01:00+00', 'bytes', 5);
              SELECT 1""")  # fmt: skip
    want = {"bytes_co": 2 * BIG, "small_co": 5}
    assert dict(query(f"SELECT merchant_id, quantity FROM {names.weekly.quoted}")) == want
    assert dict(query(f"SELECT merchant_id, quantity FROM {names.monthly.quoted}")) == want
    start, end = dt.datetime(2025, 11, 3, tzinfo=UTC), dt.datetime(2025, 11, 4, tzinfo=UTC)
    table = f"{pg_schema}.merchant_usage"
    assert {w.merchant_id: w.quantity for w in usage_windows(pg_conn, start, end, "day", table=table)} == want
    berlin_day = (dt.datetime(2025, 11, 2, 23, tzinfo=UTC), dt.datetime(2025, 11, 3, 23, tzinfo=UTC))
    [small] = usage_windows(pg_conn, *berlin_day, "day", "Europe/Berlin", table=table, merchant_id="small_co")
    assert (small.quantity, small.window_start) == (5, dt.datetime(2025, 11, 2, 23, tzinfo=UTC))
    assert dict(query(f"SELECT merchant_id, quantity FROM {names.windows.quoted}(%s, %s, 'day', 'UTC')", (start, end))) == want


def _refusal(pg_conn, pg_schema, start, end, grain, tz) -> tuple[str, str]:
    """What usage_windows and the SQL function say to ``[start, end)``."""
    with pytest.raises(ValueError) as python:
        usage_windows(pg_conn, start, end, grain, tz, table=f"{pg_schema}.merchant_usage")
    with pg_conn.cursor() as cur, pytest.raises(Exception) as sql:
        cur.execute(f'SELECT * FROM "{pg_schema}".merchant_usage_windows(%s, %s, %s, %s)', (start, end, grain, tz))
    pg_conn.rollback()
    code = getattr(sql.value, "pgcode", None) or getattr(sql.value, "sqlstate", None)
    assert code == "22023", sql.value
    return str(python.value), sql.value.diag.message_primary


def at_(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).astimezone(UTC)


@pytest.mark.parametrize(
    ("start", "end", "grain", "tz", "message"),
    [
        ("2025-11-02T00:00+00:00", "2025-11-01T00:00+00:00", "day", "UTC", r"range: to \(.*\) must be after from"),
        ("2025-11-01T00:00+00:00", "2025-11-01T00:00+00:00", "day", "UTC", r"range: to \(.*\) must be after from"),
        # a Berlin day does not start at UTC midnight
        ("2025-11-01T00:00+00:00", "2025-11-02T23:00+00:00", "day", "Europe/Berlin", "not on day window boundaries of Europe/Berlin: from 2025-11-01 00:00:00"),
        # Sunday local midnight is no week boundary (weeks start on Monday)
        ("2025-11-02T00:00+01:00", "2025-11-10T00:00+01:00", "week", "Europe/Berlin", "not on week window boundaries of Europe/Berlin: from "),
        # a week that ends on a Sunday
        ("2025-11-03T00:00+01:00", "2025-11-09T00:00+01:00", "week", "Europe/Berlin", "not on week window boundaries of Europe/Berlin: to "),
        # a month from its second day
        ("2025-11-02T00:00+09:00", "2025-12-01T00:00+09:00", "month", "Asia/Tokyo", "not on month window boundaries of Asia/Tokyo: from "),
        # an hour window is a UTC hour; Kolkata's :00 is :30 UTC
        ("2025-11-01T00:00+05:30", "2025-11-01T06:00+05:30", "hour", "Asia/Kolkata", "not on hour window boundaries"),
        # Havana's second midnight of 2024-11-03 (clocks went back from 01:00): the day began at the first
        ("2024-11-03T00:00-05:00", "2024-11-04T00:00-05:00", "day", "America/Havana", "from 2024-11-03 05:00:00.*starts at 2024-11-03 04:00:00"),
    ],
    ids=["reversed", "empty", "berlin-day-at-utc-midnight", "week-from-sunday", "week-to-sunday", "month-from-day-2",
         "kolkata-half-hour", "havana-second-midnight"],
)  # fmt: skip
def test_a_range_that_is_reversed_or_cuts_a_window_is_refused(pg_conn, pg_schema, start, end, grain, tz, message):
    ensure_schema(pg_conn, f"{pg_schema}.merchant_usage")
    python, sql = _refusal(pg_conn, pg_schema, at_(start), at_(end), grain, tz)
    assert re.search(message, sql), sql
    if not message.startswith("range: to"):  # Python refuses a reversed range itself, in its own words
        assert python == sql
    else:
        assert re.search(r"range: end \(.*\) must be after start", python), python


def test_a_null_bound_is_refused(pg_conn, pg_schema):
    ensure_schema(pg_conn, f"{pg_schema}.merchant_usage")
    for args in ((None, "2025-11-01"), ("2025-11-01", None)):
        with pg_conn.cursor() as cur, pytest.raises(Exception, match="range: from and to must both be given") as sql:
            cur.execute(f"SELECT * FROM \"{pg_schema}\".merchant_usage_windows(%s, %s, 'day', 'UTC')", args)
        pg_conn.rollback()
        assert (getattr(sql.value, "pgcode", None) or getattr(sql.value, "sqlstate", None)) == "22023"
    with pytest.raises(ValueError, match="start: must be a timezone-aware datetime, got None"):
        usage_windows(pg_conn, None, dt.datetime(2025, 11, 1, tzinfo=UTC), "day", table=f"{pg_schema}.merchant_usage")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("start", "end", "grain", "tz"),
    [
        ("2025-11-03T00:00+01:00", "2025-11-17T00:00+01:00", "week", "Europe/Berlin"),  # Mondays
        ("2025-10-20T00:00+02:00", "2025-11-03T00:00+01:00", "week", "Europe/Berlin"),  # across the end of summer time
        ("2025-10-01T00:00+09:00", "2025-12-01T00:00+09:00", "month", "Asia/Tokyo"),
        ("2024-11-03T00:00-04:00", "2024-11-04T00:00-05:00", "day", "America/Havana"),  # the first midnight
        ("2024-09-08T01:00-03:00", "2024-09-09T00:00-03:00", "day", "America/Santiago"),  # midnight skipped: 01:00
        ("2025-11-01T00:30+05:30", "2025-11-01T06:30+05:30", "hour", "Asia/Kolkata"),
    ],
)
def test_a_range_on_window_boundaries_is_answered(pg_conn, pg_schema, start, end, grain, tz):
    ensure_schema(pg_conn, f"{pg_schema}.merchant_usage")
    assert usage_windows(pg_conn, at_(start), at_(end), grain, tz, table=f"{pg_schema}.merchant_usage") == []


def test_a_version_5_database_is_upgraded_to_numeric_views_and_the_new_function(pg_conn, pg_schema, query):
    """What version 5 created (its exact DDL: bigint views, the 4-argument function) is
    replaced by the upgrade, and running the DDL again changes nothing."""
    from pathlib import Path

    from usage_agg.schema import SchemaNames, quote_identifier

    names = SchemaNames.for_table(f"{pg_schema}.merchant_usage")
    v5 = (Path(__file__).parent / "schema_v5.sql").read_text().format(
        usage_table=names.usage.quoted, errors_table=names.errors.quoted, runs_table=names.runs.quoted,
        incarnations_table=names.incarnations.quoted, hourly_table=names.hourly.quoted,
        hourly_index=quote_identifier(f"{names.hourly.name}_idx"), windows_function=names.windows.quoted,
        weekly_view=names.weekly.quoted, monthly_view=names.monthly.quoted,
        usage_date_index='"merchant_usage_usage_date_idx"', errors_open_index='"usage_aggregation_errors_open_idx"',
        runs_date_index='"usage_aggregation_runs_date_idx"', version_comment="'usage-agg schema 5'",
    )  # fmt: skip
    query(f'CREATE SCHEMA "{pg_schema}"; {v5}; SELECT 1')
    quantity_types = f"""SELECT c.relname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                         JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE n.nspname = '{pg_schema}' AND a.attname = 'quantity' AND c.relkind = 'v' ORDER BY 1"""
    functions = f"""SELECT pg_get_function_identity_arguments(p.oid), pg_get_function_result(p.oid) FROM pg_proc p
                    JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = '{pg_schema}'"""
    assert query(quantity_types) == [("merchant_usage_monthly", "bigint"), ("merchant_usage_weekly", "bigint")]

    ensure_schema(pg_conn, names.usage)
    for _ in range(2):  # the upgrade, then the same DDL again
        assert query(quantity_types) == [("merchant_usage_monthly", "numeric"), ("merchant_usage_weekly", "numeric")]
        [(arguments, result)] = query(functions)
        assert arguments == "window_from timestamp with time zone, window_to timestamp with time zone, grain text, tz text, merchant text"
        assert "quantity numeric" in result
        query(f"{names.ddl()}; SELECT 1")
    assert query("SELECT obj_description(%s::regclass, 'pg_class')", (names.usage.quoted,)) == [("usage-agg schema 6",)]
