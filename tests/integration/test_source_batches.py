"""The reader's batches, exactly: discovery, batch sizes, foreign, vanished and bad keys, the bulk path.

Real Redis; a thin wrapper around the real client stages what a live keyspace does
between SCAN and MGET (a key deleted, a key returned twice).
"""

from __future__ import annotations

import datetime as dt

import pytest
import redis

from tests.conftest import REDIS_HOST, REDIS_PORT
from usage_agg.keys import UsageKey, build_key, index_key
from usage_agg.source import (
    KEY_TEXT_PREVIEW,
    RAW_VALUE_PREVIEW,
    BadKey,
    Counter,
    discovery_method,
    read_day,
)

DAY = dt.date(2025, 11, 1)
ADDRESS = f"{REDIS_HOST}:{REDIS_PORT}"


def key(merchant: str, metric: str = "q", day=DAY) -> bytes:
    return build_key(merchant, day, metric).encode()


def all_of(batches) -> tuple[list, list, list, int, int]:
    batches = list(batches)
    counters = sorted(c for b in batches for c in b.counters)
    plain = sorted(r for b in batches for r in b.plain_rows)
    bad = sorted((b.raw_key, b.reason, b.raw_value) for batch in batches for b in batch.bad_keys)
    return counters, plain, bad, sum(b.foreign for b in batches), sum(b.vanished for b in batches)


# discovery


def test_discovery_modes(redis_client):
    warnings: list[str] = []
    assert discovery_method(redis_client, DAY, "auto", warn=warnings.append) == "scan"  # no index: scan, silently
    assert discovery_method(redis_client, DAY, "index", warn=warnings.append) == "scan"
    assert warnings == ["usage-index:2025-11-01 does not exist; reading 2025-11-01 with SCAN instead"]
    redis_client.sadd(index_key(DAY), key("a"))
    assert discovery_method(redis_client, DAY) == "index"
    assert discovery_method(redis_client, DAY, "index") == "index"
    assert discovery_method(redis_client, DAY, "scan") == "scan"
    assert discovery_method(redis_client, DAY, "auto", "a") == "scan"  # a merchant rerun always scans
    assert discovery_method(redis_client, DAY, "index", "a") == "index"  # unless told otherwise
    assert len(warnings) == 1


def test_an_index_of_another_type_is_named_and_the_day_scanned(redis_client):
    redis_client.set(index_key(DAY), "not a set")
    warnings: list[str] = []
    assert discovery_method(redis_client, DAY, "auto", warn=warnings.append) == "scan"
    assert warnings == ["usage-index:2025-11-01 holds a Redis string, not the day's index set; reading 2025-11-01 with SCAN instead"]


def test_an_unknown_discovery_is_refused(redis_client):
    with pytest.raises(ValueError) as caught:
        discovery_method(redis_client, DAY, "keys")
    assert str(caught.value) == "discovery: must be one of auto, index, scan, got 'keys'"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size and scan_count must be positive"),
        ({"scan_count": 0}, "batch_size and scan_count must be positive"),
        ({"method": "keys"}, "method: must be 'index' or 'scan', got 'keys'"),
    ],
)
def test_bad_reader_arguments_are_refused(redis_client, kwargs, message):
    with pytest.raises(ValueError) as caught:
        next(read_day(redis_client, DAY, **kwargs))
    assert str(caught.value) == message


def test_batches_of_one_still_read_everything(redis_client):
    redis_client.set(key("a"), 1)
    redis_client.set(key("b"), 2)
    batches = list(read_day(redis_client, DAY, batch_size=1, scan_count=1))
    assert [len(b.counters) for b in batches] == [1, 1]


# batches


def test_batch_sizes_and_source(redis_client):
    for i in range(5):
        redis_client.set(key(f"m{i}"), i)
    batches = list(read_day(redis_client, DAY, batch_size=2))
    assert sorted(len(b.counters) for b in batches) == [1, 2, 2]
    assert {b.source for b in batches} == {ADDRESS}
    assert all_of(batches)[0] == [Counter(UsageKey(f"m{i}", DAY, "q"), i) for i in range(5)]


def test_the_index_reads_only_indexed_keys_of_the_pattern(redis_client):
    redis_client.set(key("a"), 1)
    redis_client.set(key("b"), 2)  # written by another writer: not in the index
    redis_client.set(key("c"), 3)
    redis_client.sadd(index_key(DAY), key("a"), key("c"))
    counters, *_ = all_of(read_day(redis_client, DAY, method="index"))
    assert counters == [Counter(UsageKey("a", DAY, "q"), 1), Counter(UsageKey("c", DAY, "q"), 3)]
    counters, *_ = all_of(read_day(redis_client, DAY, "c", method="index"))
    assert counters == [Counter(UsageKey("c", DAY, "q"), 3)]


