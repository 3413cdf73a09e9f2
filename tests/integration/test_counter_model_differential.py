"""The merge statements follow the counter model, row by row.

Thousands of generated (stored row, read) pairs go into a real PostgreSQL table made by
the project's own DDL (``ensure_schema``); the statement the writer runs
(``merge_sql.compare_merge``, with its ``ON CONFLICT`` arm, by lookups and by a scan of
the day, daily and hourly rows, with both drivers) merges them; each resulting row, the
reset label of each reset row and the statement's counts must be what
``usage_agg.counter_model`` says. The run contexts (``allow_decrease``, the server life
read now, the lives it started empty after) are statement parameters, so each context is
a date of its own, merged by one statement.

The pairs come from a seeded generator that favours the boundaries the rules turn on: a
value equal to the one last read or one away from it, zero, an offset of zero or of the
whole quantity, a row without a life, and totals at the bigint's edge.
"""

from __future__ import annotations

import datetime as dt
import random
import time

import pytest

from usage_agg.counter_model import Read, Row, next_state
from usage_agg.keys import BIGINT_MAX
from usage_agg.merge_sql import DAILY, HOURLY, compare_merge
from usage_agg.schema import ensure_schema

pytestmark = pytest.mark.integration

FIRST_DAY = dt.date(2025, 11, 1)
PAIRS_PER_CONTEXT = 300
LIVES = (None, 1, 2, 3, 4)
#: (server life read now, the lives it started empty after): an unknown life, the same
#: life, another life that did not start empty, lives that started empty after some
CONTEXTS = [
    (life, frozenset(predecessors), allow)
    for life, predecessors in [(None, ()), (1, ()), (2, ()), (2, (1,)), (3, (1, 2)), (4, (1, 3))]
    for allow in (False, True)
]
STAGE = "pg_temp.counter_model_stage"


def _quantity(rng: random.Random) -> int:
    return rng.choice([0, 1, rng.randint(0, 50), rng.randint(0, 10**6), BIGINT_MAX - rng.randint(0, 20)])


def _row(rng: random.Random) -> Row | None:
    if rng.random() < 0.1:
        return None
    quantity = _quantity(rng)
    offset = rng.choice([0, 0, quantity, rng.randint(0, quantity), min(quantity, 1)])
    return Row(quantity, offset, rng.choice(LIVES))


def _value(rng: random.Random, row: Row | None) -> int:
    last = row.last_read if row is not None else 0
    value = rng.choice(
        [last, last - 1, last + 1, 0, rng.randint(0, 60), last + rng.randint(0, 10**6), BIGINT_MAX - rng.randint(0, 9)]
    )
    if row is not None and rng.random() < 0.1:
        value = row.quantity + rng.choice([-1, 0, 1])
    return min(max(value, 0), BIGINT_MAX)


def generate(seed: int = 23) -> list[tuple[int, list[tuple[Row | None, int]]]]:
    """Per context (its index), the pairs: a stored row (or none) and the value read."""
    rng = random.Random(seed)
    cases = []
    for index in range(len(CONTEXTS)):
        pairs = []
        for _ in range(PAIRS_PER_CONTEXT):
            row = _row(rng)
            pairs.append((row, _value(rng, row)))
        cases.append((index, pairs))
    return cases


def _keys(shape, i: int) -> tuple:
    """The merchant (and hour) of the ``i``-th pair: hourly pairs share merchants, one an hour."""
    if shape is DAILY:
        return (f"m{i:05d}",)
    return (f"m{i // 24:05d}", i % 24)


