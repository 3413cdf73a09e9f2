"""The usage key format: build, parse, escape for ``SCAN MATCH``, validate values.

Keys look like ``usage:{merchant_id}:{YYYY-MM-DD}:{metric_type}``. Merchant ids may
hold any character, ``:`` included, so a key is parsed from the right: the last two
``:``-separated fields are the date and the metric type, everything between the
prefix and the date is the merchant id. Metric types never contain ``:``.

Nothing here does I/O; every function is pure so it can be property-tested.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Iterable
from typing import NamedTuple

KEY_PREFIX = "usage:"
#: Per-day set of that day's usage keys, written by the tracking helper. It does not
#: start with KEY_PREFIX, so no usage pattern (``usage:*``) can ever match it.
INDEX_PREFIX = "usage-index:"
#: Beside a daily counter, a hash of the same merchant, UTC date and metric with the
#: day's counts per UTC hour (fields ``00`` to ``23``); its name is the daily key's with
#: this prefix instead of KEY_PREFIX, so no usage pattern matches it either.
HOURLY_PREFIX = "usage-hourly:"
HOUR_FIELDS = tuple(f"{hour:02d}".encode() for hour in range(24))
BIGINT_MAX = 2**63 - 1
#: The longest merchant id and metric type accepted, in UTF-8 bytes. PostgreSQL's
#: primary-key index refuses entries over about 2.7 KB (one third of a page), and a
#: refused row would roll back its whole day; these limits keep every accepted key
#: well inside it. A longer key is a bad key: dead-lettered, never blocking the day.
MAX_MERCHANT_ID_BYTES = 1024
MAX_METRIC_TYPE_BYTES = 256

_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DIGITS_RE = re.compile(rb"[0-9]+")
# Characters that SCAN's MATCH treats as glob syntax; a backslash escapes each of them.
_GLOB_SPECIAL = frozenset("*?[]\\")


class BadKeyError(ValueError):
    """A key or value that cannot be aggregated; the message is the reason recorded."""


class UsageKey(NamedTuple):
    merchant_id: str
    usage_date: dt.date
    metric_type: str


def parse_date(value: str | dt.date, *, field: str = "usage_date") -> dt.date:
    """Parse a strict ``YYYY-MM-DD`` date; the error names ``field``."""
    if isinstance(value, dt.datetime):
        raise ValueError(f"{field}: expected a date as YYYY-MM-DD, got a datetime {value!r}")
    if isinstance(value, dt.date):
        return value
    if not isinstance(value, str) or not _DATE_RE.fullmatch(value):
        raise ValueError(f"{field}: expected a date as YYYY-MM-DD, got {value!r}")
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{field}: {value!r} is not a valid calendar date") from None


def check_merchant_id(merchant_id: str) -> None:
    """Refuse a merchant id no key can carry and PostgreSQL cannot store: the one check, for the
    operator's options, a rerun's conf, the CLI's ``--merchant`` and the key helpers."""
    if not isinstance(merchant_id, str) or not merchant_id:
        raise ValueError(f"merchant_id: must be a non-empty string, got {merchant_id!r}")
    if "\x00" in merchant_id:
        raise ValueError("merchant_id: must not contain a NUL character (PostgreSQL text cannot store it)")
    if reason := _length_problem("merchant id", merchant_id, MAX_MERCHANT_ID_BYTES):
        raise ValueError(f"merchant_id: {reason}")


def _check_metric_type(metric_type: str) -> None:
    if not isinstance(metric_type, str) or not metric_type:
        raise ValueError(f"metric_type: must be a non-empty string, got {metric_type!r}")
    if ":" in metric_type or "\x00" in metric_type:
        raise ValueError(f"metric_type: must not contain ':' or NUL, got {metric_type!r}")
    if reason := _length_problem("metric type", metric_type, MAX_METRIC_TYPE_BYTES):
        raise ValueError(f"metric_type: {reason}")


