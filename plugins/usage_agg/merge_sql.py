"""The merge statements: staged Redis values into stored rows, by the reset rules of :mod:`usage_agg.write_routes`.

One builder serves the daily rows (``merchant_usage``, keyed by date) and the hourly
rows (``merchant_usage_hourly``, keyed by UTC hour): the rules are written once. Table
names come in validated and quoted; every value is a query parameter:
``%(day)s``, ``%(allow)s``, ``%(source)s``, ``%(fresh)s``, ``%(limit)s``.
"""

from __future__ import annotations

from dataclasses import dataclass

from usage_agg.keys import BIGINT_MAX


@dataclass(frozen=True)
class RowShape:
    """How staged rows meet stored ones: the key columns, and how a staged row names its key."""

    #: the target's key columns, as in its primary key
    key_columns: str
    #: SQL (over stage ``s``) giving the stored row's time key, named as in the target
    time_key: str
    #: the time key's column in the target
    time_column: str
    #: SQL (over target ``t``) keeping the stored rows of the day ``%(day)s``
    day_filter: str
    #: the staged columns, for COPY
    stage_columns: str
    #: a day's first rows, COPYed straight into the target: its columns, and one line of
    #: COPY text for a staged row (``%``-formatted with it; ``{day}`` is the date)
    direct_columns: str = ""
    direct_line: bytes = b""
    #: name each reset sample's time key (the hour; a day's samples are all of that day)
    samples_name_time: bool = False


DAILY = RowShape(
    key_columns="merchant_id, usage_date, metric_type",
    time_key="%(day)s::date",
    time_column="usage_date",
    day_filter="t.usage_date = %(day)s::date",
    stage_columns="merchant_id text NOT NULL, metric_type text NOT NULL, quantity bigint NOT NULL",
    direct_columns="merchant_id, metric_type, quantity, usage_date, redis_offset",
    direct_line=b"%b\t%b\t%b\t{day}\t0",
)
HOURLY = RowShape(
    key_columns="merchant_id, usage_hour, metric_type",
    time_key="(%(day)s::date + s.hour * interval '1 hour') AT TIME ZONE 'UTC'",
    time_column="usage_hour",
    day_filter=(
        "t.usage_hour >= %(day)s::date::timestamp AT TIME ZONE 'UTC'"
        " AND t.usage_hour < (%(day)s::date + 1)::timestamp AT TIME ZONE 'UTC'"
    ),
    stage_columns=(
        "merchant_id text NOT NULL, metric_type text NOT NULL, hour smallint NOT NULL, quantity bigint NOT NULL"
    ),
    direct_columns="merchant_id, metric_type, usage_hour, quantity, redis_offset",
    direct_line=b"%b\t%b\t{day} %02d:00:00+00\t%d\t0",
    samples_name_time=True,
)


def next_offset(quantity: str, offset: str, source: str, redis: str) -> str:
    """SQL: the offset a stored row takes for a new Redis value (the table in ``usage_agg.write_routes``).

    The *rebase* arm: a row holding an offset (it was reset or dropped before) read from
    another life of Redis that did not start empty. That life's values may predate the
    reset (a snapshot restored after it, a replica that missed it) and then hold counts
    the offset holds already; growth over the last read is not proof of new usage. The row
    takes the larger of its total and the value, which counts nothing twice."""
    return f"""(CASE WHEN %(allow)s THEN 0
                     WHEN {source} = ANY(%(fresh)s::integer[]) THEN {quantity}
                     WHEN {redis} < {quantity} - {offset} THEN {quantity} - {redis}
                     WHEN {changed_life(offset, source)} THEN GREATEST({quantity} - {redis}, 0)
                     ELSE {offset} END)"""


def changed_life(offset: str, source: str) -> str:
    """SQL: a row holding an offset, last read from another Redis life than the one read now
    (``%(source)s``): it must take the new life even where its value is the same, or growth
    later in this life would still be taken for a value of the old one."""
    return f"({offset} <> 0 AND {source} IS DISTINCT FROM %(source)s::integer)"


def must_take_life(offset: str, source: str) -> str:
    """SQL: a row that must be written to take the life read now even where its quantity and
    offset stay: :func:`changed_life`, or an ``allow_decrease`` read from another life. The latter
    row holds that life's value now; left on the old life, a plain run after it would take the old
    life for one Redis started empty after and add the value again (``counter_model``)."""
    return f"({changed_life(offset, source)} OR (%(allow)s AND {source} IS DISTINCT FROM %(source)s::integer))"


def _on_conflict(shape: RowShape) -> str:
    """A writer without the day's lock (or a key staged in two chunks) meets a row that is
    already there: the same rules, applied to that row as it stands."""
    redis = "(EXCLUDED.quantity - EXCLUDED.redis_offset)"
    offset = next_offset("t.quantity", "t.redis_offset", "t.redis_incarnation", redis)
    return f"""
    ON CONFLICT ({shape.key_columns}) DO UPDATE
       SET quantity = {offset} + {redis},
           redis_offset = {offset},
           redis_incarnation = EXCLUDED.redis_incarnation,
           updated_at = now()
     WHERE {offset}::numeric + {redis} <= {BIGINT_MAX}
       AND ({offset} + {redis} <> t.quantity OR {offset} <> t.redis_offset
            OR {must_take_life("t.redis_offset", "t.redis_incarnation")})"""


