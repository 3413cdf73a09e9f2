"""How applications count usage: ``INCRBY`` plus the key's expiry, in one round trip.

This is the write side of the contract that the aggregation reads. Applications
(and the demo and tests) call :func:`track_usage`; the key is built by
:mod:`usage_agg.keys`, so a writer can never produce a key the reader cannot parse.
"""

from __future__ import annotations

import datetime as dt

from usage_agg.keys import build_key

#: Redis keeps a day's counters this long after their last write.
USAGE_KEY_TTL = dt.timedelta(days=7)


def track_usage(
    client,
    merchant_id: str,
    metric_type: str,
    amount: int = 1,
    *,
    usage_date: dt.date | str | None = None,
    ttl: dt.timedelta = USAGE_KEY_TTL,
) -> int:
    """Add ``amount`` to a merchant's counter for the day and return the new total.

    :param client: a redis-py client (single node or cluster).
    :param usage_date: the day counted; today's UTC date when omitted.
    :param ttl: how long the key lives after this write.

    ``INCRBY`` and ``EXPIRE`` travel in one ``MULTI``/``EXEC`` pipeline: one round
    trip, and a counter is never left without its expiry.
    """
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
        raise ValueError(f"amount: must be a non-negative integer, got {amount!r}")
    day = usage_date or dt.datetime.now(dt.timezone.utc).date()
    key = build_key(merchant_id, day, metric_type)
    pipe = client.pipeline(transaction=True)
    pipe.incrby(key, amount)
    pipe.expire(key, int(ttl.total_seconds()))
    total, _ = pipe.execute()
    return int(total)
