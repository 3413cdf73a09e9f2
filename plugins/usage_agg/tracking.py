"""How applications count usage: ``INCRBY`` plus the key's expiry, in one round trip.

This is the write side of the contract that the aggregation reads. Applications
(and the demo and tests) call :func:`track_usage`; the key is built by
:mod:`usage_agg.keys`, so a writer can never produce a key the reader cannot parse.
"""

from __future__ import annotations

import datetime as dt

from usage_agg.keys import build_key, index_key
from usage_agg.partitions import is_cluster

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
    index: bool = True,
) -> int:
    """Add ``amount`` to a merchant's counter for the day and return the new total.

    :param client: a redis-py client (single node or cluster).
    :param usage_date: the day counted; today's UTC date when omitted.
    :param ttl: how long the key lives after this write.
    :param index: also record the key in the day's index set (``usage-index:{date}``),
        which lets the aggregation find a day's keys without scanning the keyspace.

    Everything travels in one ``MULTI``/``EXEC`` pipeline: one round trip, and a
    counter is never left without its expiry or outside its day's index. (On Redis
    Cluster the index lives in another slot, so there the writes are pipelined
    without ``MULTI``.)
    """
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
        raise ValueError(f"amount: must be a non-negative integer, got {amount!r}")
    day = usage_date or dt.datetime.now(dt.timezone.utc).date()
    key = build_key(merchant_id, day, metric_type)
    seconds = int(ttl.total_seconds())
    pipe = client.pipeline(transaction=not is_cluster(client))
    pipe.incrby(key, amount)
    pipe.expire(key, seconds)
    if index:
        day_index = index_key(day)
        pipe.sadd(day_index, key)
        pipe.expire(day_index, seconds)  # lives as long as the day's last-written key
    return int(pipe.execute()[0])
