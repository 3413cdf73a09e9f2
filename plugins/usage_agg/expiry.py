"""Usage about to be lost: counters about to expire from Redis whose value is not stored.

A counter is safe to lose from Redis only once its current value is in PostgreSQL:
its row holds it (``quantity - redis_offset`` equals it), or, for a bad key, its dead
letter holds that value. What earlier runs did does not matter (a key may have been
written after the last run, or grown since, or never been read: no scheduled run
reads days older than yesterday). So one ``SCAN`` pass over ``usage:*`` looks at every
key's TTL, and every key with less than :data:`EXPIRY_WARNING` to live is compared
with PostgreSQL, batch by batch (memory stays bounded by the batch, not the keyspace).

A day with such unsaved keys is *rescued*: aggregated on the spot, under the day's
lock, by whatever the caller passes as ``rescue``; then its keys are compared again.
What is still unsaved after that is at risk, and the check fails (and alerts).

The same pass keeps the day indexes honest: a key of an indexed day that is not in
its index (written by another writer than ``usage_agg.tracking``) is added to it and
counted, so an aggregation that reads the index finds it at its next run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from usage_agg.dead_letters import identity, key_text, pg_text
from usage_agg.keys import (
    HOURLY_PREFIX,
    KEY_PREFIX,
    BadKeyError,
    UsageKey,
    as_bytes,
    daily_key_of_hours,
    day_pattern,
    hours_pattern,
    index_key,
    parse_hour,
    parse_key,
    parse_quantity,
)
from usage_agg.reconcile import EXPIRY_WARNING
from usage_agg.samples import SAMPLE_LIMIT
from usage_agg.schema import SchemaNames, missing_objects, resolve_names
from usage_agg.source import DEFAULT_SCAN_COUNT, RAW_VALUE_PREVIEW, count_or_none, read_values

TTL_SAMPLE_BATCH = 1_000
DAILY_PREFIX = KEY_PREFIX.encode()
HOURLY_KEY_PREFIX = HOURLY_PREFIX.encode()
#: daily counters and hourly hashes in one pass (other keys it meets are skipped by prefix)
ANY_USAGE_KEY = "usage*"


@dataclass
class DayInRedis:
    usage_date: str
    keys: int
    min_ttl_seconds: int | None
    #: a successful whole-day aggregation (or every part of one) is on record
    aggregated: bool = False
    indexed: bool = False
    #: keys found by SCAN that were missing from the day's index (now added to it)
    unindexed_keys: int = 0
    #: hourly hashes whose daily counter is missing or bad, added to the day's index (an indexed day)
    hours_without_day: int = 0
    #: keys (daily counters and hourly hashes) with less than EXPIRY_WARNING to live
    expiring_keys: int = 0
    #: of those, keys whose current value is not in PostgreSQL (after a rescue, if any)
    unsaved_keys: int = 0
    unsaved_samples: list[dict] = field(default_factory=list)
    #: aggregated by this check, because it had unsaved keys about to expire
    rescued: bool = False

    @property
    def expiring(self) -> bool:
        return self.min_ttl_seconds is not None and self.min_ttl_seconds < EXPIRY_WARNING.total_seconds()


@dataclass
class ExpiryReport:
    days: list[DayInRedis]
    today: dt.date
    #: the usage schema's tables, as resolved for the check (the caller's follow-ups use them)
    names: SchemaNames

    @property
    def at_risk(self) -> list[DayInRedis]:
        """Days with keys about to expire whose value is not stored."""
        return [d for d in self.days if d.unsaved_keys]

    @property
    def rescued(self) -> list[DayInRedis]:
        return [d for d in self.days if d.rescued]

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
            "rescued": [d.usage_date for d in self.rescued],
            "lag_days": self.lag_days,
            "unindexed_keys": self.unindexed_keys,
        }


class _StoredValues:
    """Compares keys about to expire with what PostgreSQL holds for them."""

    def __init__(self, pg_conn, names: SchemaNames) -> None:
        self.pg_conn = pg_conn
        self.names = names
        self.schema_exists = not {str(names.usage), str(names.errors), str(names.hourly)} & set(
            missing_objects(pg_conn, names)
        )

    def unsaved(self, raw_keys: list[bytes], values: list) -> list[int]:
        """Indexes of the keys whose current value is neither in their row nor in their dead letter."""
        if not raw_keys:
            return []
        if not self.schema_exists:
            return list(range(len(raw_keys)))
        merchants, metrics, days, quantities, digests, previews = [], [], [], [], [], []
        merchant: str | None
        day: dt.date | None
        metric: str | None
        for raw_key, value in zip(raw_keys, values):
            try:
                merchant, day, metric = parse_key(raw_key)
            except BadKeyError:  # no row can hold it; its dead letter may
                merchant = day = metric = None
            merchants.append(merchant)
            metrics.append(metric)
            days.append(day)
            try:
                quantities.append(None if value is None else parse_quantity(value))
            except BadKeyError:
                quantities.append(None)
            digests.append(hashlib.sha256(raw_key).digest())
            previews.append(
                None
                if value is None
                else pg_text(as_bytes(value)[:RAW_VALUE_PREVIEW].decode("utf-8", "backslashreplace"))
            )
        with self.pg_conn.cursor() as cur:
            cur.execute(
                f"""SELECT k.i - 1 FROM unnest(%s::text[], %s::text[], %s::date[],
                                                  %s::bigint[], %s::bytea[], %s::text[])
                        WITH ORDINALITY AS k(m, t, d, v, h, raw, i)
                    WHERE NOT EXISTS (SELECT 1 FROM {self.names.usage.quoted} u
                                      WHERE u.merchant_id = k.m AND u.usage_date = k.d AND u.metric_type = k.t
                                        AND u.quantity - u.redis_offset = k.v)
                      AND NOT EXISTS (SELECT 1 FROM {self.names.errors.quoted} e
                                      WHERE e.key_sha256 = k.h AND e.raw_value IS NOT DISTINCT FROM k.raw)""",
                (merchants, metrics, days, quantities, digests, previews),
            )
            unsaved = [int(i) for (i,) in cur.fetchall()]
        self.pg_conn.rollback()
        return unsaved

    def unsaved_hours(self, hashes: list[tuple[bytes, dt.date, int]], replies: list) -> list[int]:
        """Indexes of the hourly hashes some hour of which is neither in its hourly row nor in its dead letter."""
        if not hashes:
            return []
        if not self.schema_exists:
            return list(range(len(hashes)))
        # one expected row per hour: (hash, merchant, metric, hour, value) for a good hour,
        # (hash, ..., dead letter digest, value preview) for a bad one or a hash that is not one
        expected: list[tuple] = []
        for i, ((key, day, _), reply) in enumerate(zip(hashes, replies)):
            try:
                parsed: UsageKey | None = parse_key(daily_key_of_hours(key))
            except BadKeyError:
                parsed = None
            if isinstance(reply, Exception) or parsed is None:  # not a hash, or a bad name: its letter holds it
                expected.append((i, None, None, None, None, identity(key), None))
                continue
            for field_name, value in reply.items():
                field_bytes = as_bytes(field_name)
                try:
                    hour = dt.datetime.combine(day, dt.time(parse_hour(field_bytes)), dt.UTC)
                    expected.append(
                        (i, parsed.merchant_id, parsed.metric_type, hour, parse_quantity(value), None, None)
                    )
                except BadKeyError:
                    preview = pg_text(as_bytes(value)[:RAW_VALUE_PREVIEW].decode("utf-8", "backslashreplace"))
                    expected.append((i, None, None, None, None, identity(key, field_bytes), preview))
        if not expected:
            return []
        with self.pg_conn.cursor() as cur:
            cur.execute(
                f"""SELECT DISTINCT k.i FROM unnest(%s::int[], %s::text[], %s::text[], %s::timestamptz[],
                                                    %s::bigint[], %s::bytea[], %s::text[]) AS k(i, m, t, h, v, d, raw)
                    WHERE CASE WHEN k.d IS NULL
                          THEN NOT EXISTS (SELECT 1 FROM {self.names.hourly.quoted} u
                                           WHERE u.merchant_id = k.m AND u.metric_type = k.t AND u.usage_hour = k.h
                                             AND u.quantity - u.redis_offset = k.v)
                          ELSE NOT EXISTS (SELECT 1 FROM {self.names.errors.quoted} e
                                           WHERE e.key_sha256 = k.d
                                             AND (k.raw IS NULL OR e.raw_value IS NOT DISTINCT FROM k.raw))
                          END""",
                tuple(map(list, zip(*expected))),
            )
            unsaved = sorted(int(i) for (i,) in cur.fetchall())
        self.pg_conn.rollback()
        return unsaved


def _scan_days(
    redis_client, stored: _StoredValues, days: dict[dt.date, DayInRedis], *, patterns: list[str], scan_count: int,
    only_day: dt.date | None = None,
) -> None:  # fmt: skip
    """One SCAN pass per pattern: tally keys and TTLs per day, repair indexes, compare expiring keys
    (:class:`_ScanPass`)."""
    scan = _ScanPass(redis_client, stored, days)
    for pattern in patterns:
        for raw_key in redis_client.scan_iter(match=pattern, count=scan_count):
            scan.add(as_bytes(raw_key), only_day)
    scan.flush()


class _ScanPass:
    """The keys one SCAN pass finds, filed under their day and probed a batch at a time.

    Daily counters and hourly hashes both count: a hash is safe to lose only once each of
    its hours is stored (or dead-lettered), whatever became of its daily counter. A hash
    whose daily counter does not exist (a writer that sent ``HINCRBY`` without ``INCRBY``)
    is added to its indexed day's index, so an aggregation that reads the index finds it.
    """

    def __init__(self, redis_client, stored: _StoredValues, days: dict[dt.date, DayInRedis]) -> None:
        self.redis, self.stored, self.days = redis_client, stored, days
        self.counters: list[tuple[bytes, dt.date]] = []
        self.hashes: list[tuple[bytes, dt.date]] = []

    def add(self, raw_key: bytes, only_day: dt.date | None) -> None:
        """File ``raw_key`` under its day (a bad key under the day it names, if any); skip what is
        not a usage key, or not of ``only_day``."""
        is_hash = raw_key.startswith(HOURLY_KEY_PREFIX)
        if not is_hash and not raw_key.startswith(DAILY_PREFIX):
            return  # another application's key that begins with "usage"
        named = daily_key_of_hours(raw_key) if is_hash else raw_key
        try:
            day: dt.date | None = parse_key(named).usage_date
        except BadKeyError:
            day = _day_of_bad_key(named)  # None: no day to file it under; its day's aggregation reports it
        if day is None or (only_day is not None and day != only_day):
            return
        if day not in self.days:
            indexed = self.redis.type(index_key(day)) in (b"set", "set")
            self.days[day] = DayInRedis(day.isoformat(), 0, None, indexed=indexed)
        self.days[day].keys += 1
        (self.hashes if is_hash else self.counters).append((raw_key, day))
        if len(self.counters) + len(self.hashes) >= TTL_SAMPLE_BATCH:
            self.flush()

    def flush(self) -> None:
        """Probe the keys filed since the last flush: one pipeline of TTLs and index or counter
        lookups, then the index repairs and the expiring keys' comparison with PostgreSQL."""
        if not self.counters and not self.hashes:
            return
        pipe = self.redis.pipeline(transaction=False)
        for key, day in self.counters:
            pipe.ttl(key)
            pipe.sismember(index_key(day), key)
        for key, _ in self.hashes:
            pipe.ttl(key)
            pipe.get(daily_key_of_hours(key))
        replies = pipe.execute(raise_on_error=False)
        split = 2 * len(self.counters)
        repair = self.redis.pipeline(transaction=False)
        expiring = self._tally(self.counters, replies[0:split:2])
        expiring_hours = self._tally(self.hashes, replies[split::2])
        for (key, day), in_index in zip(self.counters, replies[1:split:2]):
            if self.days[day].indexed and not in_index:
                self.days[day].unindexed_keys += 1
                repair.sadd(index_key(day), key)
        for (key, day), daily in zip(self.hashes, replies[split + 1 :: 2]):
            # its day's counter is missing or bad, so no run reads the hash through it: index the hash itself
            if self.days[day].indexed and count_or_none(daily) is None:
                self.days[day].hours_without_day += 1
                repair.sadd(index_key(day), key)
        if len(repair):
            repair.execute(raise_on_error=False)
        self._check_expiring_counters(expiring)
        self._check_expiring_hashes(expiring_hours)
        self.counters.clear()
        self.hashes.clear()

    def _tally(self, keys: list[tuple[bytes, dt.date]], ttls: list) -> list[tuple[bytes, dt.date, int]]:
        """Note each key's TTL on its day; return the keys with less than a day to live."""
        expiring = []
        for (key, day), ttl in zip(keys, ttls):
            if not isinstance(ttl, int) or ttl < 0:  # -1: no expiry, -2: gone
                continue
            entry = self.days[day]
            entry.min_ttl_seconds = ttl if entry.min_ttl_seconds is None else min(entry.min_ttl_seconds, ttl)
            if ttl < EXPIRY_WARNING.total_seconds():
                entry.expiring_keys += 1
                expiring.append((key, day, ttl))
        return expiring

    def _check_expiring_counters(self, expiring: list[tuple[bytes, dt.date, int]]) -> None:
        if not expiring:
            return
        keys = [key for key, _, _ in expiring]
        values = read_values(self.redis, keys)
        # nil: gone since (nothing left to lose), or another Redis type (a bad key)
        present = [i for i, value in enumerate(values) if value is not None or self.redis.exists(keys[i])]
        unsaved = self.stored.unsaved([keys[i] for i in present], [values[i] for i in present])
        _note_unsaved(self.days, [expiring[present[i]] for i in unsaved])

    def _check_expiring_hashes(self, expiring: list[tuple[bytes, dt.date, int]]) -> None:
        if not expiring:
            return
        pipe = self.redis.pipeline(transaction=False)
        for key, _, _ in expiring:
            pipe.hgetall(key)
        hashes = pipe.execute(raise_on_error=False)
        _note_unsaved(self.days, [expiring[i] for i in self.stored.unsaved_hours(expiring, hashes)])


