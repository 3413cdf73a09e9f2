"""The README's Airflow CLI commands, run as written, against the real services."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from usage_agg.tracking import track_usage

README_COMMANDS = {
    "date": "airflow dags test usage_aggregation 2025-11-02T00:00:00+00:00",
    "merchant": (
        "airflow dags test usage_aggregation_merchant "
        """--conf '{"merchant_id": "acme_electronics_2024", "date": "2025-11-01", "end_date": "2025-11-02"}'"""
    ),
}


def airflow(command: str) -> str:
    done = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_readme_lists_these_commands():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for command in README_COMMANDS.values():
        assert command in readme


@pytest.fixture
def seeded(redis_client):
    for merchant in ("acme_electronics_2024", "globex"):
        for day, amount in (("2025-11-01", 10), ("2025-11-02", 20)):
            track_usage(redis_client, merchant, "queries", amount, usage_date=day)
    return redis_client


def test_aggregate_a_date_with_the_cli(seeded, usage_env, query):
    output = airflow(README_COMMANDS["date"])
    assert "Completed. Records aggregated: 2, Errors: 0" in output
    assert sorted(query(f"SELECT merchant_id, usage_date::text, quantity FROM {usage_env}")) == [
        ("acme_electronics_2024", "2025-11-01", 10),
        ("acme_electronics_2024", "2025-11-02", 20),
        ("globex", "2025-11-01", 10),
        ("globex", "2025-11-02", 20),
    ]


def test_rerun_a_merchant_with_the_cli(seeded, usage_env, query):
    output = airflow(README_COMMANDS["merchant"])
    assert "Starting aggregation for date: 2025-11-02 for merchant 'acme_electronics_2024'" in output
    assert sorted(query(f"SELECT merchant_id, usage_date::text, quantity FROM {usage_env}")) == [
        ("acme_electronics_2024", "2025-11-01", 10),
        ("acme_electronics_2024", "2025-11-02", 20),
    ]
