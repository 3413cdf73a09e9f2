"""Reading one day's counters from Redis.

Keys are discovered with cursor-based ``SCAN`` and a ``MATCH`` pattern (never
``KEYS``), and their values are read with one pipelined round trip per batch. The
generator yields one :class:`Batch` at a time, so memory is bounded by the batch
size, not by how many keys the day holds.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from redis.crc import key_slot

from usage_agg.keys import (
    HOURLY_PREFIX,
    KEY_PREFIX,
    BadKeyError,
    UsageKey,
    are_plain_quantities,
    as_bytes,
    bad_key_belongs_to,
    belongs_to,
    daily_key_of_hours,
    day_and_hours_pattern,
    day_pattern,
    hourly_keys_of,
    hours_pattern,
    index_key,
    parse_hour,
    parse_key,
    parse_key_of_day,
    parse_quantity,
    split_keys_of_day,
)
from usage_agg.partitions import is_cluster, node_address, part_layout, partition_node, served_slots

DISCOVERY_MODES = ("auto", "index", "scan")
DEFAULT_BATCH_SIZE = 5_000
DEFAULT_SCAN_COUNT = 1_000
#: How much of a bad value is kept for the dead-letter record and the log.
RAW_VALUE_PREVIEW = 200
#: How much of a bad key a log line shows.
KEY_TEXT_PREVIEW = 300


class Counter(NamedTuple):
    key: UsageKey
    quantity: int


@dataclass(frozen=True)
class BadKey:
    """A key that cannot be aggregated, with the reason and a preview of its value."""

    raw_key: bytes
    reason: str
    raw_value: bytes | None = None
    #: the hash field at fault, for an hourly hash (``None``: the key itself)
    field: bytes | None = None

    @property
    def key_text(self) -> str:
        """The key for a log line: invalid UTF-8 backslash-escaped, a very long key shortened."""
        text = self.raw_key[:KEY_TEXT_PREVIEW].decode("utf-8", "backslashreplace")
        text = text if len(self.raw_key) <= KEY_TEXT_PREVIEW else f"{text}... ({len(self.raw_key)} bytes)"
        return (
            text
            if self.field is None
            else f"{text} field {self.field[:KEY_TEXT_PREVIEW].decode('utf-8', 'backslashreplace')}"
        )


@dataclass
class Batch:
    counters: list[Counter] = field(default_factory=list)
    #: counters in bulk, ``(merchant_id, metric_type, quantity)`` as UTF-8 bytes, all
    #: checked (see :func:`usage_agg.keys.split_keys_of_day`); only with ``bulk=True``
    plain_rows: list[tuple[bytes, bytes, bytes]] = field(default_factory=list)
    bad_keys: list[BadKey] = field(default_factory=list)
    #: keys that matched the pattern but parse to another day or merchant
    foreign: int = 0
    #: keys that expired or were deleted between SCAN and GET
    vanished: int = 0
    #: the Redis server the batch was read from (``host:port``; a cluster's primary)
    source: str | None = None
    #: hourly counts of the batch's good keys: ``(merchant_id, metric_type, hour, quantity)``,
    #: ids as UTF-8 bytes (only with ``hourly=True``)
    hours: list[tuple[bytes, bytes, int, int]] = field(default_factory=list)
    #: hourly hashes, or fields of them, that cannot be aggregated
    bad_hours: list[BadKey] = field(default_factory=list)
    #: keys whose daily total differs from the sum of their hourly counts (a writer
    #: that updates only one of them), with the first of them by name
    hourly_mismatches: int = 0
    mismatch_samples: list[dict] = field(default_factory=list)


def discovery_method(
    client,
    usage_date: dt.date,
    discovery: str = "auto",
    merchant_id: str | None = None,
    *,
    warn: Callable[[str], None] = lambda message: None,
) -> str:
    """How a day's keys are found: ``"index"`` (the day's index set) or ``"scan"``.

    ``auto`` reads the index when the day has one (the tracking helper writes it) and
    scans the keyspace otherwise, for days written by other writers. A merchant rerun
    always scans: it is a manual repair and must see every key of that merchant,
    however it was written. An index key of another Redis type is not an index:
    ``warn`` names it, and the day is scanned.
    """
    if discovery not in DISCOVERY_MODES:
        raise ValueError(f"discovery: must be one of {', '.join(DISCOVERY_MODES)}, got {discovery!r}")
    if discovery == "scan" or (discovery == "auto" and merchant_id is not None):
        return "scan"
    day_index = index_key(usage_date)
    kind = as_bytes(client.type(day_index)).decode("ascii", "replace")
    if kind == "set":
        return "index"
    if kind != "none":
        warn(f"{day_index} holds a Redis {kind}, not the day's index set; reading {usage_date} with SCAN instead")
    elif discovery == "index":
        warn(f"{day_index} does not exist; reading {usage_date} with SCAN instead")
    return "scan"


def read_day(  # noqa: PLR0913  (to take AggregationOptions, as the issue of one model of a counter asks)
    client,
    usage_date: dt.date,
    merchant_id: str | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    scan_count: int = DEFAULT_SCAN_COUNT,
    method: str = "scan",
    partition: str | None = None,
    bulk: bool = False,
    hourly: bool = False,
    layout: str | None = None,
) -> Iterator[Batch]:
    """Yield the day's counters (and bad keys) batch by batch.

    :param method: ``"scan"`` (``SCAN`` over the keyspace) or ``"index"`` (``SSCAN``
        over the day's index set); see :func:`discovery_method`.
    :param partition: on Redis Cluster, read only the keys served by this primary
        (``host:port``, see :func:`usage_agg.partitions.redis_partitions`); a single
        node is one partition, itself. Without it a cluster is read primary by primary,
        so each batch comes from one server (:attr:`Batch.source`).
    :param bulk: return well-formed batches as :attr:`Batch.plain_rows` instead of
        :class:`Counter` objects: the aggregation's fast path for a whole day.
    :param hourly: also read each good key's hourly hash (its name derived from the
        key's, in one pipelined round trip per batch) into :attr:`Batch.hours`.
    :param layout: ``partition``'s :func:`usage_agg.partitions.part_layout`, when the
        caller noted it already (the aggregation checks the same layout before commit);
        read from the primary when not given.
    """
    if batch_size < 1 or scan_count < 1:
        raise ValueError("batch_size and scan_count must be positive")
    if method not in ("index", "scan"):
        raise ValueError(f"method: must be 'index' or 'scan', got {method!r}")
    if is_cluster(client) and partition is None:  # every primary, one after the other
        for name in sorted(node.name for node in client.get_primaries()):
            yield from read_day(
                client, usage_date, merchant_id, batch_size=batch_size, scan_count=scan_count, method=method,
                partition=name, bulk=bulk, hourly=hourly,
            )  # fmt: skip
        return
    part = _PartRead(client, usage_date, merchant_id, partition, layout, bulk=bulk, hourly=hourly, method=method)
    yield from part.batches(scan_count, batch_size)


class _PartRead:
    """One part's read of a day (a single node, or one primary of a cluster): which keys it keeps,
    and how a batch of counters or of hourly hashes is read."""

    def __init__(
        self, client, usage_date: dt.date, merchant_id: str | None, partition: str | None, layout: str | None, *,
        bulk: bool, hourly: bool, method: str,
    ) -> None:  # fmt: skip
        self.client, self.usage_date, self.merchant_id, self.hourly, self.method = (
            client, usage_date, merchant_id, hourly, method,
        )  # fmt: skip
        self.node = partition_node(client, partition)
        # The keys of the slots this primary says it serves: the index lives in one slot and
        # names every primary's keys, and a primary may still hold keys of a slot it no longer
        # serves (CLUSTER DELSLOTS, an aborted migration), whose values live elsewhere.
        self.served = None if self.node is None else served_slots(layout or part_layout(client, partition) or "")
        self.source = self.node.name if self.node is not None else node_address(client)
        self.read = _read_batch_in_bulk if bulk and merchant_id is None else _read_batch
        # On a single node a key's hash is read with the key (one round trip per batch); on a
        # cluster it lives in another slot, often on another primary, so it is read by the part
        # that serves it and takes that server's life, as the daily rows take their primary's.
        self.hours_apart = hourly and self.served is not None
        self.derive_hours = self.hours_apart and method == "index"  # the index names counters, not their hashes
        self.day_marker = f":{usage_date.isoformat()}:".encode()

    def batches(self, scan_count: int, batch_size: int) -> Iterator[Batch]:
        """The part's keys, batch by batch: counters (with their hours on a single node) and hashes."""
        pending: list[bytes] = []
        pending_hours: list[bytes] = []
        for pattern in _patterns(self.usage_date, self.merchant_id, self.hourly):
            for raw_key in _discovered(self.client, self.usage_date, pattern, self.method, scan_count, self.node):
                counter, hours = self.route(raw_key)
                if hours is not None:
                    pending_hours.append(hours)
                if counter is not None:
                    pending.append(counter)
                if len(pending) >= batch_size:
                    yield self.counters(pending)
                    pending = []
                if len(pending_hours) >= batch_size:
                    yield self.hashes(pending_hours)
                    pending_hours = []
        if pending:
            yield self.counters(pending)
        if pending_hours:
            yield self.hashes(pending_hours)

    def route(self, raw_key: bytes) -> tuple[bytes | None, bytes | None]:
        """The counter and the hourly hash this part reads for a key it found (either may be none)."""
        if _of_day(raw_key, DAILY_KEY_PREFIX, self.day_marker):
            hours_key = HOURLY_KEY_PREFIX + raw_key[len(DAILY_KEY_PREFIX) :] if self.derive_hours else None
            return (
                raw_key if self.served_here(raw_key) else None,
                hours_key if hours_key is not None and self.served_here(hours_key) else None,
            )
        if self.hourly and _of_day(raw_key, HOURLY_KEY_PREFIX, self.day_marker) and self.served_here(raw_key):
            return None, raw_key
        return None, None

    def served_here(self, raw_key: bytes) -> bool:
        return self.served is None or key_slot(raw_key) in self.served

    def counters(self, raw_keys: list[bytes]) -> Batch:
        batch = self.read(self.client, raw_keys, self.usage_date, self.merchant_id)
        return _finish(self.client, self.source, batch, self.usage_date, self.hourly and not self.hours_apart)

    def hashes(self, raw_keys: list[bytes]) -> Batch:
        return _read_hashes(
            self.client, self.source, raw_keys, self.usage_date, self.merchant_id, with_their_day=self.hours_apart
        )


def _of_day(raw_key: bytes, prefix: bytes, day_marker: bytes) -> bool:
    """Whether a key is ``{prefix}*{day_marker}*`` (``usage:*:2025-11-01:*``), as its pattern alone matched it."""
    return raw_key.startswith(prefix) and raw_key.find(day_marker, len(prefix)) >= len(prefix)


DAILY_KEY_PREFIX = KEY_PREFIX.encode()
HOURLY_KEY_PREFIX = HOURLY_PREFIX.encode()


def _patterns(usage_date: dt.date, merchant_id: str | None, hourly: bool) -> list[str]:
    """The ``MATCH`` patterns of one read: the day's counters and, where hours are read, the
    hourly hashes too, so a hash whose writer sent no daily counter is found on its own.
    A whole day takes both in one pass; one merchant's rerun, one pass for each."""
    if not hourly:
        return [day_pattern(usage_date, merchant_id)]
    if merchant_id is None:
        return [day_and_hours_pattern(usage_date)]
    return [day_pattern(usage_date, merchant_id), hours_pattern(usage_date, merchant_id)]


def _discovered(client, usage_date: dt.date, pattern: str, method: str, scan_count: int, node) -> Iterator[bytes]:
    """The keys matching ``pattern``, from the day's index or the keyspace (one primary's, on a cluster)."""
    if method == "index":
        keys = client.sscan_iter(index_key(usage_date), match=pattern, count=scan_count)
    elif node is not None:
        keys = client.scan_iter(match=pattern, count=scan_count, target_nodes=node)
    else:
        keys = client.scan_iter(match=pattern, count=scan_count)
    for key in keys:
        yield as_bytes(key)


def _finish(client, source: str, batch: Batch, usage_date: dt.date, hourly: bool) -> Batch:
    batch.source = source
    if hourly:
        _read_hours(client, batch, usage_date)
    return batch


#: how many keys whose daily total and hourly counts disagree are named in a batch
MISMATCH_SAMPLES = 5


def _read_hours(client, batch: Batch, usage_date: dt.date) -> None:
    """Read the hourly hash of every good key of the batch, in one pipelined round trip (a
    single node: on a cluster a part reads the hashes its own primary serves, :func:`_read_hashes`)."""
    # the daily total stays as read (bytes, or an int for a counter) until a key has hours
    good: list[tuple[bytes, bytes, bytes | int]] = [*batch.plain_rows]
    good += [(c.key.merchant_id.encode(), c.key.metric_type.encode(), c.quantity) for c in batch.counters]
    if not good:
        return
    hourly_keys = hourly_keys_of(((merchant, metric) for merchant, metric, _ in good), usage_date)
    if not client.exists(*hourly_keys):  # a single node's (a cluster's hashes are read where they live)
        return  # a batch of daily-only writers: one command says so
    pipe = client.pipeline(transaction=False)
    for key in hourly_keys:
        pipe.hgetall(key)
    for (merchant, metric, daily), key, reply in zip(good, hourly_keys, pipe.execute(raise_on_error=False)):
        if isinstance(reply, Exception):  # WRONGTYPE: not a hash
            batch.bad_hours.append(BadKey(key, f"hourly key is not a hash of hourly counts: {reply}"))
            continue
        if not reply:  # a daily-only writer: no hours, nothing wrong
            continue
        total = _add_hours(batch, key, merchant, metric, reply)
        if total != int(daily):
            _note_mismatch(batch, merchant, metric, int(daily), total, DAILY_DIFFERS)


def count_or_none(value) -> int | None:
    """A daily counter's value as read (``MGET``, ``GET``) when it is a good count; ``None``
    when it is missing, of another Redis type (an error reply) or a bad value."""
    if value is None or isinstance(value, Exception):
        return None
    try:
        return parse_quantity(value)
    except BadKeyError:
        return None


#: why an hourly hash read without its daily counter is reported (with its hours stored)
NO_DAILY_COUNTER = "hourly hash without its daily counter (a writer that sent HINCRBY but not INCRBY?)"
#: why a key's daily total and its hours are reported
DAILY_DIFFERS = "daily total differs from the sum of its hourly counts"


def _read_hashes(
    client, source: str, raw_keys: list[bytes], usage_date: dt.date, merchant_id: str | None, *, with_their_day: bool
) -> Batch:
    """The hours of hashes found on their own (not through their daily counter), each hash
    compared with its counter: a hash whose daily counter does not exist (a writer that sent
    ``HINCRBY`` without ``INCRBY``, or a counter that expired or was deleted before its hash)
    is reported as a mismatch with its reason, and its hours are stored like any others, so
    nothing of it expires unseen.

    :param with_their_day: read every hash given (on a cluster, where a part reads the hashes
        its primary serves, whatever primary their counters live on); otherwise only those
        whose counter is not a good count: none, another Redis type or a bad value (on a
        single node the others are read with their counter, :func:`_read_hours`), so a
        single node stores the same hours as a cluster.
    """
    batch = Batch(source=source)
    candidates = _hashes_of_the_read(raw_keys, usage_date, merchant_id)
    if not candidates:
        return batch
    # nil: no daily counter, or one of another Redis type (a bad key its own read reports)
    dailies = read_values(client, [daily_key_of_hours(raw_key) for raw_key, _, _ in candidates])
    chosen = [(c, daily) for c, daily in zip(candidates, dailies) if with_their_day or count_or_none(daily) is None]
    if not chosen:
        return batch
    pipe = client.pipeline(transaction=False)
    for (raw_key, _, _), _ in chosen:
        pipe.hgetall(raw_key)
    for (candidate, daily), reply in zip(chosen, pipe.execute(raise_on_error=False)):
        _add_hash(batch, candidate, daily, reply)
    return batch


def _hashes_of_the_read(
    raw_keys: list[bytes], usage_date: dt.date, merchant_id: str | None
) -> list[tuple[bytes, UsageKey | None, str | None]]:
    """The hashes of ``usage_date`` (and ``merchant_id``) among ``raw_keys``, once each: with the
    key their name parses to, or ``None`` and why it does not parse."""
    day_text = usage_date.isoformat()
    candidates: list[tuple[bytes, UsageKey | None, str | None]] = []
    for raw_key in dict.fromkeys(raw_keys):  # SCAN may return a key twice
        daily = daily_key_of_hours(raw_key)
        try:
            parsed = parse_key(daily)
        except BadKeyError as err:
            if bad_key_belongs_to(daily, day_text, merchant_id):
                candidates.append((raw_key, None, f"hourly key does not name a day's counter: {err}"))
            continue
        if belongs_to(parsed, usage_date, merchant_id):
            candidates.append((raw_key, parsed, None))
    return candidates


def _add_hash(batch: Batch, candidate: tuple[bytes, UsageKey | None, str | None], daily, reply) -> None:
    """One hash read on its own, with its daily counter's value (``daily``): its hours, its bad
    fields, and a mismatch when its counter is missing or differs."""
    raw_key, named, problem = candidate
    if isinstance(reply, Exception):  # WRONGTYPE: not a hash
        batch.bad_hours.append(BadKey(raw_key, f"hourly key is not a hash of hourly counts: {reply}"))
    elif not reply:  # gone since it was found, or a daily-only writer's (derived from the index)
        return
    elif problem is not None or named is None:
        batch.bad_hours.append(BadKey(raw_key, problem or "hourly key does not parse"))
    else:
        merchant, metric = named.merchant_id.encode(), named.metric_type.encode()
        total = _add_hours(batch, raw_key, merchant, metric, reply)
        count = count_or_none(daily)
        if daily is None:
            _note_mismatch(batch, merchant, metric, None, total, NO_DAILY_COUNTER)
        elif count is not None and count != total:  # a bad counter is reported as a bad key
            _note_mismatch(batch, merchant, metric, count, total, DAILY_DIFFERS)


def _add_hours(batch: Batch, raw_key: bytes, merchant: bytes, metric: bytes, reply: dict) -> int:
    """Add one hash's good hours to the batch (its bad fields to ``bad_hours``); their sum."""
    total = 0
    for field_name, value in reply.items():
        try:
            hour, quantity = parse_hour(field_name), parse_quantity(value)
        except BadKeyError as err:
            batch.bad_hours.append(BadKey(raw_key, str(err), _preview(value), field=as_bytes(field_name)))
            continue
        batch.hours.append((merchant, metric, hour, quantity))
        total += quantity
    return total


def _note_mismatch(
    batch: Batch, merchant: bytes, metric: bytes, daily: int | None, hourly_sum: int, reason: str
) -> None:
    batch.hourly_mismatches += 1
    if len(batch.mismatch_samples) < MISMATCH_SAMPLES:
        batch.mismatch_samples.append(
            {
                "merchant_id": merchant.decode(),
                "metric_type": metric.decode(),
                "daily": daily,
                "hourly_sum": hourly_sum,
                "reason": reason,
            }
        )


def _read_batch_in_bulk(client, raw_keys: list[bytes], usage_date: dt.date, merchant_id: str | None) -> Batch:
    """A whole day's batch (``merchant_id`` is None) without a Python object per key, when every key and value is plain.

    One regular expression splits the keys, one ``MGET`` reads the values, one join
    checks them; a batch with anything unusual (a bad key or value, a vanished key)
    is read again key by key, which names each problem.
    """
    raw_keys = list(dict.fromkeys(raw_keys))  # SCAN may return a key twice
    pairs = split_keys_of_day(raw_keys, usage_date.isoformat())
    if pairs is not None:
        values = read_values(client, raw_keys)
        if are_plain_quantities(values):
            return Batch(plain_rows=[(merchant, metric, value) for (merchant, metric), value in zip(pairs, values)])
    return _read_batch(client, raw_keys, usage_date, merchant_id)


def _read_batch(client, raw_keys: list[bytes], usage_date: dt.date, merchant_id: str | None) -> Batch:
    batch = Batch()
    to_read: list[tuple[bytes, UsageKey | None, str | None]] = []
    day_text = usage_date.isoformat()
    for raw_key in dict.fromkeys(raw_keys):  # SCAN may return a key twice
        parsed = parse_key_of_day(raw_key, usage_date, day_text)
        if parsed is None:  # not the common shape: the full parser says what it is
            try:
                parsed = parse_key(raw_key)
            except BadKeyError as err:
                if bad_key_belongs_to(raw_key, day_text, merchant_id):
                    to_read.append((raw_key, None, str(err)))
                else:
                    batch.foreign += 1
                continue
        if belongs_to(parsed, usage_date, merchant_id):
            to_read.append((raw_key, parsed, None))
        else:
            batch.foreign += 1
    if not to_read:
        return batch

    values = read_values(client, [raw_key for raw_key, _, _ in to_read])

    not_strings: list[bytes] = []
    for (raw_key, parsed, parse_error), value in zip(to_read, values):
        if value is None:  # gone since SCAN, or not a string (MGET answers nil for both)
            not_strings.append(raw_key)
        elif parse_error is not None:
            batch.bad_keys.append(BadKey(raw_key, parse_error, _preview(value)))
        else:  # no parse error: the key parsed (said to mypy by an ignore, as an assert would renumber mutants)
            try:
                batch.counters.append(Counter(parsed, parse_quantity(value)))  # type: ignore[arg-type]
            except BadKeyError as err:
                batch.bad_keys.append(BadKey(raw_key, str(err), _preview(value)))
    if not_strings:
        wrong_type = _describe_wrong_types(client, not_strings)
        batch.vanished += len(not_strings) - len(wrong_type)
        batch.bad_keys.extend(wrong_type)
    return batch


def read_values(client, raw_keys: list[bytes]) -> list:
    """All values of a batch in one command: ``MGET`` (per slot on a cluster); the reader's and the
    expiry check's one way to it."""
    if hasattr(client, "mget_nonatomic"):  # RedisCluster: MGET must not cross slots
        return client.mget_nonatomic(raw_keys)
    return client.mget(raw_keys)


def _preview(value: bytes | str) -> bytes:
    return as_bytes(value)[:RAW_VALUE_PREVIEW]


def _describe_wrong_types(client, raw_keys: list[bytes]) -> list[BadKey]:
    """Bad-key records for the keys that hold another Redis type (``none``: vanished)."""
    pipe = client.pipeline(transaction=False)
    for raw_key in raw_keys:
        pipe.type(raw_key)
    kinds = [as_bytes(kind).decode("ascii", "replace") for kind in pipe.execute(raise_on_error=False)]
    return [
        BadKey(raw_key, f"key holds a Redis {kind}, not a string counter")
        for raw_key, kind in zip(raw_keys, kinds)
        if kind != "none"
    ]