def _length_problem(what: str, text: str, limit: int) -> str | None:
    """Why ``text`` is too long to store, or ``None``; cheap for the usual short text."""
    if len(text) * 4 <= limit:  # a UTF-8 character is at most 4 bytes
        return None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return f"{what} is not valid UTF-8"
    return f"{what} is {size} bytes long; at most {limit} bytes are accepted" if size > limit else None


def build_key(merchant_id: str, usage_date: str | dt.date, metric_type: str) -> str:
    """Build the Redis key for one merchant, day and metric."""
    check_merchant_id(merchant_id)
    _check_metric_type(metric_type)
    day = parse_date(usage_date)
    return f"{KEY_PREFIX}{merchant_id}:{day.isoformat()}:{metric_type}"


def hourly_key(merchant_id: str, usage_date: str | dt.date, metric_type: str) -> str:
    """The Redis key of the hash that counts one merchant's day and metric by UTC hour."""
    return HOURLY_PREFIX + build_key(merchant_id, usage_date, metric_type)[len(KEY_PREFIX) :]


def hourly_keys_of(ids: Iterable[tuple[bytes, bytes]], usage_date: dt.date) -> list[bytes]:
    """The hourly hashes beside a batch's daily keys, from their ``(merchant_id, metric_type)``
    as bytes: :func:`hourly_key`'s name, built with no parsing and no call per key (a day's
    reread builds one per key, and the reader is what an unchanged rerun waits for)."""
    prefix, day = HOURLY_PREFIX.encode(), f":{usage_date.isoformat()}:".encode()
    return [prefix + merchant + day + metric for merchant, metric in ids]


def parse_hour(field: bytes | str) -> int:
    """An hourly hash's field: ``00`` to ``23``; anything else is a :class:`BadKeyError`."""
    raw = field if isinstance(field, bytes) else str(field).encode("utf-8", "surrogateescape")
    if raw not in HOUR_FIELDS:
        raise BadKeyError(f"hour field {raw.decode('utf-8', 'backslashreplace')!r} is not one of 00 to 23")
    return int(raw)


def index_key(usage_date: str | dt.date) -> str:
    """The key of the set that indexes one day's usage keys."""
    return f"{INDEX_PREFIX}{parse_date(usage_date).isoformat()}"


def parse_key(raw_key: bytes | str) -> UsageKey:
    """Split a key into its parts, or raise :class:`BadKeyError` saying why it does not parse."""
    if isinstance(raw_key, bytes):
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            raise BadKeyError("key is not valid UTF-8") from None
    else:
        key = raw_key
    if not key.startswith(KEY_PREFIX):
        raise BadKeyError(f"key does not start with {KEY_PREFIX!r}")
    parts = key[len(KEY_PREFIX) :].rsplit(":", 2)
    if len(parts) != 3:
        raise BadKeyError("key does not have the form usage:{merchant_id}:{YYYY-MM-DD}:{metric_type}")
    merchant_id, day, metric_type = parts
    if not merchant_id:
        raise BadKeyError("merchant id is empty")
    if not metric_type:
        raise BadKeyError("metric type is empty")
    if "\x00" in key:
        raise BadKeyError("key contains a NUL character, which PostgreSQL text cannot store")
    usage_date = _key_date(day)
    for what, text, limit in (
        ("merchant id", merchant_id, MAX_MERCHANT_ID_BYTES),
        ("metric type", metric_type, MAX_METRIC_TYPE_BYTES),
    ):
        if reason := _length_problem(what, text, limit):
            raise BadKeyError(reason)
    return UsageKey(merchant_id, usage_date, metric_type)


