-- usage-agg schema. Idempotent: applied under an advisory lock whenever the usage table's
-- comment does not name the current schema version (see sink.SCHEMA_VERSION), so every
-- later change is written here as an idempotent statement (ADD COLUMN IF NOT EXISTS, ...).
-- {usage_table}, {errors_table}, {runs_table} and the index names are validated, quoted identifiers.

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

-- Dead letters: keys that could not be aggregated, one row per Redis key.
CREATE TABLE IF NOT EXISTS {errors_table} (
    redis_key   text        PRIMARY KEY,
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

COMMENT ON TABLE {usage_table} IS {version_comment};
