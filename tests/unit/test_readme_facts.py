"""What the README states about names and versions is what the code holds (they drifted once)."""

from __future__ import annotations

import re
from pathlib import Path

from usage_agg.schema import DERIVED_SUFFIXES, MAX_TABLE_NAME, SCHEMA_VERSION

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_the_refused_table_name_endings_are_the_ones_the_code_keeps():
    sentence = re.search(r"names ending in\s+(.*?),\s+and names over (\d+) characters", README, re.S)
    assert sentence, "README: the sentence on refused table names"
    endings = re.findall(r"`(_[a-z]+)`", sentence.group(1))
    assert sorted(endings) == sorted(DERIVED_SUFFIXES)
    assert int(sentence.group(2)) == MAX_TABLE_NAME


def test_the_schema_version_the_readme_names_is_the_current_one():
    named = {int(v) for v in re.findall(r"schema version (?:\(now )?(\d+)", README)}
    named |= {int(v) for v in re.findall(r"names the schema version \(now (\d+)\)", README)}
    assert named == {SCHEMA_VERSION}, named
