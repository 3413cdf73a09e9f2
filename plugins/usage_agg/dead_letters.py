"""Dead letters: the keys that could not be aggregated, one row per raw Redis key.

A dead letter is keyed by the SHA-256 of the key's raw bytes, so an invalid-UTF-8 key
and a valid key that merely reads the same once escaped are two letters, and a key of
any length has one. A bad field of an hourly hash has a letter of its own (``raw_key``
the hash's key, ``hash_field`` the field; its digest covers both, apart from any key's).
Its states:

=========  ==========================================  =====================================
state      columns                                     next
=========  ==========================================  =====================================
open       ``resolved_at IS NULL``                      *fixed* when the key aggregates cleanly;
                                                       *dismissed* by an operator (SQL)
fixed      ``resolution = 'fixed'``                    *reopened* (open, counted new) when bad again
dismissed  ``resolution = 'dismissed'``                stays while its value is unchanged;
                                                       *reopened* (open, new) when it changes
=========  ==========================================  =====================================

A run that reads a key both clean and bad (SCAN returned it twice, and it changed between
the reads) leaves its letter open; the next run that reads it clean marks it fixed.

A letter is *new* (the run fails and alerts, once) when it was never seen, when its
value or reason changed, or when it is bad again after being fixed. A letter marked fixed
in this very transaction was open until then: its key was staged clean (:func:`resolve_fixed`)
and then refused by the merge (a total past the bigint), so it is known, not new.
"""

from __future__ import annotations

import datetime as dt
import hashlib

#: How much of a bad key is stored (its digest covers it all).
KEY_PREVIEW = 4096


def identity(raw_key: bytes, field: bytes | None = None) -> bytes:
    """The digest a dead letter is keyed by: the raw key's, or for a hash field, of both (length-prefixed)."""
    if field is None:
        return hashlib.sha256(raw_key).digest()
    return hashlib.sha256(b"field\x00" + len(raw_key).to_bytes(8, "big") + raw_key + field).digest()


def key_text(raw_key: bytes) -> str:
    """A key as text for people: invalid UTF-8 backslash-escaped, NUL shown as ``\\x00``."""
    text = raw_key[:KEY_PREVIEW].decode("utf-8", "backslashreplace")
    if len(raw_key) > KEY_PREVIEW:
        text += f"... ({len(raw_key)} bytes)"
    return pg_text(text)


def pg_text(text: str) -> str:
    """PostgreSQL text cannot hold NUL; show it escaped, as the rest of a bad value is."""
    return text.replace("\x00", "\\x00")


def record(cur, errors_table: str, usage_date: dt.date, bad_keys) -> int:
    """Upsert the dead letters of ``bad_keys``; return how many are new."""
    if not bad_keys:
        return 0
    unique = {identity(bad.raw_key, bad.field): bad for bad in bad_keys}
    values = [
        None if b.raw_value is None else pg_text(b.raw_value.decode("utf-8", "backslashreplace"))
        for b in unique.values()
    ]
    cur.execute(
        f"""
        WITH incoming AS (
            SELECT d AS key_sha256, k AS raw_key, f AS hash_field, t AS redis_key, v AS raw_value, r AS reason
            FROM unnest(%(digests)s::bytea[], %(keys)s::bytea[], %(fields)s::bytea[], %(texts)s::text[],
                        %(values)s::text[], %(reasons)s::text[]) AS u(d, k, f, t, v, r)
        ),
        previous AS (
            SELECT e.key_sha256, e.raw_value, e.reason, e.resolution, e.resolved_at
            FROM {errors_table} e JOIN incoming i USING (key_sha256)
        ),
        upserted AS (
            INSERT INTO {errors_table} AS e (key_sha256, raw_key, hash_field, redis_key, usage_date, raw_value, reason)
            SELECT key_sha256, raw_key, hash_field, redis_key, %(day)s, raw_value, reason FROM incoming
            ON CONFLICT (key_sha256) DO UPDATE SET
                raw_value = EXCLUDED.raw_value,
                reason = EXCLUDED.reason,
                usage_date = EXCLUDED.usage_date,
                last_seen = now(),
                times_seen = e.times_seen + 1,
                resolved_at = CASE WHEN e.resolution = 'dismissed'
                                    AND e.raw_value IS NOT DISTINCT FROM EXCLUDED.raw_value
                                   THEN e.resolved_at END,
                resolution = CASE WHEN e.resolution = 'dismissed'
                                   AND e.raw_value IS NOT DISTINCT FROM EXCLUDED.raw_value
                                  THEN e.resolution END
            RETURNING 1
        )
        SELECT count(*) FROM incoming i LEFT JOIN previous p USING (key_sha256)
        WHERE p.key_sha256 IS NULL
           OR p.raw_value IS DISTINCT FROM i.raw_value
           OR p.reason <> i.reason
           OR p.resolution IS NOT NULL AND p.resolution <> 'dismissed' AND p.resolved_at <> now()
        """,
        {
            "digests": list(unique),
            "keys": [bad.raw_key[:KEY_PREVIEW] for bad in unique.values()],
            "fields": [None if bad.field is None else bad.field[:KEY_PREVIEW] for bad in unique.values()],
            "texts": [_letter_text(bad) for bad in unique.values()],
            "values": values,
            "reasons": [bad.reason for bad in unique.values()],
            "day": usage_date,
        },
    )
    return int(cur.fetchone()[0])


def _letter_text(bad) -> str:
    text = key_text(bad.raw_key)
    return text if bad.field is None else f"{text} field {key_text(bad.field)}"


def resolve_fixed(cur, errors_table: str, usage_date: dt.date, staged_table: str, hourly: bool) -> None:
    """Mark the open letters of this date fixed whose key (or hour field) is among the staged, clean counters.

    A letter seen bad in this very transaction stays open: SCAN returned its key twice and
    it changed between the reads, and the transaction cannot tell which read came last. A
    run that reads it clean only fixes it; marking it fixed here could show a bad key as
    fixed and alert on it as new at the next run.

    ``hourly``: the stage holds hours (``merchant_id, metric_type, hour``): a letter of the
    hourly hash itself, or of that field of it, is fixed.
    """
    cur.execute(
        f"SELECT EXISTS (SELECT 1 FROM {errors_table} WHERE resolved_at IS NULL AND usage_date = %s)", (usage_date,)
    )
    if not cur.fetchone()[0]:
        return
    if not hourly:
        digests = f"""SELECT sha256(convert_to('usage:' || merchant_id || ':' || %(day_text)s || ':' || metric_type,
                                               'UTF8')) AS key_sha256
                      FROM {staged_table}"""
    else:
        key = "convert_to('usage-hourly:' || merchant_id || ':' || %(day_text)s || ':' || metric_type, 'UTF8')"
        digests = f"""SELECT sha256(k) AS key_sha256 FROM (SELECT DISTINCT {key} AS k FROM {staged_table}) keys
                      UNION ALL
                      SELECT sha256('\\x6669656c6400'::bytea || int8send(octet_length(k)::bigint) || k
                                    || convert_to(lpad(hour::text, 2, '0'), 'UTF8'))
                      FROM (SELECT {key} AS k, hour FROM {staged_table}) fields"""
    cur.execute(
        f"""
        UPDATE {errors_table} e SET resolved_at = now(), resolution = 'fixed'
        FROM ({digests}) c
        WHERE e.resolved_at IS NULL AND e.usage_date = %(day)s AND e.key_sha256 = c.key_sha256
          AND e.last_seen <> now()
        """,
        {"day": usage_date, "day_text": usage_date.isoformat()},
    )
