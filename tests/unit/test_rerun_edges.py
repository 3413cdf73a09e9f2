"""Edges of a rerun request: today's date in UTC, the exact boundary days, the exact messages."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from usage_agg.rerun import RerunRequestError, validate_rerun_request

TODAY = dt.date(2025, 11, 20)


def refusal(**kwargs) -> str:
    with pytest.raises(RerunRequestError) as caught:
        validate_rerun_request(**kwargs)
    return str(caught.value)


def test_today_itself_is_not_the_future():
    assert validate_rerun_request("m", "2025-11-20", today=TODAY).dates == (TODAY,)
    request = validate_rerun_request("m", "2025-11-19", "2025-11-20", today=TODAY)
    assert request.dates == (dt.date(2025, 11, 19), TODAY)


@pytest.fixture
def local_date_is_not_utcs(monkeypatch):
    """A local time zone whose date differs from UTC's right now (UTC+14 late in the UTC day, UTC-12 early)."""
    zone = "Etc/GMT-14" if dt.datetime.now(dt.timezone.utc).hour >= 10 else "Etc/GMT+12"
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_without_today_the_request_is_judged_by_the_utc_date(local_date_is_not_utcs):
    utc_today = dt.datetime.now(dt.timezone.utc).date()
    assert dt.date.today() != utc_today  # the fixture did its job
    assert validate_rerun_request("m", utc_today.isoformat()).dates == (utc_today,)
    tomorrow = (utc_today + dt.timedelta(days=1)).isoformat()
    assert refusal(merchant_id="m", date=tomorrow) == f"date: {tomorrow} is in the future (today is {utc_today} UTC)"


def test_a_nul_in_the_merchant_id_is_refused_with_its_own_message():
    assert refusal(merchant_id="a\x00b", date="2025-11-01", today=TODAY) == (
        "merchant_id: must not contain a NUL character (PostgreSQL text cannot store it)"
    )


@pytest.mark.parametrize("missing", [None, ""])
def test_a_missing_date_is_called_required(missing):
    assert refusal(merchant_id="m", date=missing, today=TODAY) == "date: is required (YYYY-MM-DD)"


@pytest.mark.parametrize(("field", "kwargs"), [("date", {"date": 20251101}), ("end_date", {"date": "2025-11-01", "end_date": 20251102})])
def test_a_date_that_is_not_text_is_refused_naming_its_field(field, kwargs):
    value = kwargs[field]
    assert refusal(merchant_id="m", today=TODAY, **kwargs) == f"{field}: expected a date as YYYY-MM-DD, got {value!r}"
