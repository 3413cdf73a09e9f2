from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from usage_agg.keys import (
    BIGINT_MAX,
    BadKeyError,
    UsageKey,
    belongs_to,
    build_key,
    day_pattern,
    escape_match,
    parse_date,
    parse_key,
    parse_quantity,
)

# hypothesis' text() has no surrogates; NUL is refused by design (PostgreSQL text cannot hold it).
merchant_ids = st.text(min_size=1, max_size=200).filter(lambda s: "\x00" not in s)
metric_types = st.text(min_size=1, max_size=60).filter(lambda s: ":" not in s and "\x00" not in s)
dates = st.dates(min_value=dt.date(1000, 1, 1), max_value=dt.date(9999, 12, 31))


def test_build_key_matches_documented_format():
    assert build_key("acme_electronics_2024", "2025-11-01", "queries") == "usage:acme_electronics_2024:2025-11-01:queries"


def test_parse_key_reads_from_the_right_so_merchant_ids_may_hold_colons():
    assert parse_key(b"usage:shop:eu:1:2025-11-01:queries") == UsageKey("shop:eu:1", dt.date(2025, 11, 1), "queries")


@given(merchant_ids, dates, metric_types)
def test_build_then_parse_round_trips(merchant_id, day, metric):
    key = build_key(merchant_id, day, metric)
    assert parse_key(key.encode("utf-8")) == UsageKey(merchant_id, day, metric)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"other:m:2025-11-01:q", "does not start with"),
        (b"usage:2025-11-01:q", "does not have the form"),
        (b"usage::2025-11-01:q", "merchant id is empty"),
        (b"usage:m:2025-11-01:", "metric type is empty"),
        (b"usage:m:2025-13-01:q", "not a valid calendar date"),
        (b"usage:m:20251101:q", "YYYY-MM-DD"),
        (b"usage:\xff\xfe:2025-11-01:q", "not valid UTF-8"),
        (b"usage:m\x00:2025-11-01:q", "NUL"),
    ],
)
def test_parse_key_names_the_reason(raw, reason):
    with pytest.raises(BadKeyError, match=reason):
        parse_key(raw)


@pytest.mark.parametrize("bad", ["", "a:b"])
def test_build_key_refuses_bad_metric_types(bad):
    with pytest.raises(ValueError, match="metric_type"):
        build_key("m", "2025-11-01", bad)


def test_build_key_refuses_empty_merchant():
    with pytest.raises(ValueError, match="merchant_id"):
        build_key("", "2025-11-01", "q")


@pytest.mark.parametrize(("raw", "value"), [(b"0", 0), (b"42", 42), (str(BIGINT_MAX).encode(), BIGINT_MAX), (b"007", 7)])
def test_parse_quantity_accepts_non_negative_bigints(raw, value):
    assert parse_quantity(raw) == value


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"-1", "negative"),
        (b"1.5", "not a non-negative integer"),
        (b" 1", "not a non-negative integer"),
        (b"+1", "not a non-negative integer"),
        (b"", "not a non-negative integer"),
        (b"abc", "not a non-negative integer"),
        ("١٢".encode(), "not a non-negative integer"),  # non-ASCII digits are not INCRBY's
        (str(BIGINT_MAX + 1).encode(), "bigint"),
        (b"9" * 5000, "bigint"),
    ],
)
def test_parse_quantity_refuses_with_reason(raw, reason):
    with pytest.raises(BadKeyError, match=reason):
        parse_quantity(raw)


@pytest.mark.parametrize(
    ("text", "escaped"),
    [("a*", "a\\*"), ("a?b", "a\\?b"), ("[x]", "\\[x\\]"), ("back\\slash", "back\\\\slash"), ("plain:id", "plain:id")],
)
def test_escape_match(text, escaped):
    assert escape_match(text) == escaped


def test_day_pattern_for_all_and_for_one_merchant():
    assert day_pattern("2025-11-01") == "usage:*:2025-11-01:*"
    assert day_pattern("2025-11-01", "a*[b]") == "usage:a\\*\\[b\\]:2025-11-01:*"


def test_belongs_to_filters_other_days_and_merchants():
    key = parse_key("usage:x:2025-11-01:y:2025-11-02:q")  # matched by 2025-11-01's pattern
    assert not belongs_to(key, dt.date(2025, 11, 1), None)
    assert belongs_to(key, dt.date(2025, 11, 2), "x:2025-11-01:y")
    assert not belongs_to(key, dt.date(2025, 11, 2), "x")


@pytest.mark.parametrize("bad", ["2025-1-01", "2025/11/01", "20251101", "2025-02-30", "", None, "2025-11-01T00:00"])
def test_parse_date_is_strict_and_names_the_field(bad):
    with pytest.raises(ValueError, match="^when: "):
        parse_date(bad, field="when")


def test_the_longest_ids_are_accepted_and_one_byte_more_is_a_bad_key():
    from usage_agg.keys import MAX_MERCHANT_ID_BYTES, MAX_METRIC_TYPE_BYTES, parse_key_of_day, split_keys_of_day

    day = dt.date(2025, 11, 1)
    longest = build_key("m" * MAX_MERCHANT_ID_BYTES, day, "t" * MAX_METRIC_TYPE_BYTES)
    assert parse_key(longest.encode()) == UsageKey("m" * 1024, day, "t" * 256)
    for merchant, metric, reason in (
        ("m" * 1025, "t", "merchant id is 1025 bytes long; at most 1024"),
        ("€" * 342, "t", "merchant id is 1026 bytes long"),  # bytes, not characters
        ("m", "t" * 257, "metric type is 257 bytes long; at most 256"),
    ):
        raw = f"usage:{merchant}:2025-11-01:{metric}".encode()
        with pytest.raises(BadKeyError, match=reason):
            parse_key(raw)
        assert parse_key_of_day(raw, day, "2025-11-01") is None  # the fast paths leave it to parse_key
        assert split_keys_of_day([b"usage:a:2025-11-01:q", raw], "2025-11-01") is None
        with pytest.raises(ValueError, match=reason.split(";")[0]):
            build_key(merchant, day, metric)
