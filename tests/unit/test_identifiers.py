from __future__ import annotations

import pytest

from usage_agg.identifiers import TableName


def test_plain_and_schema_qualified_names_are_quoted():
    assert TableName.parse("merchant_usage").quoted == '"merchant_usage"'
    assert TableName.parse("billing.Merchant_Usage").quoted == '"billing"."Merchant_Usage"'
    assert TableName.parse("billing.merchant_usage").sibling("usage_aggregation_runs").quoted == (
        '"billing"."usage_aggregation_runs"'
    )


@pytest.mark.parametrize(
    "bad",
    ["", "merchant_usage; DROP TABLE x", 'a"b', "1table", "a.b.c", "a b", "x" * 64, "a.", ".a", "ü"],
)
def test_anything_else_is_refused_naming_the_table(bad):
    with pytest.raises(ValueError, match="^table: "):
        TableName.parse(bad)