def parse_key_of_day(raw_key: bytes, usage_date: dt.date, day_text: str) -> UsageKey | None:
    """:func:`parse_key`'s fast path for a reader of one day; ``None`` when unsure.

    A well-formed UTF-8 key of ``usage_date`` (``day_text`` is its ISO form) is split
    without date parsing; anything else (another day, bad UTF-8, NUL, empty parts, a
    key long enough that a part may be over its limit) returns ``None``, for
    :func:`parse_key` to parse or to give the exact reason.
    """
    if len(raw_key) > SHORT_KEY_BYTES:
        return None
    try:
        key = raw_key.decode("utf-8")
    except UnicodeDecodeError:
        return None
    parts = key.rsplit(":", 2)
    if len(parts) != 3 or parts[1] != day_text or not parts[2] or "\x00" in key:
        return None
    head = parts[0]
    if not head.startswith(KEY_PREFIX) or len(head) == len(KEY_PREFIX):
        return None
    return UsageKey(head[len(KEY_PREFIX) :], usage_date, parts[2])


#: Keys up to this long cannot hold a merchant id or metric type over its limit, so
#: the fast paths take them without measuring the parts; longer keys take the full parser.
SHORT_KEY_BYTES = len(KEY_PREFIX) + len(":YYYY-MM-DD:") + min(MAX_MERCHANT_ID_BYTES, MAX_METRIC_TYPE_BYTES)

#: Bytes that would need escaping in COPY's text format, or that no usage key holds
#: in its common shape; a batch with any of them takes the per-key path.
_UNCOMMON_BYTES = (b"\\", b"\t", b"\r", b"\x00")


@functools.lru_cache(maxsize=16)
def _day_keys_re(day_text: str) -> re.Pattern:
    # Greedy merchant id, then the date, then a metric type without ":": rsplit's split.
    return re.compile(rb"^usage:(.+):" + re.escape(day_text.encode()) + rb":([^:\n]+)$", re.MULTILINE)


def split_keys_of_day(raw_keys: list[bytes], day_text: str) -> list[tuple[bytes, bytes]] | None:
    """Merchant id and metric type of every key of a batch, in one regular-expression pass.

    The bulk form of :func:`parse_key_of_day`: all keys must be well-formed UTF-8 keys
    of ``day_text``, at most :data:`SHORT_KEY_BYTES` long, without backslash, tab, CR,
    LF or NUL (so they also go into COPY's text format unescaped; the writer checks
    that again on the block it sends). Returns ``None`` as soon as one is not: the caller then
    parses key by key, which finds and names the odd ones.
    """
    if not raw_keys or max(map(len, raw_keys)) > SHORT_KEY_BYTES:
        return None
    blob = b"\n".join(raw_keys)
    if any(odd in blob for odd in _UNCOMMON_BYTES) or blob.count(b"\n") != len(raw_keys) - 1:
        return None
    try:
        blob.decode("utf-8")
    except UnicodeDecodeError:
        return None
    pairs = _day_keys_re(day_text).findall(blob)
    return pairs if len(pairs) == len(raw_keys) else None


def are_plain_quantities(raw_values: list) -> bool:
    """Whether every value is what :func:`parse_quantity`'s fast path accepts (ASCII digits, < 19)."""
    if not raw_values or None in raw_values:
        return False
    try:
        digits = b"".join(raw_values)
    except TypeError:  # str values (a client decoding responses): the per-key path handles them
        return False
    lengths = set(map(len, raw_values))
    return min(lengths) > 0 and max(lengths) < 19 and digits.isdigit()


@functools.lru_cache(maxsize=64)
def _key_date(text: str) -> dt.date:
    """A key's date; cached, since one day's keys all carry the same few strings."""
    try:
        return parse_date(text, field="date")
    except ValueError as err:
        raise BadKeyError(str(err)) from None