def _note_unsaved(days: dict[dt.date, DayInRedis], unsaved: list[tuple[bytes, dt.date, int]]) -> None:
    for key, day, ttl in unsaved:
        entry = days[day]
        entry.unsaved_keys += 1
        if len(entry.unsaved_samples) < SAMPLE_LIMIT:
            entry.unsaved_samples.append({"key": key_text(key), "ttl_seconds": ttl})


def _day_of_bad_key(raw_key: bytes) -> dt.date | None:
    """The date a bad key is filed under (its dead letter's date), when it has one."""
    parts = raw_key.rsplit(b":", 2)
    if len(parts) != 3:
        return None
    try:
        return dt.date.fromisoformat(parts[1].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None


def check_expiry(
    redis_client,
    pg_conn,
    *,
    table: str = "merchant_usage",
    today: dt.date | None = None,
    rescue: Callable[[dt.date], object] | None = None,
    scan_count: int = DEFAULT_SCAN_COUNT,
) -> ExpiryReport:
    """Find every counter about to expire whose value is not stored; rescue its day if asked.

    :param rescue: called with each date that has such counters (for example
        ``lambda day: aggregate_day(redis, pg, day, ...)``); its counters are compared
        again afterwards. A rescue that raises leaves its day at risk.
    """
    today = today or dt.datetime.now(dt.UTC).date()
    names = resolve_names(pg_conn, table)
    stored = _StoredValues(pg_conn, names)
    days: dict[dt.date, DayInRedis] = {}
    _scan_days(redis_client, stored, days, patterns=[ANY_USAGE_KEY], scan_count=scan_count)
    at_risk = sorted(d for d, entry in days.items() if entry.unsaved_keys)
    if rescue is not None:
        for day in at_risk:
            with contextlib.suppress(Exception):  # the rescue reports its own failure; the day stays at risk below
                rescue(day)
            days[day] = DayInRedis(day.isoformat(), 0, None, indexed=days[day].indexed, rescued=True)
            stored.schema_exists = stored.schema_exists or not missing_objects(pg_conn, names)
            _scan_days(
                redis_client, stored, days, patterns=[day_pattern(day), hours_pattern(day)], scan_count=scan_count,
                only_day=day,
            )  # fmt: skip
    _note_aggregated(pg_conn, names, days)
    return ExpiryReport(sorted(days.values(), key=lambda d: d.usage_date), today, names)


def _note_aggregated(pg_conn, names: SchemaNames, days: dict[dt.date, DayInRedis]) -> None:
    """Mark the days with a successful whole-day run on record (for the lag metric)."""
    if not days or str(names.runs) in missing_objects(pg_conn, names):
        return
    with pg_conn.cursor() as cur:
        cur.execute(
            # A whole-day run, or every part of one fanned-out run.
            f"""SELECT DISTINCT usage_date FROM {names.runs.quoted}
                WHERE usage_table = ANY(%s) AND merchant_id IS NULL AND outcome <> 'failed'
                  AND usage_date = ANY(%s::date[])
                GROUP BY usage_date, run_id, partition_count
                HAVING partition_count IS NULL OR count(DISTINCT redis_partition) >= partition_count""",
            (names.audit_names, list(days)),
        )
        for (day,) in cur.fetchall():
            days[day].aggregated = True
    pg_conn.rollback()