def compare_merge(target: str, stage: str, shape: RowShape, *, day_scan: bool = False) -> str:
    """One join of the staged rows with their stored rows classifies every counter; only
    rows that change reach the INSERT, so an unchanged day writes nothing at all.

    A row whose Redis value is the one last read, with no reset rule in play, is plainly
    unchanged and leaves the join at once; only the others go through the rules. The
    stage holds each counter once (the caller merges a counter read twice in rounds).

    How a staged row finds its stored row:

    - by default, a lookup by the primary key (``OFFSET 0`` keeps it a nested loop): the
      statement costs the stage's size, whatever the day's;
    - ``day_scan``: one hash join with the day's stored rows, read once in their physical
      order (the caller disables nested loops for the statement). For a stage of about
      the day's size, this is several times cheaper than a lookup per row, each of which
      visits random index and heap pages.

    Returns one row: written, unchanged, values below the last read, resets, reset
    samples (JSON) and the rows whose total would pass the bigint (JSON arrays of
    merchant, metric, offset, Redis value, time key).
    """
    sample_time = f" time_key AS {shape.time_column}," if shape.samples_name_time else ""
    match = f"""t.merchant_id = s.merchant_id AND t.{shape.time_column} = {shape.time_key}
                  AND t.metric_type = s.metric_type"""
    if day_scan:
        stored = f"LEFT JOIN {target} t ON {match} AND {shape.day_filter}"
    else:
        stored = f"""LEFT JOIN LATERAL (
            SELECT quantity, redis_offset, redis_incarnation FROM {target} t
            WHERE {match}
            OFFSET 0
        ) t ON true"""
    return f"""
    WITH compared AS MATERIALIZED (
        SELECT s.merchant_id, s.metric_type, {shape.time_key} AS time_key, s.quantity AS redis,
               t.quantity AS stored, t.redis_offset AS stored_offset, t.redis_incarnation AS stored_source
        FROM {stage} s
        {stored}
        WHERE t.quantity IS NULL OR %(allow)s OR t.redis_incarnation = ANY(%(fresh)s::integer[])
              OR s.quantity <> t.quantity - t.redis_offset OR {changed_life("t.redis_offset", "t.redis_incarnation")}
    ),
    planned AS MATERIALIZED (
        SELECT *, next_offset::numeric + redis AS next_quantity,
               stored IS NOT NULL AND next_offset::numeric + redis = stored AND next_offset = stored_offset
                   AND NOT {must_take_life("stored_offset", "stored_source")} AS unchanged
        FROM (SELECT c.*,
                     CASE WHEN stored IS NULL OR %(allow)s THEN NULL
                          WHEN stored_source = ANY(%(fresh)s::integer[]) THEN 'restart'
                          WHEN redis < stored - stored_offset THEN 'drop'
                          WHEN redis > stored - stored_offset AND {changed_life("stored_offset", "stored_source")}
                              THEN 'rebase' END AS reset,
                     CASE WHEN stored IS NULL THEN 0
                          ELSE {next_offset("stored", "stored_offset", "stored_source", "redis")} END AS next_offset
              FROM compared c) p
    ),
    written AS (
        INSERT INTO {target} AS t ({shape.key_columns}, quantity, redis_offset, redis_incarnation)
        SELECT merchant_id, time_key, metric_type, next_quantity, next_offset, %(source)s FROM planned
        WHERE NOT unchanged AND next_quantity <= {BIGINT_MAX}
        {_on_conflict(shape)}
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM written),
           (SELECT count(*) FROM {stage}) - count(*) FILTER (WHERE NOT unchanged),
           count(*) FILTER (WHERE reset IS NOT NULL AND redis < stored - stored_offset),
           count(*) FILTER (WHERE reset IS NOT NULL AND NOT unchanged),
           (SELECT json_agg(r) FROM (
                SELECT merchant_id, metric_type,{sample_time} reset, stored,
                       stored - stored_offset AS last_read, redis, next_quantity AS quantity
                FROM planned WHERE reset IS NOT NULL AND NOT unchanged
                ORDER BY merchant_id, metric_type, time_key LIMIT %(limit)s) r),
           (SELECT json_agg(json_build_array(merchant_id, metric_type, next_offset, redis, time_key))
            FROM planned WHERE next_quantity > {BIGINT_MAX})
    FROM planned
    """


def plain_insert(target: str, stage: str, shape: RowShape) -> str:
    """A day's first staged rows, inserted with no ``ON CONFLICT`` arm and no row count:
    the usual case, at about half the cost of an upsert (PostgreSQL's speculative
    insertion for ``ON CONFLICT`` and a counting CTE cost as much as the insert itself).
    A row already there (a key that SCAN returned in two chunks, a writer without the
    day's lock) fails the whole statement with a unique violation; the caller then rolls
    it back and runs :func:`compare_merge`, which applies the rules.
    Rows go in in the primary key's order (Redis hands them out in hash order), which
    saves PostgreSQL some index page visits (about 6% of the statement, measured)."""
    return f"""
    INSERT INTO {target} ({shape.key_columns}, quantity, redis_offset, redis_incarnation)
    SELECT s.merchant_id, {shape.time_key}, s.metric_type, s.quantity, 0, %(source)s FROM {stage} s
    ORDER BY 1, 2, 3
    """