def merge_and_compare(conn, table: str, shape, *, day_scan: bool) -> int:
    """Load, merge and compare every generated pair; return how many were checked."""
    names = ensure_schema(conn, table)
    target = names.usage.quoted if shape is DAILY else names.hourly.quoted
    time_column = shape.time_column
    cases = generate()
    checked = 0
    with conn.cursor() as cur:
        cur.execute(f"CREATE TEMPORARY TABLE {STAGE} ({shape.stage_columns})")
        if day_scan:
            cur.execute("SET LOCAL enable_nestloop = off")
        for index, pairs in cases:
            life, predecessors, allow = CONTEXTS[index]
            day = FIRST_DAY + dt.timedelta(days=index)
            stored, staged = [], []
            for i, (row, value) in enumerate(pairs):
                keys = _keys(shape, i)
                if row is not None:
                    stored.append((*keys, row.quantity, row.offset, row.life))
                staged.append((*keys, value))
            time_key = (
                "%(day)s::date"
                if shape is DAILY
                else "(%(day)s::date + %(hour)s * interval '1 hour') AT TIME ZONE 'UTC'"
            )
            for merchant, *hour, quantity, offset, row_life in stored:
                cur.execute(
                    f"""INSERT INTO {target} (merchant_id, {time_column}, metric_type, quantity, redis_offset,
                                              redis_incarnation)
                        VALUES (%(merchant)s, {time_key}, 'q', %(quantity)s, %(offset)s, %(life)s)""",
                    {
                        "merchant": merchant,
                        "day": day,
                        "hour": hour[0] if hour else 0,
                        "quantity": quantity,
                        "offset": offset,
                        "life": row_life,
                    },
                )
            cur.execute(f"TRUNCATE {STAGE}")
            for merchant, *hour, value in staged:
                columns = (
                    "merchant_id, metric_type, quantity"
                    if shape is DAILY
                    else "merchant_id, metric_type, hour, quantity"
                )
                cur.execute(
                    f"INSERT INTO {STAGE} ({columns}) VALUES ({', '.join(['%s'] * (3 + len(hour)))})",
                    (merchant, "q", *hour, value),
                )
            params = {"day": day, "allow": allow, "source": life, "fresh": sorted(predecessors), "limit": 10**6}
            cur.execute(compare_merge(target, STAGE, shape, day_scan=day_scan), params)
            written, unchanged, drops, resets, samples, overflowing = cur.fetchone()
            hour_of = "" if shape is DAILY else f", extract(hour FROM {time_column} AT TIME ZONE 'UTC')::int"
            cur.execute(
                f"""SELECT merchant_id{hour_of}, quantity, redis_offset, redis_incarnation FROM {target} t
                    WHERE {shape.day_filter}""",
                {"day": day},
            )
            after = {tuple(found[:-3]): Row(*found[-3:]) for found in cur.fetchall()}

            read_context = {"life": life, "predecessors": predecessors, "allow_decrease": allow}
            steps = {
                _keys(shape, i): next_state(row, Read(value, **read_context)) for i, (row, value) in enumerate(pairs)
            }
            rows = {keys: (row, value) for keys, (row, value) in zip(steps, pairs, strict=True)}
            wrong = {
                keys: (rows[keys], step.row, after.get(keys))
                for keys, step in steps.items()
                if after.get(keys) != step.row
            }
            assert not wrong, f"context {CONTEXTS[index]}: (stored, read) -> model, SQL: {list(wrong.items())[:5]}"
            reset_labels = {_sample_keys(shape, s): s["reset"] for s in samples or []}
            assert reset_labels == {
                keys: step.reset for keys, step in steps.items() if step.reset is not None and not step.unchanged
            }
            assert {_overflow_keys(shape, o) for o in overflowing or []} == {
                keys for keys, step in steps.items() if step.refused
            }
            assert (written, unchanged, drops, resets) == (
                sum(step.written for step in steps.values()),
                sum(step.unchanged for step in steps.values()),
                sum(step.decrease_refused for step in steps.values()),
                sum(step.reset is not None and not step.unchanged for step in steps.values()),
            )
            checked += len(pairs)
    conn.rollback()
    return checked


def _sample_keys(shape, sample: dict) -> tuple:
    if shape is DAILY:
        return (sample["merchant_id"],)
    return (sample["merchant_id"], dt.datetime.fromisoformat(str(sample["usage_hour"])).astimezone(dt.UTC).hour)


def _overflow_keys(shape, overflowing: list) -> tuple:
    merchant, _metric, _offset, _redis, time_key = overflowing
    if shape is DAILY:
        return (merchant,)
    return (merchant, dt.datetime.fromisoformat(str(time_key)).astimezone(dt.UTC).hour)


@pytest.mark.parametrize("shape", [DAILY, HOURLY], ids=["daily", "hourly"])
@pytest.mark.parametrize("day_scan", [False, True], ids=["lookup", "day-scan"])
def test_the_merge_statement_gives_every_row_what_the_model_says(pg_conn, table, shape, day_scan):
    started = time.monotonic()
    checked = merge_and_compare(pg_conn, table, shape, day_scan=day_scan)
    assert checked == len(CONTEXTS) * PAIRS_PER_CONTEXT
    assert time.monotonic() - started < 30
