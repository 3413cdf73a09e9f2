"""Validating a rerun request (the conf of ``usage_aggregation_merchant``).

A rerun covers one merchant, or every merchant when the merchant id is left empty
and ``all_merchants`` confirms it (the original job's ``aggregate-range FROM TO``),
for a date or an inclusive range of at most 31 days. The trigger form's JSON schema
already refuses what a schema can judge alone (an empty merchant id, a malformed
date). What needs several fields or today's date is checked here, before any data
is touched; every message starts with the name of the field at fault.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from usage_agg.keys import check_merchant_id, parse_date

MAX_RANGE_DAYS = 31


class RerunRequestError(ValueError):
    """A rerun request that is refused; the message names the field."""


@dataclass(frozen=True)
class RerunRequest:
    #: ``None``: every merchant
    merchant_id: str | None
    dates: tuple[dt.date, ...]
    allow_decrease: bool


def validate_rerun_request(
    merchant_id: object,
    date: object,
    end_date: object = None,
    allow_decrease: object = False,
    all_merchants: object = False,
    *,
    today: dt.date | None = None,
) -> RerunRequest:
    """Check a rerun request and expand it to its dates (``end_date`` inclusive)."""
    today = today or dt.datetime.now(dt.UTC).date()
    merchant = _merchant(merchant_id, all_merchants)
    if date in (None, ""):
        raise RerunRequestError("date: is required (YYYY-MM-DD)")
    first = _date(date, "date")
    last = first if end_date in (None, "") else _date(end_date, "end_date")
    if last < first:
        raise RerunRequestError(f"end_date: {last} is before date {first}")
    days = (last - first).days + 1
    if days > MAX_RANGE_DAYS:
        raise RerunRequestError(f"end_date: the range {first}..{last} is {days} days; at most {MAX_RANGE_DAYS} allowed")
    if first > today:
        raise RerunRequestError(f"date: {first} is in the future (today is {today} UTC)")
    if last > today:
        raise RerunRequestError(f"end_date: {last} is in the future (today is {today} UTC)")
    if not isinstance(allow_decrease, bool):
        raise RerunRequestError(f"allow_decrease: must be true or false, got {allow_decrease!r}")
    dates = tuple(first + dt.timedelta(days=i) for i in range(days))
    return RerunRequest(merchant, dates, allow_decrease)


def _merchant(merchant_id: object, all_merchants: object) -> str | None:
    """The one merchant, or ``None`` for every merchant: only when asked for in both fields."""
    if not isinstance(all_merchants, bool):
        raise RerunRequestError(f"all_merchants: must be true or false, got {all_merchants!r}")
    if merchant_id is None or merchant_id == "":
        if not all_merchants:
            raise RerunRequestError(
                "merchant_id: is required; to rerun every merchant, leave it empty and tick all_merchants"
            )
        return None
    if all_merchants:
        raise RerunRequestError(
            f"all_merchants: must be off when merchant_id is given ({merchant_id!r}); leave merchant_id empty "
            "to rerun every merchant"
        )
    if not isinstance(merchant_id, str) or not merchant_id.strip():  # a form left blank but for spaces
        raise RerunRequestError(f"merchant_id: must be a non-empty string, got {merchant_id!r}")
    try:
        check_merchant_id(merchant_id)
    except ValueError as err:
        raise RerunRequestError(str(err)) from None
    return merchant_id


def _date(value: object, field: str) -> dt.date:
    if not isinstance(value, str):
        raise RerunRequestError(f"{field}: expected a date as YYYY-MM-DD, got {value!r}")
    try:
        return parse_date(value, field=field)
    except ValueError as err:
        raise RerunRequestError(str(err)) from None
