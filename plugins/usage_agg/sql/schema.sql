-- usage-agg schema. Idempotent: applied under an advisory lock whenever the usage table's
-- comment does not name the current schema version (see schema.SCHEMA_VERSION), so every
-- later change is written here as an idempotent statement (ADD COLUMN IF NOT EXISTS, ...).
-- {usage_table}, {errors_table}, {runs_table}, {incarnations_table} and the index names are
-- validated, quoted identifiers.

-- Daily totals, the source of truth for billing and analytics.
CREATE TABLE IF NOT EXISTS {usage_table} (
    merchant_id text        NOT NULL,
    usage_date  date        NOT NULL,
    metric_type text        NOT NULL,
    quantity    bigint      NOT NULL CHECK (quantity >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, usage_date, metric_type)
);
CREATE INDEX IF NOT EXISTS {usage_date_index} ON {usage_table} (usage_date);

-- Dead letters: keys that could not be aggregated, one row per Redis key (its raw bytes;
-- redis_key shows them as text, invalid UTF-8 backslash-escaped).
CREATE TABLE IF NOT EXISTS {errors_table} (
    key_sha256  bytea       PRIMARY KEY,
    raw_key     bytea       NOT NULL,
    redis_key   text        NOT NULL,
    usage_date  date        NOT NULL,
    raw_value   text,
    reason      text        NOT NULL,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    times_seen  bigint      NOT NULL DEFAULT 1,
    resolved_at timestamptz,
    resolution  text
);
CREATE INDEX IF NOT EXISTS {errors_open_index} ON {errors_table} (usage_date) WHERE resolved_at IS NULL;

-- Audit: one row per date per run, written in the same transaction as the data.
CREATE TABLE IF NOT EXISTS {runs_table} (
    id                bigserial   PRIMARY KEY,
    dag_id            text,
    run_id            text,
    task_id           text,
    usage_table       text        NOT NULL,
    usage_date        date        NOT NULL,
    merchant_id       text,
    keys_found        bigint      NOT NULL,
    rows_written      bigint      NOT NULL,
    rows_unchanged    bigint      NOT NULL,
    decreases_refused bigint      NOT NULL,
    bad_keys          bigint      NOT NULL,
    new_bad_keys      bigint      NOT NULL,
    started_at        timestamptz NOT NULL,
    finished_at       timestamptz NOT NULL DEFAULT now(),
    outcome           text        NOT NULL
);
CREATE INDEX IF NOT EXISTS {runs_date_index} ON {runs_table} (usage_date, finished_at);
-- version 2: the error of a failed run
ALTER TABLE {runs_table} ADD COLUMN IF NOT EXISTS error text;
-- version 3: runs fanned out over Redis primaries write one row per part
ALTER TABLE {runs_table} ADD COLUMN IF NOT EXISTS redis_partition text;
ALTER TABLE {runs_table} ADD COLUMN IF NOT EXISTS partition_count integer;

-- version 4: counters with resets. A row holds quantity = redis_offset + the Redis value
-- last read, read from the Redis incarnation redis_incarnation; a counter that falls
-- (a reset) moves into the offset instead of lowering the quantity.
ALTER TABLE {usage_table} ADD COLUMN IF NOT EXISTS redis_offset bigint NOT NULL DEFAULT 0;
ALTER TABLE {usage_table} ADD COLUMN IF NOT EXISTS redis_incarnation integer;
CREATE TABLE IF NOT EXISTS {incarnations_table} (
    id            serial      PRIMARY KEY,
    run_id        text        NOT NULL UNIQUE,
    address       text        NOT NULL,
    started_at    timestamptz NOT NULL,
    started_empty boolean     NOT NULL,
    first_seen    timestamptz NOT NULL,
    last_seen     timestamptz NOT NULL
);
-- version 4: resets in the audit; finished_at is when the run finished, not when it began
ALTER TABLE {runs_table} ADD COLUMN IF NOT EXISTS resets bigint NOT NULL DEFAULT 0;
ALTER TABLE {runs_table} ALTER COLUMN finished_at SET DEFAULT clock_timestamp();
-- version 4: dead letters keyed by the raw key, not by its text (two keys can share a text)
ALTER TABLE {errors_table} ADD COLUMN IF NOT EXISTS raw_key bytea;
ALTER TABLE {errors_table} ADD COLUMN IF NOT EXISTS key_sha256 bytea;
UPDATE {errors_table} SET raw_key = convert_to(redis_key, 'UTF8') WHERE raw_key IS NULL;
UPDATE {errors_table} SET key_sha256 = sha256(raw_key) WHERE key_sha256 IS NULL;
ALTER TABLE {errors_table} ALTER COLUMN raw_key SET NOT NULL, ALTER COLUMN key_sha256 SET NOT NULL;
DO $$
DECLARE
    pk name;
    pk_columns name[];
