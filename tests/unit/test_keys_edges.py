"""Edges of the key format found by mutation testing: values as text, odd value types."""

from __future__ import annotations

import pytest

from usage_agg.keys import BIGINT_MAX, BadKeyError, parse_quantity


@pytest.mark.parametrize(("raw", "value"), [("0", 0), ("42", 42), (str(BIGINT_MAX), BIGINT_MAX), ("007", 7)])
def test_a_value_read_as_text_is_parsed_like_bytes(raw, value):
    """A client with ``decode_responses=True`` hands out ``str`` values."""
    assert parse_quantity(raw) == value


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("١٢", "value is not a non-negative integer"),  # Arabic-Indic digits: str.isdigit() says yes, INCRBY never writes them
        ("²", "value is not a non-negative integer"),
        ("\udcff", "value is not a non-negative integer"),  # an undecodable byte, as surrogateescape carries it
        ("-5", "value is negative"),
        (str(BIGINT_MAX + 1), "value does not fit in a PostgreSQL bigint"),
    ],
)
def test_a_bad_value_read_as_text_is_refused_with_its_reason(raw, reason):
    with pytest.raises(BadKeyError) as caught:
        parse_quantity(raw)
    assert str(caught.value) == reason


@pytest.mark.parametrize(("raw", "type_name"), [(42, "int"), (None, "NoneType"), (4.0, "float"), (bytearray(b"1"), "bytearray")])
def test_a_value_of_another_type_is_a_bad_key_naming_the_type(raw, type_name):
    with pytest.raises(BadKeyError) as caught:
        parse_quantity(raw)
    assert str(caught.value) == f"value has unexpected type {type_name}"
