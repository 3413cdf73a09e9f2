"""Every test reaches the suite's Redis and PostgreSQL through the settings in tests/conftest.py.

A port or database written into a test makes it test another server than the suite's
(the machine's default one, shared with whoever else runs there) as soon as the suite
runs elsewhere, e.g. with ``USAGE_AGG_REDIS_PORT=6391``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
SETTINGS = TESTS / "conftest.py"

#: what the suite's services look like written out: their default ports, their default database
HARD_CODED = [
    re.compile(r"\b(6379|5432)\b"),
    re.compile(r"""\b(dbname|database|schema)["']?\s*[=:]\s*["']test["']"""),
    re.compile(r"""["']test\.\{"""),  # a qualified name in the default database: f"test.{schema}.table"
]


def hard_coded(line: str) -> bool:
    return any(pattern.search(line) for pattern in HARD_CODED)


@pytest.mark.parametrize(
    "line",
    [
        '"--conn-port", "6379", "--conn-extra", json.dumps({"db": db})',
        '{"conn_type": "redis", "host": "127.0.0.1", "port": 6379}',
        '[("postgres://127.0.0.1:5432", f"test.{schema}.merchant_usage")]',
        'psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="test")',
        '{"conn_type": "postgres", "schema": "test"}',
    ],
)
def test_the_check_recognises_an_address_written_out(line):
    assert hard_coded(line)


def test_no_test_writes_out_a_service_address():
    offenders = [
        f"{path.relative_to(TESTS)}:{number}: {line.strip()}"
        for path in sorted(TESTS.rglob("*.py"))
        if path not in (SETTINGS, Path(__file__).resolve())
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if hard_coded(line)
    ]
    assert offenders == [], "take REDIS_HOST/REDIS_PORT/PG_* from tests/conftest.py:\n" + "\n".join(offenders)
