"""The fast key parser must agree with the full parser whenever it answers."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from usage_agg.keys import (
    SHORT_KEY_BYTES,
    BadKeyError,
    are_plain_quantities,
    build_key,
    hourly_key,
    hourly_keys_of,
    parse_key,
    parse_key_of_day,
    split_keys_of_day,
)
from usage_agg.keys import day_and_hours_pattern, day_pattern, hours_pattern
from usage_agg.source import DAILY_KEY_PREFIX, HOURLY_KEY_PREFIX, _of_day

DAY = dt.date(2025, 11, 1)
pieces = st.sampled_from(["usage", "usage:", ":", "2025-11-01", "2025-11-02", "q", "", "\x00", "m", "é", "*"])


@given(st.lists(pieces, max_size=8).map("".join), st.sampled_from(["utf-8", "latin-1"]))
def test_fast_path_agrees_with_parse_key(text, encoding):
    try:
        raw = text.encode(encoding)
    except UnicodeEncodeError:
        return
    fast = parse_key_of_day(raw, DAY, DAY.isoformat())
    if fast is None:
        return
    assert fast == parse_key(raw)


@given(st.text(min_size=1, max_size=200).filter(lambda s: "\x00" not in s), st.text(min_size=1, max_size=60).filter(lambda s: ":" not in s and "\x00" not in s))
def test_fast_path_answers_for_every_well_formed_key_of_the_day(merchant, metric):
    """Up to SHORT_KEY_BYTES it answers; a longer key may hold a part over its limit: the full parser's."""
    raw = build_key(merchant, DAY, metric).encode()
    fast = parse_key_of_day(raw, DAY, DAY.isoformat())
    assert fast == (parse_key(raw) if len(raw) <= SHORT_KEY_BYTES else None)


def test_fast_path_leaves_bad_keys_to_the_full_parser():
    for raw in (b"usage::2025-11-01:q", b"usage:m:2025-11-01:", b"usage:\xff:2025-11-01:q", b"usage:2025-11-01:q"):
        assert parse_key_of_day(raw, DAY, DAY.isoformat()) is None
        try:
            parse_key(raw)
        except BadKeyError:
            continue
        raise AssertionError(f"{raw!r} should be a bad key")


# -- the bulk form: a whole batch in one pass, all or nothing ---------------------------------

bulk_pieces = st.sampled_from(
    ["usage", "usage:", ":", "2025-11-01", "2025-11-02", "q", "", "\x00", "m", "é", "*", "\n", "\t", "\\", "\r"]
)


@given(st.lists(st.lists(bulk_pieces, max_size=8).map("".join), min_size=1, max_size=5), st.sampled_from(["utf-8", "latin-1"]))
def test_bulk_split_agrees_with_the_full_parser_whenever_it_answers(texts, encoding):
    try:
        raws = [text.encode(encoding) for text in texts]
    except UnicodeEncodeError:
        return
    pairs = split_keys_of_day(raws, DAY.isoformat())
    if pairs is None:
        return
    for raw, (merchant, metric) in zip(raws, pairs, strict=True):
        key = parse_key(raw)
        assert (key.usage_date, key.merchant_id, key.metric_type) == (DAY, merchant.decode(), metric.decode())
        assert not any(ch in key.merchant_id + key.metric_type for ch in "\\\t\r\n\x00")


@given(
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=200).filter(lambda s: not any(ch in s for ch in "\\\t\r\n\x00")),
            st.text(min_size=1, max_size=60).filter(lambda s: not any(ch in s for ch in ":\\\t\r\n\x00")),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_bulk_split_answers_for_every_plain_batch_of_the_day(keys):
    raws = [build_key(merchant, DAY, metric).encode() for merchant, metric in keys]
    short = max(map(len, raws)) <= SHORT_KEY_BYTES
    assert split_keys_of_day(raws, DAY.isoformat()) == ([(m.encode(), t.encode()) for m, t in keys] if short else None)


def test_one_odd_key_sends_the_whole_batch_to_the_per_key_path():
    good = build_key("acme", DAY, "q").encode()
    for odd in (b"usage:a\nb:2025-11-01:q", b"usage:m:2025-11-02:q", b"usage:\xff:2025-11-01:q", b"usage:a\\b:2025-11-01:q"):
        assert split_keys_of_day([good, odd], DAY.isoformat()) is None
    assert split_keys_of_day([good], DAY.isoformat()) == [(b"acme", b"q")]


@pytest.mark.parametrize(
    ("values", "plain"),
    [
        ([b"1", b"22", b"999999999999999999"], True),
        ([b"1", None], False),
        ([b"1", b""], False),
        ([b"1", b"-2"], False),
        ([b"1", b"1000000000000000000"], False),  # 19 digits: the full check decides
        ([b"1", "2"], False),
        ([b"\xd9\xa3"], False),  # a non-ASCII digit
        ([], False),
    ],
)
def test_plain_quantities_are_exactly_the_fast_path_of_parse_quantity(values, plain):
    assert are_plain_quantities(values) is plain


@given(
    st.text(min_size=1, max_size=100).filter(lambda s: "\x00" not in s),
    st.text(min_size=1, max_size=40).filter(lambda s: ":" not in s and "\x00" not in s),
)
def test_the_batch_builds_the_hourly_hash_names_hourly_key_builds(merchant, metric):
    try:
        expected = hourly_key(merchant, DAY, metric).encode("utf-8", "surrogateescape")
    except ValueError:  # an id hourly_key refuses is never a good key of a batch
        return
    ids = [(merchant.encode("utf-8", "surrogateescape"), metric.encode("utf-8", "surrogateescape"))] * 2
    assert hourly_keys_of(ids, DAY) == [expected, expected]


key_pieces = st.sampled_from(["usage", "usage:", "usage-hourly:", "usage-index:", ":", ":2025-11-01:", "2025-11-01", "m", "q", "x"])


@given(st.lists(key_pieces, max_size=7).map("".join))
def test_the_readers_day_filter_is_what_each_days_pattern_alone_matches(text):
    """One SCAN pass matches ``usage*:{day}:*``; the reader keeps a key as a counter or as a hash
    exactly when ``usage:*:{day}:*`` or ``usage-hourly:*:{day}:*`` (Redis glob) matches it."""
    def glob(pattern: str, key: str) -> bool:  # these patterns hold no special character but *
        return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), key, re.DOTALL) is not None

    raw, marker = text.encode(), b":2025-11-01:"
    assert _of_day(raw, DAILY_KEY_PREFIX, marker) == glob(day_pattern(DAY), text)
    assert _of_day(raw, HOURLY_KEY_PREFIX, marker) == glob(hours_pattern(DAY), text)
    if glob(day_pattern(DAY), text) or glob(hours_pattern(DAY), text):
        assert glob(day_and_hours_pattern(DAY), text)  # the one pass finds both
