"""How applications count usage: ``INCRBY`` plus the key's expiry, in one round trip.

This is the write side of the contract that the aggregation reads. Applications
(and the demo and tests) call :func:`track_usage`; the keys are built by
:mod:`usage_agg.keys`, so a writer can never produce a key the reader cannot parse.
A writer in another language sends the same commands (README, "Counting usage").
"""

from __future__ import annotations

import datetime as dt

from usage_agg.keys import build_key, hourly_key, index_key, parse_date
from usage_agg.partitions import is_cluster

#: Redis keeps a day's counters this long after their last write.
USAGE_KEY_TTL = dt.timedelta(days=7)


def track_usage(  # noqa: PLR0913  (the public writer's helper: its options are keyword-only)
    client,
    merchant_id: str,
    metric_type: str,
    amount: int = 1,
    *,
    usage_date: dt.date | str | None = None,
    at: dt.datetime | None = None,
    ttl: dt.timedelta = USAGE_KEY_TTL,
    index: bool = True,
    hourly: bool = True,
) -> int:
    """Add ``amount`` to a merchant's counter for the day and return the new daily total.

    :param client: a redis-py client (single node or cluster).
    :param at: when the usage happened (an aware datetime; now when omitted). Its UTC
        date is the day counted and its UTC hour the hour counted.
    :param usage_date: the day counted, for a writer that knows the day but not the
        moment: only the daily counter is incremented then (an hour is never guessed).
    :param ttl: how long the keys live after this write.
    :param index: also record the key in the day's index set (``usage-index:{date}``),
        which lets the aggregation find a day's keys without scanning the keyspace.
    :param hourly: also count the hour, in the hash ``usage-hourly:{merchant_id}:{date}:{metric}``
        (field ``HH``, UTC), from which hourly rows and any time zone's windows come.

    Everything travels in one ``MULTI``/``EXEC`` pipeline: one round trip, and a
    counter is never left without its expiry, its hour or its day's index. (On Redis
    Cluster these keys live in different slots, so there the writes are pipelined
    without ``MULTI``.)
    """
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
        raise ValueError(f"amount: must be a non-negative integer, got {amount!r}")
    if at is not None:
        if not isinstance(at, dt.datetime) or at.tzinfo is None:
            raise ValueError(f"at: must be a timezone-aware datetime, got {at!r}")
        at = at.astimezone(dt.UTC)
        if usage_date is not None and parse_date(usage_date) != at.date():
            raise ValueError(f"usage_date: {usage_date} is not the UTC date of at ({at.isoformat()})")
    elif usage_date is None:
        at = dt.datetime.now(dt.UTC)
    if at is not None:
        day = at.date()
    else:
        assert usage_date is not None  # else `at` was set above
        day = parse_date(usage_date)
    key = build_key(merchant_id, day, metric_type)
    seconds = int(ttl.total_seconds())
    pipe = client.pipeline(transaction=not is_cluster(client))
    pipe.incrby(key, amount)
    pipe.expire(key, seconds)
    if hourly and at is not None:
        hours = hourly_key(merchant_id, day, metric_type)
        pipe.hincrby(hours, f"{at.hour:02d}", amount)
        pipe.expire(hours, seconds)
    if index:
        day_index = index_key(day)
        pipe.sadd(day_index, key)
        pipe.expire(day_index, seconds)  # lives as long as the day's last-written key
    return int(pipe.execute()[0])
