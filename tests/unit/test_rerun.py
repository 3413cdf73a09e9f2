from __future__ import annotations

import datetime as dt

import pytest

from usage_agg.rerun import RerunRequestError, validate_rerun_request

TODAY = dt.date(2025, 11, 20)


def test_a_single_date_expands_to_one_task():
    request = validate_rerun_request("acme", "2025-11-01", today=TODAY)
    assert (request.merchant_id, request.dates, request.allow_decrease) == ("acme", (dt.date(2025, 11, 1),), False)


def test_a_range_is_inclusive():
    request = validate_rerun_request("acme", "2025-11-01", "2025-11-03", True, today=TODAY)
    assert [d.isoformat() for d in request.dates] == ["2025-11-01", "2025-11-02", "2025-11-03"]
    assert request.allow_decrease is True


def test_empty_end_date_means_one_day():
    assert len(validate_rerun_request("acme", "2025-11-01", "", today=TODAY).dates) == 1


def test_thirty_one_days_is_the_limit():
    assert len(validate_rerun_request("m", "2025-10-01", "2025-10-31", today=TODAY).dates) == 31


@pytest.mark.parametrize(
    ("kwargs", "field", "detail"),
    [
        ({"merchant_id": None, "date": "2025-11-01"}, "merchant_id", "required"),
        ({"merchant_id": "", "date": "2025-11-01"}, "merchant_id", "required"),
        ({"merchant_id": "   ", "date": "2025-11-01"}, "merchant_id", "non-empty string"),
        ({"merchant_id": 42, "date": "2025-11-01"}, "merchant_id", "string"),
        ({"merchant_id": "m", "date": None}, "date", "required"),
        ({"merchant_id": "m", "date": "2025-11-1"}, "date", "YYYY-MM-DD"),
        ({"merchant_id": "m", "date": "01/11/2025"}, "date", "YYYY-MM-DD"),
        ({"merchant_id": "m", "date": "2025-02-30"}, "date", "not a valid calendar date"),
        ({"merchant_id": "m", "date": "2025-11-01", "end_date": "2025-11"}, "end_date", "YYYY-MM-DD"),
        ({"merchant_id": "m", "date": "2025-11-05", "end_date": "2025-11-04"}, "end_date", "before date"),
        ({"merchant_id": "m", "date": "2025-10-01", "end_date": "2025-11-01"}, "end_date", "at most 31"),
        ({"merchant_id": "m", "date": "2025-11-21"}, "date", "future"),
        ({"merchant_id": "m", "date": "2025-11-19", "end_date": "2025-11-21"}, "end_date", "future"),
        ({"merchant_id": "m", "date": "2025-11-01", "allow_decrease": "yes"}, "allow_decrease", "true or false"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(kwargs, field, detail):
    with pytest.raises(RerunRequestError, match=rf"^{field}: .*{detail}"):
        validate_rerun_request(**kwargs, today=TODAY)


def test_a_merchant_id_over_the_key_limit_is_refused_before_any_data_is_touched():
    validate_rerun_request("é" * 512, "2025-11-01", today=TODAY)  # 1024 bytes: the longest accepted
    with pytest.raises(RerunRequestError, match="^merchant_id: merchant id is 1026 bytes long; at most 1024"):
        validate_rerun_request("é" * 513, "2025-11-01", today=TODAY)


def test_every_merchant_over_a_range_needs_the_confirmation():
    request = validate_rerun_request(None, "2025-11-01", "2025-11-07", all_merchants=True, today=TODAY)
    assert request.merchant_id is None and len(request.dates) == 7
    assert validate_rerun_request("", "2025-11-01", all_merchants=True, today=TODAY).merchant_id is None
    with pytest.raises(RerunRequestError, match="^merchant_id: is required; to rerun every merchant, leave it empty and tick all_merchants"):
        validate_rerun_request(None, "2025-11-01", "2025-11-07", today=TODAY)
    with pytest.raises(RerunRequestError, match="^all_merchants: must be off when merchant_id is given"):
        validate_rerun_request("acme", "2025-11-01", all_merchants=True, today=TODAY)
    with pytest.raises(RerunRequestError, match="^all_merchants: must be true or false"):
        validate_rerun_request(None, "2025-11-01", all_merchants="yes", today=TODAY)
    with pytest.raises(RerunRequestError, match="^end_date: the range"):  # the same 31-day limit
        validate_rerun_request(None, "2025-10-01", "2025-11-01", all_merchants=True, today=TODAY)
