-- usage-agg schema. Idempotent: applied under an advisory lock whenever the usage table's
-- comment does not name the current schema version (see sink.SCHEMA_VERSION), so every
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

-- Other windows over the daily rows, so analytics needs no second job.
-- ISO weeks start on Monday; iso_week reads like 2025-W01 (a week can straddle a year).
CREATE OR REPLACE VIEW {weekly_view} AS
SELECT merchant_id,
       metric_type,
       date_trunc('week', usage_date)::date                          AS week_start,
       to_char(usage_date, 'IYYY-"W"IW')                             AS iso_week,
       sum(quantity)::bigint                                         AS quantity,
       count(*)                                                      AS days_with_usage,
       max(updated_at)                                               AS updated_at
FROM {usage_table}
GROUP BY merchant_id, metric_type, date_trunc('week', usage_date), to_char(usage_date, 'IYYY-"W"IW');

CREATE OR REPLACE VIEW {monthly_view} AS
SELECT merchant_id,
       metric_type,
       date_trunc('month', usage_date)::date                         AS month_start,
       to_char(usage_date, 'YYYY-MM')                                AS month,
       sum(quantity)::bigint                                         AS quantity,
       count(*)                                                      AS days_with_usage,
       max(updated_at)                                               AS updated_at
FROM {usage_table}
GROUP BY merchant_id, metric_type, date_trunc('month', usage_date), to_char(usage_date, 'YYYY-MM');

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

-- Any window over the hourly rows, in any IANA time zone: hour, day, week (ISO, from
-- Monday) or month, as the zone's clocks show them (DST included: a local day can last
-- 23 or 25 hours). An hour window is one stored (UTC) hour; a longer window holds every
-- hour that starts in it (in a zone whose offset is not a whole hour, an hour straddling
-- local midnight counts in the day it starts in).
CREATE OR REPLACE FUNCTION {windows_function}(window_from timestamptz, window_to timestamptz, grain text,
                                              tz text DEFAULT 'UTC')
RETURNS TABLE (merchant_id text, metric_type text, window_start timestamptz, window_end timestamptz,
               quantity bigint)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
BEGIN
    IF grain IS NULL OR grain NOT IN ('hour', 'day', 'week', 'month') THEN
        RAISE EXCEPTION 'grain: must be hour, day, week or month, got %', coalesce(grain, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF tz IS NULL OR NOT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = tz) THEN
        RAISE EXCEPTION 'tz: % is not a time zone PostgreSQL knows (an IANA name such as Europe/Berlin)',
            coalesce(tz, 'NULL') USING ERRCODE = '22023';
    END IF;
    RETURN QUERY
    SELECT h.merchant_id, h.metric_type, w.start, w.stop, sum(h.quantity)::bigint
    FROM {hourly_table} h
    CROSS JOIN LATERAL (
        SELECT CASE WHEN grain = 'hour' THEN h.usage_hour
                    ELSE date_trunc(grain, h.usage_hour AT TIME ZONE tz) AT TIME ZONE tz END AS start,
               CASE WHEN grain = 'hour' THEN h.usage_hour + interval '1 hour'
                    ELSE (date_trunc(grain, h.usage_hour AT TIME ZONE tz) + ('1 ' || grain)::interval) AT TIME ZONE tz
               END AS stop
    ) w
    WHERE h.usage_hour >= window_from AND h.usage_hour < window_to
    GROUP BY h.merchant_id, h.metric_type, w.start, w.stop
    ORDER BY 3, 1, 2;
END
$$;

COMMENT ON TABLE {usage_table} IS {version_comment};
