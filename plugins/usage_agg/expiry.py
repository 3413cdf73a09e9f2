"""Usage about to be lost: days with keys in Redis that were never aggregated.

One ``SCAN`` pass over ``usage:*`` tallies the days Redis holds (keys and the
shortest TTL per day); the audit table says which of them have had a successful
whole-day aggregation. Memory is bounded by the number of days held, not keys.
This pass costs the whole keyspace, once per check.

The same pass keeps the day indexes honest: a key of an indexed day that is not in
its index (written by another writer than ``usage_agg.tracking``) is added to it and
counted, so an aggregation that reads the index finds it at its next run.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass

from usage_agg.keys import KEY_PREFIX, BadKeyError, index_key, parse_key
from usage_agg.reconcile import EXPIRY_WARNING
from usage_agg.sink import SchemaNames, missing_objects
from usage_agg.source import DEFAULT_SCAN_COUNT

TTL_SAMPLE_BATCH = 1_000


@dataclass
class DayInRedis:
    usage_date: str
    keys: int
    min_ttl_seconds: int | None
    aggregated: bool = False
    indexed: bool = False
    #: keys found by SCAN that were missing from the day's index (now added to it)
    unindexed_keys: int = 0

    @property
    def expiring(self) -> bool:
        return self.min_ttl_seconds is not None and self.min_ttl_seconds < EXPIRY_WARNING.total_seconds()


@dataclass
class ExpiryReport:
    days: list[DayInRedis]
    today: dt.date

    @property
    def at_risk(self) -> list[DayInRedis]:
        return [d for d in self.days if d.expiring and not d.aggregated]

    @property
    def unindexed_keys(self) -> int:
        return sum(d.unindexed_keys for d in self.days)

    @property
    def lag_days(self) -> int:
        """Days since the oldest day that has keys but no successful aggregation (0: none)."""
        pending = [dt.date.fromisoformat(d.usage_date) for d in self.days if not d.aggregated]
        return max(0, (self.today - min(pending)).days) if pending else 0

    def to_dict(self) -> dict:
        return {
            "days": [{**asdict(d), "expiring": d.expiring} for d in self.days],
            "at_risk": [d.usage_date for d in self.at_risk],
            "lag_days": self.lag_days,
            "unindexed_keys": self.unindexed_keys,
        }


def days_in_redis(redis_client, *, scan_count: int = DEFAULT_SCAN_COUNT) -> dict[dt.date, DayInRedis]:
    days: dict[dt.date, DayInRedis] = {}
    pending: list[tuple[bytes, dt.date]] = []

    def flush() -> None:
        pipe = redis_client.pipeline(transaction=False)
        for key, day in pending:
            pipe.ttl(key)
            pipe.sismember(index_key(day), key)
        replies = pipe.execute()
        repair = redis_client.pipeline(transaction=False)
        for (key, day), ttl, in_index in zip(pending, replies[0::2], replies[1::2]):
            entry = days[day]
            if ttl is not None and ttl >= 0:
                entry.min_ttl_seconds = ttl if entry.min_ttl_seconds is None else min(entry.min_ttl_seconds, ttl)
            if entry.indexed and not in_index:
                entry.unindexed_keys += 1
                repair.sadd(index_key(day), key)
        if len(repair):
            repair.execute()
        pending.clear()

    for raw_key in redis_client.scan_iter(match=f"{KEY_PREFIX}*", count=scan_count):
        try:
            day = parse_key(raw_key).usage_date
        except BadKeyError:
            continue  # reported by the aggregation of its day, if it is one
        if day not in days:
            days[day] = DayInRedis(day.isoformat(), 0, None, indexed=bool(redis_client.exists(index_key(day))))
        days[day].keys += 1
        pending.append((raw_key, day))
        if len(pending) >= TTL_SAMPLE_BATCH:
            flush()
    if pending:
        flush()
    return days


def check_expiry(redis_client, pg_conn, *, table: str = "merchant_usage", today: dt.date | None = None) -> ExpiryReport:
    today = today or dt.datetime.now(dt.timezone.utc).date()
    days = days_in_redis(redis_client)
    names = SchemaNames.for_table(table)
    if days and str(names.runs) not in missing_objects(pg_conn, names):
        with pg_conn.cursor() as cur:
            cur.execute(
                # A whole-day run, or every part of one fanned-out run.
                f"""SELECT DISTINCT usage_date FROM {names.runs.quoted}
                    WHERE usage_table = %s AND merchant_id IS NULL AND outcome <> 'failed'
                      AND usage_date = ANY(%s::date[])
                    GROUP BY usage_date, run_id, partition_count
                    HAVING partition_count IS NULL OR count(DISTINCT redis_partition) >= partition_count""",
                (str(names.usage), list(days)),
            )
            for (day,) in cur.fetchall():
                days[day].aggregated = True
        pg_conn.rollback()
    return ExpiryReport(sorted(days.values(), key=lambda d: d.usage_date), today)
