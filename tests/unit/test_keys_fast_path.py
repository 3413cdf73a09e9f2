"""The fast key parser must agree with the full parser whenever it answers."""

from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from usage_agg.keys import BadKeyError, build_key, parse_key, parse_key_of_day

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


@given(st.text(min_size=1).filter(lambda s: "\x00" not in s), st.text(min_size=1).filter(lambda s: ":" not in s and "\x00" not in s))
def test_fast_path_answers_for_every_well_formed_key_of_the_day(merchant, metric):
    raw = build_key(merchant, DAY, metric).encode()
    assert parse_key_of_day(raw, DAY, DAY.isoformat()) == parse_key(raw)


def test_fast_path_leaves_bad_keys_to_the_full_parser():
    for raw in (b"usage::2025-11-01:q", b"usage:m:2025-11-01:", b"usage:\xff:2025-11-01:q", b"usage:2025-11-01:q"):
        assert parse_key_of_day(raw, DAY, DAY.isoformat()) is None
        try:
            parse_key(raw)
        except BadKeyError:
            continue
        raise AssertionError(f"{raw!r} should be a bad key")