BEGIN
    SELECT c.conname, array(SELECT a.attname FROM pg_attribute a WHERE a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey))
      INTO pk, pk_columns
      FROM pg_constraint c WHERE c.conrelid = '{errors_table}'::regclass AND c.contype = 'p';
    IF pk_columns IS DISTINCT FROM ARRAY['key_sha256']::name[] THEN
        IF pk IS NOT NULL THEN
            EXECUTE format('ALTER TABLE {errors_table} DROP CONSTRAINT %I', pk);
        END IF;
        ALTER TABLE {errors_table} ADD PRIMARY KEY (key_sha256);
    END IF;
END
$$;

-- version 5: hourly rows, from the hourly hashes beside the daily counters (same rules as
-- the daily rows: absolute values, resets kept in redis_offset, never zeroed on expiry)
CREATE TABLE IF NOT EXISTS {hourly_table} (
    merchant_id       text        NOT NULL,
    usage_hour        timestamptz NOT NULL,
    metric_type       text        NOT NULL,
    quantity          bigint      NOT NULL CHECK (quantity >= 0),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    redis_offset      bigint      NOT NULL DEFAULT 0,
    redis_incarnation integer,
    PRIMARY KEY (merchant_id, usage_hour, metric_type)
);
CREATE INDEX IF NOT EXISTS {hourly_index} ON {hourly_table} (usage_hour);
ALTER TABLE {errors_table} ADD COLUMN IF NOT EXISTS hash_field bytea;
ALTER TABLE {runs_table} ADD COLUMN IF NOT EXISTS hourly_rows_written bigint NOT NULL DEFAULT 0;
ALTER TABLE {runs_table} ADD COLUMN IF NOT EXISTS hourly_mismatches bigint NOT NULL DEFAULT 0;
-- version 6: bad hourly hashes and fields a run met (known and new), so a date's incomplete hours show
ALTER TABLE {runs_table} ADD COLUMN IF NOT EXISTS bad_hourly bigint NOT NULL DEFAULT 0;

-- version 6: windows that are right in every zone, and sums that cannot overflow.
-- The views and the function below replace those of versions 1 and 5; their quantity is
-- now numeric (a sum of bigints can pass the bigint, and one merchant counting bytes must
-- not make the view fail for every other merchant), and CREATE OR REPLACE cannot change
-- a column's type, so each is dropped first (a view or function of yours built on them
-- must be dropped before the upgrade and created again after it).
--
-- Other windows over the daily rows, so analytics needs no second job.
-- ISO weeks start on Monday; iso_week reads like 2025-W01 (a week can straddle a year).
DROP VIEW IF EXISTS {weekly_view};
CREATE VIEW {weekly_view} AS
SELECT merchant_id,
       metric_type,
       date_trunc('week', usage_date)::date                          AS week_start,
       to_char(usage_date, 'IYYY-"W"IW')                             AS iso_week,
       sum(quantity)                                                 AS quantity,
       count(*)                                                      AS days_with_usage,
       max(updated_at)                                               AS updated_at
FROM {usage_table}
GROUP BY merchant_id, metric_type, date_trunc('week', usage_date), to_char(usage_date, 'IYYY-"W"IW');

