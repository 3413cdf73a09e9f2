"""Hourly counters: written beside the daily ones, aggregated in the same transaction, windowed in any zone."""

from __future__ import annotations

import datetime as dt
import random
from collections import defaultdict
from zoneinfo import ZoneInfo

import pytest

from usage_agg.aggregate import aggregate_day
from usage_agg.keys import build_key, hourly_key
from usage_agg.source import DAILY_DIFFERS
from usage_agg.tracking import track_usage
from usage_agg.windows import usage_windows

UTC = dt.timezone.utc
DAY = "2025-11-01"


def at(day: str, hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime.fromisoformat(day).replace(hour=hour, minute=minute, tzinfo=UTC)


def hourly_rows(query, table) -> dict[tuple[str, str, str], tuple[int, int]]:
    """``(merchant, metric, hour as UTC ISO) -> (quantity, redis_offset)``."""
    return {
        (m, t, h.astimezone(UTC).isoformat()): (q, o)
        for m, t, h, q, o in query(f"SELECT merchant_id, metric_type, usage_hour, quantity, redis_offset FROM {table}_hourly")
    }


def test_tracking_counts_the_hour_beside_the_day_in_one_round_trip(redis_client):
    assert track_usage(redis_client, "acme", "queries", 3, at=at(DAY, 7, 15)) == 3
    assert track_usage(redis_client, "acme", "queries", 2, at=at(DAY, 7, 59)) == 5
    assert track_usage(redis_client, "acme", "queries", 4, at=dt.datetime(2025, 11, 1, 9, 5, tzinfo=ZoneInfo("Europe/Berlin"))) == 9
    assert redis_client.hgetall(hourly_key("acme", DAY, "queries")) == {b"07": b"5", b"08": b"4"}  # 09:05 Berlin is 08:05 UTC
    assert 7 * 86400 - 5 <= redis_client.ttl(hourly_key("acme", DAY, "queries")) <= 7 * 86400
    assert not list(redis_client.scan_iter(match="usage:*hourly*"))  # never a usage key
    track_usage(redis_client, "acme", "storage", 1, usage_date=DAY)  # the day, but no moment: no hour guessed
    assert not redis_client.exists(hourly_key("acme", DAY, "storage"))
    with pytest.raises(ValueError, match="^at: must be a timezone-aware"):
        track_usage(redis_client, "acme", "queries", at=dt.datetime(2025, 11, 1, 7))
    with pytest.raises(ValueError, match="^usage_date: 2025-11-02 is not the UTC date of at"):
        track_usage(redis_client, "acme", "queries", at=at(DAY, 7), usage_date="2025-11-02")


@pytest.mark.usefixtures("merge_by")
def test_hourly_rows_are_written_with_the_daily_ones_and_follow_the_same_rules(redis_client, pg_conn, table, query):
    track_usage(redis_client, "acme", "queries", 5, at=at(DAY, 0, 10))
    track_usage(redis_client, "acme", "queries", 7, at=at(DAY, 23, 59))
    track_usage(redis_client, "globex", "queries", 2, usage_date=DAY)  # a daily-only writer: no hours, no failure
    first = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (first.rows_written, first.hourly_rows_written, first.bad_hourly, first.hourly_mismatches) == (2, 2, 0, 0)
    assert hourly_rows(query, table) == {
        ("acme", "queries", "2025-11-01T00:00:00+00:00"): (5, 0),
        ("acme", "queries", "2025-11-01T23:00:00+00:00"): (7, 0),
    }
    again = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (again.hourly_rows_written, again.hourly_rows_unchanged) == (0, 2)  # unchanged rows not rewritten

    track_usage(redis_client, "acme", "queries", 1, at=at(DAY, 23, 59))
    grown = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (grown.hourly_rows_written, grown.hourly_rows_unchanged) == (1, 1)

    redis_client.hset(hourly_key("acme", DAY, "queries"), "00", 2)  # an hour lowered: a reset, as for days
    redis_client.decrby(build_key("acme", DAY, "queries"), 3)
    reset = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (reset.resets, reset.hourly_resets) == (1, 1)
    assert hourly_rows(query, table)[("acme", "queries", "2025-11-01T00:00:00+00:00")] == (5, 3)

    redis_client.delete(hourly_key("acme", DAY, "queries"))  # expired: stored hours stay
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert len(hourly_rows(query, table)) == 2
    schema = table.split(".")[0]
    assert query(f"SELECT hourly_rows_written FROM {schema}.usage_aggregation_runs ORDER BY id") == [(2,), (0,), (1,), (1,), (0,)]


@pytest.mark.usefixtures("merge_by")
def test_every_hour_of_a_key_that_grows_in_several_hours_is_written(redis_client, pg_conn, table, query):
    """A day with hourly rows compares its staged hours with the stored ones: one row per
    key and hour, so a key that grew in two stored hours and a new one writes all three."""
    track_usage(redis_client, "acme", "queries", 5, at=at(DAY, 3, 20))
    track_usage(redis_client, "acme", "queries", 2, at=at(DAY, 17, 45))
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    for hour, amount in ((3, 1), (17, 4), (20, 6)):
        track_usage(redis_client, "acme", "queries", amount, at=at(DAY, hour, 30))
    grown = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (grown.rows_written, grown.hourly_rows_written, grown.hourly_rows_unchanged) == (1, 3, 0)
    assert hourly_rows(query, table) == {
        ("acme", "queries", "2025-11-01T03:00:00+00:00"): (6, 0),
        ("acme", "queries", "2025-11-01T17:00:00+00:00"): (6, 0),
        ("acme", "queries", "2025-11-01T20:00:00+00:00"): (6, 0),
    }


@pytest.mark.usefixtures("merge_by")
def test_bad_hourly_hashes_and_fields_are_dead_lettered_and_block_nothing(redis_client, pg_conn, table, pg_schema, query):
    track_usage(redis_client, "acme", "queries", 5, at=at(DAY, 3))
    hours = hourly_key("acme", DAY, "queries")
    redis_client.hset(hours, mapping={"24": 1, "7": 1, "05": "x"})  # no hour 24, "7" is not "07", a bad value
    track_usage(redis_client, "globex", "queries", 4, at=at(DAY, 4))
    redis_client.delete(hourly_key("globex", DAY, "queries"))
    redis_client.set(hourly_key("globex", DAY, "queries"), "not a hash")
    result = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (result.bad_keys, result.bad_hourly, result.new_bad_keys) == (0, 4, 4)
    assert dict(query(f"SELECT merchant_id, quantity FROM {table}")) == {"acme": 5, "globex": 4}  # days committed
    assert hourly_rows(query, table) == {("acme", "queries", "2025-11-01T03:00:00+00:00"): (5, 0)}
    letters = dict(query(f"SELECT redis_key, reason FROM {pg_schema}.usage_aggregation_errors"))
    assert letters.keys() == {
        f"{hours} field 24", f"{hours} field 7", f"{hours} field 05", hourly_key("globex", DAY, "queries"),
    }  # fmt: skip
    assert "is not one of 00 to 23" in letters[f"{hours} field 24"]
    fields = query(f"SELECT hash_field FROM {pg_schema}.usage_aggregation_errors WHERE hash_field IS NOT NULL")
    assert sorted(bytes(f) for f, in fields) == [b"05", b"24", b"7"]  # the hash itself has none
    assert "not a hash of hourly counts" in letters[hourly_key("globex", DAY, "queries")]
    assert aggregate_day(redis_client, pg_conn, DAY, table=table).new_bad_keys == 0  # known: no new alert

    redis_client.hdel(hours, "24", "7")
    redis_client.hset(hours, "05", 0)  # fixed
    redis_client.delete(hourly_key("globex", DAY, "queries"))
    redis_client.hset(hourly_key("globex", DAY, "queries"), "04", 4)  # fixed
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    resolutions = dict(query(f"SELECT redis_key, resolution FROM {pg_schema}.usage_aggregation_errors"))
    assert resolutions == {
        f"{hours} field 24": None, f"{hours} field 7": None,  # gone from Redis, never fixed: an operator dismisses them
        f"{hours} field 05": "fixed", hourly_key("globex", DAY, "queries"): "fixed",
    }  # fmt: skip


def test_a_daily_total_that_differs_from_its_hours_is_counted_and_named(redis_client, pg_conn, table):
    track_usage(redis_client, "acme", "queries", 5, at=at(DAY, 3))
    redis_client.incrby(build_key("acme", DAY, "queries"), 2)  # a writer that updates only the daily counter
    result = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert result.hourly_mismatches == 1
    assert result.hourly_mismatch_samples == [
        {"merchant_id": "acme", "metric_type": "queries", "daily": 7, "hourly_sum": 5, "reason": DAILY_DIFFERS}
    ]


class ScansTwice:
    """The real client; SCAN and SSCAN return every key again after the last (Redis resizing its table)."""

    def __init__(self, client):
        self.client = client

    def __getattr__(self, name):
        return getattr(self.client, name)

    def scan_iter(self, *args, **kwargs):
        yield from self.client.scan_iter(*args, **kwargs)
        yield from self.client.scan_iter(*args, **kwargs)

    def sscan_iter(self, *args, **kwargs):
        yield from self.client.sscan_iter(*args, **kwargs)
        yield from self.client.sscan_iter(*args, **kwargs)


def test_the_run_counts_reads_so_a_key_returned_twice_counts_twice(redis_client, pg_conn, table, query):
    """The audit's counts are of reads, as the merge is: a key read twice is merged twice."""
    track_usage(redis_client, "acme", "queries", 5, at=at(DAY, 3))
    redis_client.incrby(build_key("acme", DAY, "queries"), 2)  # the day differs from its hours
    result = aggregate_day(ScansTwice(redis_client), pg_conn, DAY, table=table, batch_size=1)
    assert (result.keys_found, result.rows_written, result.rows_unchanged, result.hourly_mismatches) == (2, 1, 1, 2)
    assert query(f"SELECT quantity, redis_offset FROM {table}") == [(7, 0)]


def test_the_documented_protocol_works_from_any_client(redis_client, pg_conn, table, query):
    """The commands the README gives a writer in another language, sent as raw commands."""
    replies = []
    for command in (
        "MULTI",
        "INCRBY usage:acme_electronics_2024:2025-11-01:api_calls 3",
        "EXPIRE usage:acme_electronics_2024:2025-11-01:api_calls 604800",
        "HINCRBY usage-hourly:acme_electronics_2024:2025-11-01:api_calls 14 3",
        "EXPIRE usage-hourly:acme_electronics_2024:2025-11-01:api_calls 604800",
        "SADD usage-index:2025-11-01 usage:acme_electronics_2024:2025-11-01:api_calls",
        "EXPIRE usage-index:2025-11-01 604800",
        "EXEC",
    ):
        replies.append(redis_client.execute_command(*command.split()))
    assert replies[-1] == [3, 1, 3, 1, 1, 1]
    result = aggregate_day(redis_client, pg_conn, DAY, table=table)
    assert (result.discovery, result.rows_written, result.hourly_rows_written) == ("index", 1, 1)
    assert hourly_rows(query, table) == {("acme_electronics_2024", "api_calls", "2025-11-01T14:00:00+00:00"): (3, 0)}


# Windows


def seed_hours(redis_client, pg_conn, table, first: dt.datetime, hours: int, merchants=("tokyo_shop", "berlin_shop")):
    """Random usage in every hour from ``first`` for ``hours`` hours; aggregated; returns what was counted."""
    rng = random.Random(7)
    counted: dict[tuple[str, dt.datetime], int] = defaultdict(int)
    days = set()
    for i in range(hours):
        moment = first + dt.timedelta(hours=i, minutes=rng.randrange(60))
        for merchant in merchants:
            amount = rng.randrange(1, 50)
            track_usage(redis_client, merchant, "api_calls", amount, at=moment)
            counted[(merchant, moment.replace(minute=0))] += amount
            days.add(moment.date())
    for day in sorted(days):
        aggregate_day(redis_client, pg_conn, day, table=table)
    return counted


def expected(counted, start, end, grain: str, zone: str) -> dict[tuple[str, dt.datetime, dt.datetime], int]:
    """Windows computed independently, in Python with zoneinfo."""
    tz = ZoneInfo(zone)
    out: dict = defaultdict(int)
    for (merchant, hour), amount in counted.items():
        if not start <= hour < end:
            continue
        local = hour.astimezone(tz)
        if grain == "hour":
            window_start, window_end = hour, hour + dt.timedelta(hours=1)
        else:
            day_start = local.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
            if grain == "day":
                naive_start, naive_end = day_start, day_start + dt.timedelta(days=1)
            elif grain == "week":
                naive_start = day_start - dt.timedelta(days=day_start.weekday())
                naive_end = naive_start + dt.timedelta(days=7)
            else:
                naive_start = day_start.replace(day=1)
                naive_end = (naive_start + dt.timedelta(days=32)).replace(day=1)
            window_start = naive_start.replace(tzinfo=tz).astimezone(UTC)
            window_end = naive_end.replace(tzinfo=tz).astimezone(UTC)
        out[(merchant, window_start, window_end)] += amount
    return dict(out)


def windows_of(rows):
    return {(w.merchant_id, w.window_start.astimezone(UTC), w.window_end.astimezone(UTC)): w.quantity for w in rows}


@pytest.mark.parametrize(
    ("zone", "grain", "first", "hours", "start", "end"),
    [
        # a Tokyo merchant's local days: each one straddles two UTC dates
        ("Asia/Tokyo", "day", "2025-10-30T15:00", 96, "2025-10-30T15:00", "2025-11-03T15:00"),
        # weeks from Monday in Berlin across the end of summer time (2025-10-26: a 25-hour day)
        ("Europe/Berlin", "week", "2025-10-19T22:00", 24 * 15, "2025-10-19T22:00", "2025-11-02T23:00"),
        # Berlin days around the start of summer time (2025-03-30: a 23-hour day)
        ("Europe/Berlin", "day", "2025-03-28T23:00", 96, "2025-03-28T23:00", "2025-04-01T22:00"),
        # hours in New York across its fall-back (the local 01:00 happens twice: two windows)
        ("America/New_York", "hour", "2025-11-02T03:00", 6, "2025-11-02T03:00", "2025-11-02T09:00"),
        # months in Kolkata (+05:30): hours straddling local midnight count where they start
        ("Asia/Kolkata", "month", "2025-10-30T12:00", 72, "2025-09-30T18:30", "2025-11-30T18:30"),
    ],
    ids=["tokyo-days", "berlin-weeks-dst-end", "berlin-days-dst-start", "new-york-hours-fall-back", "kolkata-months"],
)
def test_windows_match_totals_computed_independently(redis_client, pg_conn, table, zone, grain, first, hours, start, end):
    first_hour = dt.datetime.fromisoformat(first).replace(tzinfo=UTC)
    counted = seed_hours(redis_client, pg_conn, table, first_hour, hours)
    start_at = dt.datetime.fromisoformat(start).replace(tzinfo=UTC)
    end_at = dt.datetime.fromisoformat(end).replace(tzinfo=UTC)
    rows = usage_windows(pg_conn, start_at, end_at, grain, zone, table=table)
    assert windows_of(rows) == expected(counted, start_at, end_at, grain, zone)
    assert sum(w.quantity for w in rows) == sum(a for (m, h), a in counted.items() if start_at <= h < end_at)
    one = usage_windows(pg_conn, start_at, end_at, grain, zone, table=table, merchant_id="tokyo_shop")
    assert {w.merchant_id for w in one} == {"tokyo_shop"}


def test_a_berlin_day_lasts_25_hours_when_summer_time_ends(redis_client, pg_conn, table):
    counted = seed_hours(redis_client, pg_conn, table, dt.datetime(2025, 10, 25, 22, tzinfo=UTC), 25, merchants=("m",))
    [day] = usage_windows(
        pg_conn, dt.datetime(2025, 10, 25, 22, tzinfo=UTC), dt.datetime(2025, 10, 26, 23, tzinfo=UTC), "day", "Europe/Berlin",
        table=table,
    )  # fmt: skip
    assert day.window_end - day.window_start == dt.timedelta(hours=25)
    assert day.quantity == sum(counted.values())


def test_windows_refuse_an_unknown_grain_or_zone(pg_conn, table, redis_client):
    aggregate_day(redis_client, pg_conn, DAY, table=table)  # the schema
    start, end = at(DAY, 0), at(DAY, 23)
    with pytest.raises(ValueError, match="^grain: must be one of hour, day, week, month"):
        usage_windows(pg_conn, start, end, "fortnight", table=table)
    with pytest.raises(Exception, match="tz: Mars/Olympus is not a time zone"):
        usage_windows(pg_conn, start, end, "day", "Mars/Olympus", table=table)
    pg_conn.rollback()
    schema = table.split(".")[0]
    with pg_conn.cursor() as cur, pytest.raises(Exception, match="grain: must be hour, day, week or month, got decade"):
        cur.execute(f"SELECT * FROM {schema}.merchant_usage_windows(now(), now(), 'decade', 'UTC')")
    pg_conn.rollback()


def test_status_reports_hours_and_mismatches(redis_client, pg_conn, table):
    from usage_agg.reconcile import reconcile_date

    track_usage(redis_client, "acme", "queries", 5, at=at(DAY, 3))
    track_usage(redis_client, "acme", "queries", 2, at=at(DAY, 17))
    aggregate_day(redis_client, pg_conn, DAY, table=table)
    status = reconcile_date(redis_client, pg_conn, DAY, table=table, hourly=True)
    assert status.in_sync and status.hourly_differing_rows == 0
    assert [(h["hour"], h["redis"], h["stored"]) for h in status.hours if h["redis"] or h["stored"]] == [
        ("03", 5, 5), ("17", 2, 2),
    ]  # fmt: skip
    assert len(status.hours) == 24

    redis_client.hincrby(hourly_key("acme", DAY, "queries"), "17", 1)  # an hour grew, the day did not
    status = reconcile_date(redis_client, pg_conn, DAY, table=table, hourly=True)
    assert (status.in_sync, status.hourly_differing_rows, status.hourly_mismatches) == (False, 1, 1)
    assert status.hourly_mismatch_samples == [
        {"merchant_id": "acme", "metric_type": "queries", "daily": 7, "hourly_sum": 8, "reason": DAILY_DIFFERS}
    ]
    assert [h for h in status.hours if h["hour"] == "17"] == [{"hour": "17", "redis": 3, "stored": 2}]
    assert reconcile_date(redis_client, pg_conn, DAY, table=table).hours == []  # the hour table only when asked


def test_the_readme_window_query_runs_as_written(redis_client, pg_conn, table, pg_schema):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    sql = readme.split("```sql\nSELECT * FROM merchant_usage_windows", 1)[1].split("```", 1)[0]
    sql = "SELECT * FROM merchant_usage_windows" + sql
    tokyo = ZoneInfo("Asia/Tokyo")
    for day, amount in ((1, 4), (2, 6)):  # 00:30 Tokyo: the previous UTC date
        track_usage(redis_client, "acme_electronics_2024", "queries", amount, at=dt.datetime(2025, 11, day, 0, 30, tzinfo=tokyo))
    for day in ("2025-10-31", "2025-11-01"):
        aggregate_day(redis_client, pg_conn, day, table=table)
    with pg_conn.cursor() as cur:
        cur.execute(f'SET search_path TO "{pg_schema}"')
        cur.execute(sql)
        rows = [(m, start.astimezone(tokyo).date().isoformat(), q) for m, _, start, _, q in cur.fetchall()]
    pg_conn.rollback()
    assert rows == [("acme_electronics_2024", "2025-11-01", 4), ("acme_electronics_2024", "2025-11-02", 6)]


@pytest.mark.usefixtures("merge_by")
def test_an_hour_past_bigint_names_its_utc_hour_whatever_the_session_time_zone(pg_conn, pg_schema, query):
    """The dead letter of an hour whose total would pass the bigint names the hash field
    (the UTC hour), not the hour on the session's clock."""
    import datetime as dt

    from usage_agg.schema import ensure_schema
    from usage_agg.sink import DayWriter

    names = ensure_schema(pg_conn, f"{pg_schema}.merchant_usage")
    day = dt.date(2025, 11, 1)
    with DayWriter(pg_conn, names, day) as writer:
        writer.stage_hours([(b"acme", b"q", 5, 2)])
        writer.merge()
    query(f"UPDATE {names.hourly.quoted} SET quantity = {2**63 - 1}, redis_offset = {2**63 - 3} RETURNING 1")
    with pg_conn.cursor() as cur:
        cur.execute("SET TIME ZONE 'Pacific/Kiritimati'")  # 05:00 UTC is 19:00 there
    with DayWriter(pg_conn, names, day) as writer:
        writer.stage_hours([(b"acme", b"q", 5, 5)])
        (refused,) = writer.merge().refused
    assert (refused.raw_key, refused.field) == (b"usage-hourly:acme:2025-11-01:q", b"05")
    assert "would exceed PostgreSQL's bigint" in refused.reason
