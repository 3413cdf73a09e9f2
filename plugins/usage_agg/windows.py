"""Usage over any window, in any time zone, from the hourly rows.

A thin helper over the SQL function created with the schema (``{table}_windows``, for
the default table ``merchant_usage_windows(from, to, grain, tz)``), so SQL users and
Python callers get the same answer. Grains: ``hour``, ``day``, ``week`` (ISO, from
Monday) and ``month``, as the zone's clocks show them, DST included.
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

from usage_agg.schema import resolve_names

GRAINS = ("hour", "day", "week", "month")


class Window(NamedTuple):
    merchant_id: str
    metric_type: str
    window_start: dt.datetime
    window_end: dt.datetime
    quantity: int


def usage_windows(
    pg_conn,
    start: dt.datetime,
    end: dt.datetime,
    grain: str,
    tz: str = "UTC",
    *,
    table: str = "merchant_usage",
    merchant_id: str | None = None,
) -> list[Window]:
    """Each merchant's usage per ``grain`` window of ``tz`` for the hours in ``[start, end)``.

    Give ``start`` and ``end`` on window boundaries of ``tz`` (for example local
    midnights for days): a window cut by them holds only the hours inside.
    """
    for name, value in (("start", start), ("end", end)):
        if not isinstance(value, dt.datetime) or value.tzinfo is None:
            raise ValueError(f"{name}: must be a timezone-aware datetime, got {value!r}")
    if grain not in GRAINS:
        raise ValueError(f"grain: must be one of {', '.join(GRAINS)}, got {grain!r}")
    names = resolve_names(pg_conn, table)
    merchant_filter = "" if merchant_id is None else " WHERE merchant_id = %(merchant)s"
    with pg_conn.cursor() as cur:
        cur.execute(
            f"SELECT merchant_id, metric_type, window_start, window_end, quantity"
            f" FROM {names.windows.quoted}(%(start)s, %(end)s, %(grain)s, %(tz)s){merchant_filter}",
            {"start": start, "end": end, "grain": grain, "tz": tz, "merchant": merchant_id},
        )
        rows = [Window(m, t, s, e, int(q)) for m, t, s, e, q in cur.fetchall()]
    pg_conn.rollback()
    return rows
