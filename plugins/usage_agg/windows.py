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
#: The SQLSTATE the SQL function refuses bad arguments with.
INVALID_PARAMETER_VALUE = "22023"


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

    ``start`` and ``end`` must be window boundaries of ``tz`` (for days, the first instant
    of a local day), with ``start`` before ``end``; anything else raises ``ValueError``
    naming the problem (the SQL function refuses it too, SQLSTATE 22023). A window starts
    at the first instant of its local period (where local midnight happens twice, the
    first). ``merchant_id`` is filtered on before anything is summed.
    """
    for name, value in (("start", start), ("end", end)):
        if not isinstance(value, dt.datetime) or value.tzinfo is None:
            raise ValueError(f"{name}: must be a timezone-aware datetime, got {value!r}")
    if end <= start:
        raise ValueError(f"range: end ({end.isoformat()}) must be after start ({start.isoformat()})")
    if grain not in GRAINS:
        raise ValueError(f"grain: must be one of {', '.join(GRAINS)}, got {grain!r}")
    names = resolve_names(pg_conn, table)
    try:
        with pg_conn.cursor() as cur:
            cur.execute(
                f"SELECT merchant_id, metric_type, window_start, window_end, quantity"
                f" FROM {names.windows.quoted}(%(start)s, %(end)s, %(grain)s, %(tz)s, %(merchant)s)",
                {"start": start, "end": end, "grain": grain, "tz": tz, "merchant": merchant_id},
            )
            rows = [Window(m, t, s, e, int(q)) for m, t, s, e, q in cur.fetchall()]
    except Exception as exc:
        pg_conn.rollback()
        # psycopg2 names the SQLSTATE pgcode, psycopg sqlstate
        if (getattr(exc, "pgcode", None) or getattr(exc, "sqlstate", None)) == INVALID_PARAMETER_VALUE:
            raise ValueError(exc.diag.message_primary) from exc  # type: ignore[attr-defined]
        raise
    pg_conn.rollback()
    return rows
