"""Property-based checks against the real services: pattern escaping and rerun idempotency."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usage_agg.aggregate import aggregate_day
from usage_agg.keys import build_key, day_pattern, parse_key
from usage_agg.schema import ensure_schema
from usage_agg.tracking import track_usage

DAY = "2025-11-01"
FIXTURES_REUSED = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Glob syntax, escapes and separators: the characters that could make a pattern over- or under-match.
tricky_ids = st.text(alphabet="ab*?[]\\^-!:", min_size=1, max_size=6)


@FIXTURES_REUSED
@given(merchants=st.lists(tricky_ids, min_size=1, max_size=8, unique=True), data=st.data())
def test_a_merchant_pattern_matches_that_merchant_alone(redis_client, merchants, data):
    redis_client.flushdb()
    for merchant in merchants:
        redis_client.set(build_key(merchant, DAY, "q"), 1)
    target = data.draw(st.sampled_from(merchants))
    matched = {parse_key(k).merchant_id for k in redis_client.scan_iter(match=day_pattern(DAY, target), count=100)}
    assert matched == {target}


operations = st.lists(
    st.one_of(
        st.tuples(st.just("count"), st.sampled_from(["m1", "m*", "m:2"]), st.sampled_from(["q", "s"]),
                  st.integers(0, 1_000)),
        st.tuples(st.just("aggregate")),
    ),
    max_size=25,
)  # fmt: skip


@pytest.mark.usefixtures("merge_by")
@FIXTURES_REUSED
@given(ops=operations)
def test_any_interleaving_of_counting_and_reruns_ends_equal_to_redis(redis_client, pg_schema, query, ops):
    from tests.conftest import pg_connect

    table = f"{pg_schema}.merchant_usage"
    redis_client.flushdb()
    conn = pg_connect()
    try:
        ensure_schema(conn, table)
        query(f"DELETE FROM {table} RETURNING 1")
        for op in ops:
            if op[0] == "count":
                track_usage(redis_client, op[1], op[2], op[3], usage_date=DAY)
            else:
                aggregate_day(redis_client, conn, DAY, table=table)
        aggregate_day(redis_client, conn, DAY, table=table)
        aggregate_day(redis_client, conn, DAY, table=table)
    finally:
        conn.close()
    expected = {
        (parse_key(k).merchant_id, parse_key(k).metric_type): int(redis_client.get(k))
        for k in redis_client.scan_iter(match="usage:*")
    }
    stored = {(m, t): q for m, t, q in query(f"SELECT merchant_id, metric_type, quantity FROM {table}")}
    assert stored == expected
