"""Alerts from a real deployment's worker: the webhook in the alert connection gets the POST,
and the task log keeps no webhook token, even with a malformed URL in the Variable."""

from __future__ import annotations

import json
import shlex
import time

import pytest

from tests.system.merchant_runs import DAG_ID, manual_runs, task_states, wait_for_run
from tests.system.stack import REPO

pytestmark = pytest.mark.system

README_URL = "https://hooks.example.com/services/T0/B0/secret-token"
#: the README's command, run as written with the test's own webhook URL in place of the example
CONNECTION_COMMAND = f"airflow connections add usage_agg_alert --conn-type generic --conn-password '{README_URL}'"
SCHEMELESS_URL = "hooks.example.com/services/T0/B0/secret-token"


def test_the_readme_shows_the_connection_command_as_tested():
    assert f"\n{CONNECTION_COMMAND}\n" in (REPO / "README.md").read_text()


@pytest.fixture
def alert_settings(stack):
    """The alert connection and Variable this test sets in the metadata DB, removed afterwards."""
    yield
    stack.airflow("connections", "delete", "usage_agg_alert", check=False)
    stack.airflow("variables", "delete", "USAGE_AGG_ALERT_WEBHOOK", check=False)


def task_logs(stack, run_id: str) -> str:
    files = [p for p in (stack.home / "logs").rglob("*.log") if f"run_id={run_id}" in str(p)]
    assert files, f"no task log for {run_id}"
    return "\n".join(p.read_text(errors="replace") for p in files)


def test_a_failed_rerun_alerts_the_connections_webhook_and_its_task_log_keeps_no_token(
    stack, usage_redis, usage_table, metadata, webhook, alert_settings
):
    url, received = webhook
    stack.unpause(DAG_ID)
    stack.airflow(*shlex.split(CONNECTION_COMMAND.replace(README_URL, url))[1:])
    stack.airflow("variables", "set", "USAGE_AGG_ALERT_WEBHOOK", SCHEMELESS_URL)  # a URL that cannot be posted to
    usage_redis.set("usage:acme:2025-11-01:queries", "NaN")  # a new bad key fails the task, without retries

    before = {run_id for run_id, _ in manual_runs(metadata)}
    stack.airflow("dags", "trigger", DAG_ID, "--conf", json.dumps({"merchant_id": "acme", "date": "2025-11-01"}))
    (run_id,) = [run_id for run_id, _ in manual_runs(metadata) if run_id not in before]
    assert wait_for_run(metadata, run_id) == "failed", task_states(metadata, run_id)
    deadline = time.monotonic() + 60  # the callback may still be running when the run is marked failed
    while not received and time.monotonic() < deadline:
        time.sleep(1)

    log = task_logs(stack, run_id)
    assert "secret-token" not in log and "SECRET-TOKEN" not in log
    assert len(received) == 1 and received[0]["dag_id"] == DAG_ID, log[-3000:]
    assert "Alert posted to the webhook at 127.0.0.1 from connection 'usage_agg_alert'" in log
    assert "the webhook URL from USAGE_AGG_ALERT_WEBHOOK is not usable" in log