DROP VIEW IF EXISTS {monthly_view};
CREATE VIEW {monthly_view} AS
SELECT merchant_id,
       metric_type,
       date_trunc('month', usage_date)::date                         AS month_start,
       to_char(usage_date, 'YYYY-MM')                                AS month,
       sum(quantity)                                                 AS quantity,
       count(*)                                                      AS days_with_usage,
       max(updated_at)                                               AS updated_at
FROM {usage_table}
GROUP BY merchant_id, metric_type, date_trunc('month', usage_date), to_char(usage_date, 'YYYY-MM');

-- Any window over the hourly rows, in any IANA time zone: hour, day, week (ISO, from
-- Monday) or month, as the zone's clocks show them (DST included: a local day can last
-- 23 or 25 hours). An hour window is one stored (UTC) hour; a longer window holds every
-- hour that starts in it (in a zone whose offset is not a whole hour, an hour straddling
-- local midnight counts in the day it starts in). merchant, when given, is filtered on
-- before anything is summed.
--
-- Where a window starts. A longer window is a local period (date_trunc of the local
-- time); it starts at the FIRST instant whose local time is the period's first local
-- time L (for a day, local midnight):
--   * L happens once: that instant;
--   * L happens twice (clocks go back across it, e.g. Havana 01:00 -> 00:00): the first
--     of the two. `L AT TIME ZONE tz` alone takes the later one (and so does PostgreSQL's
--     date_trunc(field, timestamptz, zone)), which put the first hour of the day in the
--     day before and the window start after hours it holds;
--   * L does not happen (clocks go forward across it, e.g. Santiago 00:00 -> 01:00):
--     `L AT TIME ZONE tz`, which reads L with the offset in force before the change,
--     i.e. the instant of the change: the period's first instant.
-- Every instant at which local time is L is L minus the offset in force at it; the
-- offsets in force in the 26 hours up to `L AT TIME ZONE tz` (probed hourly) give the
-- candidates, and those whose local time really is L are the occurrences of L (an offset
-- in force for less than an hour could escape the probes). This expression is written three times below (the boundary check,
-- a window's start, its end); keep them equal.
-- The range must be on window boundaries (a cut window would be a wrong total that
-- looks right), and non-empty: anything else is refused with SQLSTATE 22023.
DROP FUNCTION IF EXISTS {windows_function}(timestamptz, timestamptz, text, text);
DROP FUNCTION IF EXISTS {windows_function}(timestamptz, timestamptz, text, text, text);
CREATE FUNCTION {windows_function}(window_from timestamptz, window_to timestamptz, grain text,
                                   tz text DEFAULT 'UTC', merchant text DEFAULT NULL)
RETURNS TABLE (merchant_id text, metric_type text, window_start timestamptz, window_end timestamptz,
               quantity numeric)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    off_boundary text;
BEGIN
    IF grain IS NULL OR grain NOT IN ('hour', 'day', 'week', 'month') THEN
        RAISE EXCEPTION 'grain: must be hour, day, week or month, got %', coalesce(grain, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF tz IS NULL OR NOT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = tz) THEN
        RAISE EXCEPTION 'tz: % is not a time zone PostgreSQL knows (an IANA name such as Europe/Berlin)',
            coalesce(tz, 'NULL') USING ERRCODE = '22023';
    END IF;
    IF window_from IS NULL OR window_to IS NULL THEN
        RAISE EXCEPTION 'range: from and to must both be given, got from % and to %',
            coalesce(window_from::text, 'NULL'), coalesce(window_to::text, 'NULL') USING ERRCODE = '22023';
    END IF;
    IF window_to <= window_from THEN
        RAISE EXCEPTION 'range: to (%) must be after from (%)', window_to, window_from USING ERRCODE = '22023';
    END IF;
    SELECT string_agg(format('%s %s (the %s window holding it starts at %s)', v.name, v.x, grain, b.first), ' and ')
      INTO off_boundary
      FROM (VALUES ('from', window_from), ('to', window_to)) AS v (name, x)
      CROSS JOIN LATERAL (
          SELECT CASE WHEN grain = 'hour' THEN date_trunc('hour', v.x AT TIME ZONE 'UTC') ELSE date_trunc(grain, v.x AT TIME ZONE tz) END
      ) AS l (local_start)
      CROSS JOIN LATERAL (
          SELECT CASE WHEN grain = 'hour' THEN l.local_start AT TIME ZONE 'UTC' ELSE (
              SELECT coalesce(min(c.at) FILTER (WHERE c.at AT TIME ZONE tz = l.local_start), l.local_start AT TIME ZONE tz)
              FROM generate_series((l.local_start AT TIME ZONE tz) - interval '26 hours', l.local_start AT TIME ZONE tz,
                                   interval '1 hour') AS probe
              CROSS JOIN LATERAL (
                  SELECT (l.local_start - ((probe AT TIME ZONE tz) - (probe AT TIME ZONE 'UTC'))) AT TIME ZONE 'UTC'
              ) AS c (at)
          ) END
      ) AS b (first)
     WHERE b.first <> v.x;
    IF off_boundary IS NOT NULL THEN
        RAISE EXCEPTION 'range: not on % window boundaries of %: %', grain, tz, off_boundary USING ERRCODE = '22023';
    END IF;
    IF grain = 'hour' THEN  -- an hour window is one stored (UTC) hour
        RETURN QUERY
        SELECT h.merchant_id, h.metric_type, h.usage_hour, h.usage_hour + interval '1 hour', sum(h.quantity)
        FROM {hourly_table} h
        WHERE h.usage_hour >= window_from AND h.usage_hour < window_to
          AND (merchant IS NULL OR h.merchant_id = merchant)
        GROUP BY 1, 2, 3
        ORDER BY 3, 1, 2;
        RETURN;
    END IF;
    RETURN QUERY
    WITH sums AS (
        SELECT h.merchant_id, h.metric_type, date_trunc(grain, h.usage_hour AT TIME ZONE tz) AS local_start,
               sum(h.quantity) AS quantity
        FROM {hourly_table} h
        WHERE h.usage_hour >= window_from AND h.usage_hour < window_to
          AND (merchant IS NULL OR h.merchant_id = merchant)
        GROUP BY 1, 2, 3
    ), bounds AS (  -- the first instant of each local period held, and of the next one
        SELECT p.local_start, b.first AS start, b2.first AS stop
        FROM (SELECT DISTINCT s.local_start FROM sums s) AS p
        CROSS JOIN LATERAL (
            SELECT (
                SELECT coalesce(min(c.at) FILTER (WHERE c.at AT TIME ZONE tz = l.local_start), l.local_start AT TIME ZONE tz)
                FROM generate_series((l.local_start AT TIME ZONE tz) - interval '26 hours', l.local_start AT TIME ZONE tz,
                                     interval '1 hour') AS probe
                CROSS JOIN LATERAL (
                    SELECT (l.local_start - ((probe AT TIME ZONE tz) - (probe AT TIME ZONE 'UTC'))) AT TIME ZONE 'UTC'
                ) AS c (at)
            )
            FROM (VALUES (p.local_start)) AS l (local_start)
        ) AS b (first)
        CROSS JOIN LATERAL (
            SELECT (
                SELECT coalesce(min(c.at) FILTER (WHERE c.at AT TIME ZONE tz = l.local_start), l.local_start AT TIME ZONE tz)
                FROM generate_series((l.local_start AT TIME ZONE tz) - interval '26 hours', l.local_start AT TIME ZONE tz,
                                     interval '1 hour') AS probe
                CROSS JOIN LATERAL (
                    SELECT (l.local_start - ((probe AT TIME ZONE tz) - (probe AT TIME ZONE 'UTC'))) AT TIME ZONE 'UTC'
                ) AS c (at)
            )
            FROM (VALUES (p.local_start + ('1 ' || grain)::interval)) AS l (local_start)
        ) AS b2 (first)
    )
    SELECT s.merchant_id, s.metric_type, b.start, b.stop, s.quantity
    FROM sums s JOIN bounds b USING (local_start)
    ORDER BY 3, 1, 2;
END
$$;

COMMENT ON TABLE {usage_table} IS {version_comment};