def test_foreign_bad_and_wrong_type_keys(redis_client):
    redis_client.set(key("good"), 5)
    redis_client.set(key("x:2025-11-01:y", day=dt.date(2025, 11, 2)), 1)  # matched by the pattern, another day
    redis_client.set(key("z:2025-11-01:w", day=dt.date(2025, 11, 3)), 1)  # and another, in the same batch
    redis_client.set(b"usage:m:2025-11-01:", b"7")  # matched, does not parse
    redis_client.hset(key("hash"), "f", "v")
    redis_client.set(key("long"), b"9" * (RAW_VALUE_PREVIEW + 50))
    counters, plain, bad, foreign, vanished = all_of(read_day(redis_client, DAY))
    assert counters == [Counter(UsageKey("good", DAY, "q"), 5)] and plain == []
    assert bad == sorted(
        [
            (b"usage:m:2025-11-01:", "metric type is empty", b"7"),
            (key("hash"), "key holds a Redis hash, not a string counter", None),
            (key("long"), "value does not fit in a PostgreSQL bigint", b"9" * RAW_VALUE_PREVIEW),
        ]
    )
    assert (foreign, vanished) == (2, 0)


def test_one_merchants_read_skips_its_lookalikes(redis_client):
    redis_client.set(key("a"), 1)
    redis_client.set(key("a:2025-11-01:b"), 2)  # matched by usage:a:2025-11-01:*, merchant "a:2025-11-01:b"
    counters, plain, bad, foreign, vanished = all_of(read_day(redis_client, DAY, "a", bulk=True))
    assert (counters, plain, bad, foreign) == ([Counter(UsageKey("a", DAY, "q"), 1)], [], [], 1)


class Racing:
    """The real client; SCAN returns every key twice, and ``doomed`` keys vanish just before MGET."""

    def __init__(self, client, doomed=()):
        self.client, self.doomed = client, list(doomed)

    def __getattr__(self, name):
        return getattr(self.client, name)

    def scan_iter(self, **kwargs):
        for raw in self.client.scan_iter(**kwargs):
            yield raw
            yield raw.decode("utf-8", "surrogateescape")  # a decoding client's form of the same key

    def mget(self, keys):
        if self.doomed:
            self.client.delete(*self.doomed)
            self.doomed = []
        return self.client.mget(keys)


@pytest.mark.parametrize("bulk", [False, True])
def test_a_key_returned_twice_is_read_once_and_a_vanished_key_is_counted(redis_client, bulk):
    redis_client.set(key("a"), 1)
    redis_client.set(key("b"), 2)
    redis_client.set(key("gone"), 3)
    counters, plain, bad, foreign, vanished = all_of(read_day(Racing(redis_client, [key("gone")]), DAY, bulk=bulk))
    assert counters == [Counter(UsageKey("a", DAY, "q"), 1), Counter(UsageKey("b", DAY, "q"), 2)]
    assert (plain, bad, foreign, vanished) == ([], [], 0, 1)


def test_the_bulk_path_returns_plain_rows_and_falls_back_on_anything_odd(redis_client):
    redis_client.set(key("a"), 1)
    redis_client.set(key("b", "clicks"), 22)
    counters, plain, bad, *_ = all_of(read_day(Racing(redis_client), DAY, bulk=True))
    assert (counters, bad) == ([], [])
    assert plain == [(b"a", b"q", b"1"), (b"b", b"clicks", b"22")]  # once each, though SCAN said twice
    redis_client.set(key("c"), "-4")
    counters, plain, bad, *_ = all_of(read_day(redis_client, DAY, bulk=True))
    assert plain == []  # the batch is read key by key, which names the odd one
    assert counters == [Counter(UsageKey("a", DAY, "q"), 1), Counter(UsageKey("b", DAY, "clicks"), 22)]
    assert bad == [(key("c"), "value is negative", b"-4")]


def test_a_decoding_client_reads_the_same(redis_client):
    redis_client.set(key("a"), 1)
    redis_client.set(key("b"), "x")
    db = redis_client.connection_pool.connection_kwargs["db"]
    decoding = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, decode_responses=True)
    try:
        counters, plain, bad, *_ = all_of(read_day(decoding, DAY, bulk=True))
        assert counters == [Counter(UsageKey("a", DAY, "q"), 1)] and plain == []
        assert bad == [(key("b"), "value is not a non-negative integer", b"x")]
        assert discovery_method(decoding, DAY) == "scan"
        redis_client.sadd(index_key(DAY), key("a"))
        assert discovery_method(decoding, DAY) == "index"
    finally:
        decoding.close()


def test_a_bad_keys_text_is_escaped_and_shortened():
    assert BadKey(b"usage:\xff:2025-11-01:q", "r").key_text == "usage:\\xff:2025-11-01:q"
    exact = b"k" * KEY_TEXT_PREVIEW
    assert BadKey(exact, "r").key_text == exact.decode()
    longer = b"k" * (KEY_TEXT_PREVIEW + 1)
    assert BadKey(longer, "r").key_text == f"{'k' * KEY_TEXT_PREVIEW}... ({KEY_TEXT_PREVIEW + 1} bytes)"


def test_keys_of_another_type_are_named_on_a_cluster_too(cluster_client):
    for i in range(6):  # several slots, several primaries
        cluster_client.hset(key(f"hash-{i}"), "f", "v")
        cluster_client.set(key(f"good-{i}"), i)
    counters, plain, bad, foreign, vanished = all_of(read_day(cluster_client, DAY))
    assert len(counters) == 6 and vanished == 0
    assert bad == sorted((key(f"hash-{i}"), "key holds a Redis hash, not a string counter", None) for i in range(6))
