"""The reader thread: same items in order, its errors raised in the consumer, stopped with it."""

from __future__ import annotations

import threading

import pytest

from usage_agg.prefetch import prefetched


def test_items_arrive_in_order_from_another_thread():
    seen_in = set()

    def items():
        for n in range(50):
            seen_in.add(threading.current_thread().name)
            yield n

    assert list(prefetched(items, depth=2)) == list(range(50))
    assert seen_in == {"usage-agg-reader"}


def test_an_error_in_the_reader_is_raised_in_the_consumer_after_the_items_before_it():
    def items():
        yield 1
        raise ConnectionError("Redis went away")

    got = []
    with pytest.raises(ConnectionError, match="Redis went away"):
        for item in prefetched(items):
            got.append(item)
    assert got == [1]


def test_a_consumer_that_stops_early_stops_the_reader():
    produced = []

    def items():
        for n in range(1000):
            produced.append(n)
            yield n

    reader = prefetched(items, depth=2)
    assert next(reader) == 0
    reader.close()  # what a consumer's exception does to it
    assert not any(t.name == "usage-agg-reader" for t in threading.enumerate())
    assert len(produced) < 10  # it stopped instead of reading everything