def parse_quantity(raw_value: bytes | str) -> int:
    """Validate a counter value: a non-negative integer that fits PostgreSQL's bigint.

    Only plain ASCII digits are accepted, as ``INCRBY`` writes them; anything else
    (signs, spaces, decimals, text) is bad data, never coerced.
    """
    if type(raw_value) is bytes and raw_value.isdigit() and len(raw_value) < 19:
        return int(raw_value)  # the common case, fast: ASCII digits, too short to overflow a bigint
    if isinstance(raw_value, str):
        raw_value = raw_value.encode("utf-8", "surrogateescape")
    if not isinstance(raw_value, bytes):
        raise BadKeyError(f"value has unexpected type {type(raw_value).__name__}")
    if raw_value.startswith(b"-") and _DIGITS_RE.fullmatch(raw_value[1:]):
        raise BadKeyError("value is negative")
    if not _DIGITS_RE.fullmatch(raw_value):
        raise BadKeyError("value is not a non-negative integer")
    # Check the length first so a huge digit string is never turned into an int.
    if len(raw_value.lstrip(b"0")) > len(str(BIGINT_MAX)) or int(raw_value) > BIGINT_MAX:
        raise BadKeyError("value does not fit in a PostgreSQL bigint")
    return int(raw_value)


def escape_match(text: str) -> str:
    """Escape ``text`` so a ``SCAN MATCH`` pattern matches it literally."""
    return "".join("\\" + ch if ch in _GLOB_SPECIAL else ch for ch in text)


def day_pattern(usage_date: str | dt.date, merchant_id: str | None = None) -> str:
    """The ``MATCH`` pattern for one day's keys, for every merchant or for one.

    The pattern can also match keys of merchants whose id itself contains
    ``:{date}:``; callers keep only keys whose parsed date and merchant are the
    ones asked for (see :func:`belongs_to`).
    """
    day = parse_date(usage_date).isoformat()
    if merchant_id is None:
        return f"{KEY_PREFIX}*:{day}:*"
    check_merchant_id(merchant_id)
    return f"{KEY_PREFIX}{escape_match(merchant_id)}:{day}:*"


def day_and_hours_pattern(usage_date: str | dt.date) -> str:
    """The ``MATCH`` pattern for one whole day's daily counters *and* hourly hashes, in one pass.

    It also matches other keys that begin with ``usage`` (``usage_x:...:{date}:...``);
    callers keep only those with :data:`KEY_PREFIX` or :data:`HOURLY_PREFIX`.
    """
    return f"usage*:{parse_date(usage_date).isoformat()}:*"


def hours_pattern(usage_date: str | dt.date, merchant_id: str | None = None) -> str:
    """The ``MATCH`` pattern for one day's hourly hashes, for every merchant or for one."""
    return HOURLY_PREFIX + day_pattern(usage_date, merchant_id)[len(KEY_PREFIX) :]


def daily_key_of_hours(raw_hourly_key: bytes) -> bytes:
    """The daily counter beside an hourly hash: its name with :data:`KEY_PREFIX` for :data:`HOURLY_PREFIX`."""
    return KEY_PREFIX.encode() + raw_hourly_key[len(HOURLY_PREFIX) :]


def belongs_to(key: UsageKey, usage_date: dt.date, merchant_id: str | None) -> bool:
    """Whether a parsed key is one of the day (and merchant) being aggregated."""
    return key.usage_date == usage_date and (merchant_id is None or key.merchant_id == merchant_id)


def bad_key_belongs_to(raw_key: bytes, day_text: str, merchant_id: str | None) -> bool:
    """Whether a key that does not parse is one the run should report: any on a whole day's
    run; on one merchant's run only ``usage:{merchant}:{day}:`` followed by no other ``:``
    (a metric type has none). Any other key the merchant's pattern meets is another
    merchant's, whose id begins with this one's and the date (``acme:2025-11-01:x``): the
    day's whole runs report it, and one merchant's rerun neither records nor fails on it."""
    if merchant_id is None:
        return True
    prefix = f"{KEY_PREFIX}{merchant_id}:{day_text}:".encode()
    return raw_key.startswith(prefix) and b":" not in raw_key[len(prefix) :]


def as_bytes(value: bytes | str | int) -> bytes:
    """What redis-py returned (bytes, or str/int from a client decoding responses) as bytes;
    text that is not UTF-8 round-trips through ``surrogateescape``."""
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")
