"""Per-merchant reruns triggered with a conf, from the CLI and the REST API, run by the scheduler."""

from __future__ import annotations

import json

import pytest

from tests.system.merchant_runs import DAG_ID, MERCHANT, manual_runs, rows, task_states, wait_for_run
from tests.system.stack import AIRFLOW_V3, REPO, http

pytestmark = pytest.mark.system

CONF = {"merchant_id": MERCHANT, "date": "2025-11-01"}
CLI_COMMAND = f"airflow dags trigger {DAG_ID} --conf '{json.dumps(CONF)}'"
#: the original job's aggregate-range FROM TO: every merchant, a week
RANGE_CONF = {"all_merchants": True, "date": "2025-11-01", "end_date": "2025-11-07"}
RANGE_COMMAND = f"airflow dags trigger {DAG_ID} --conf '{json.dumps(RANGE_CONF)}'"
#: the trigger request's body per API version, as the README shows it
REST_BODIES = {"v2": {"logical_date": None, "conf": CONF}, "v1": {"conf": CONF}}
REST_BODY = REST_BODIES["v2" if AIRFLOW_V3 else "v1"]


def test_the_readme_shows_the_command_and_requests_as_tested():
    readme = (REPO / "README.md").read_text()
    assert f"\n{CLI_COMMAND}\n" in readme
    assert f"\n{RANGE_COMMAND}\n" in readme
    for version, body in REST_BODIES.items():
        assert f"`POST /api/{version}/dags/{DAG_ID}/dagRuns`" in readme
        assert f"`{json.dumps(body)}`" in readme, body


def test_trigger_from_the_cli_updates_that_merchant_only(stack, merchants, query, metadata):
    before = {run_id for run_id, _ in manual_runs(metadata)}
    import shlex

    stack.airflow(*shlex.split(CLI_COMMAND)[1:])
    (run_id,) = [run_id for run_id, _ in manual_runs(metadata) if run_id not in before]
    assert wait_for_run(metadata, run_id) == "success", task_states(metadata, run_id)
    assert rows(query, merchants) == {MERCHANT: 500, "globex": 1}


def test_trigger_through_the_rest_api_updates_that_merchant_only(stack, merchants, query, metadata):
    status, run = http("POST", stack.trigger_url(DAG_ID), REST_BODY, stack.api_headers())
    assert status == 200, run
    assert wait_for_run(metadata, run["dag_run_id"]) == "success", task_states(metadata, run["dag_run_id"])
    assert rows(query, merchants) == {MERCHANT: 500, "globex": 1}


def test_a_range_over_every_merchant_from_the_cli_and_the_rest_api(stack, merchants, query, metadata):
    import shlex

    for trigger in ("cli", "rest"):
        query(f"UPDATE {merchants} SET quantity = 1 RETURNING 1")  # both merchants behind Redis again
        if trigger == "cli":
            before = {run_id for run_id, _ in manual_runs(metadata)}
            stack.airflow(*shlex.split(RANGE_COMMAND)[1:])
            (run_id,) = [run_id for run_id, _ in manual_runs(metadata) if run_id not in before]
        else:
            body = {"conf": RANGE_CONF, **({"logical_date": None} if AIRFLOW_V3 else {})}
            status, run = http("POST", stack.trigger_url(DAG_ID), body, stack.api_headers())
            assert status == 200, run
            run_id = run["dag_run_id"]
        assert wait_for_run(metadata, run_id) == "success", task_states(metadata, run_id)
        states = task_states(metadata, run_id)
        assert sorted(k for k in states if k.startswith("aggregate_merchant_day")) == [
            f"aggregate_merchant_day[{i}]" for i in range(7)
        ], states
        assert rows(query, merchants) == {MERCHANT: 500, "globex": 500}


@pytest.mark.parametrize(
    ("conf", "field"),
    [
        ({"merchant_id": "", "date": "2025-11-01"}, "merchant_id"),
        ({"merchant_id": MERCHANT, "date": "01/11/2025"}, "date"),
        ({"merchant_id": MERCHANT, "date": "2025-11-01", "end_date": "2025-11-1"}, "end_date"),
    ],
    ids=["empty-merchant", "date-not-iso", "end-date-not-iso"],
)
def test_rest_refuses_a_conf_the_form_schema_rejects_before_any_run_exists(stack, merchants, metadata, conf, field):
    before = manual_runs(metadata)
    body = {"conf": conf, **({"logical_date": None} if AIRFLOW_V3 else {})}
    status, answer = http("POST", stack.trigger_url(DAG_ID), body, stack.api_headers())
    assert status == 400, answer
    assert field in json.dumps(answer), answer
    assert manual_runs(metadata) == before


@pytest.mark.parametrize(
    ("conf", "field"),
    [
        ({"merchant_id": MERCHANT, "date": "2025-11-05", "end_date": "2025-11-01"}, "end_date"),
        ({"merchant_id": MERCHANT, "date": "2025-01-01", "end_date": "2025-03-01"}, "end_date"),
        ({"merchant_id": MERCHANT, "date": "2999-01-01"}, "date"),
        ({"date": "2025-11-01"}, "merchant_id"),
        ({"merchant_id": MERCHANT, "all_merchants": True, "date": "2025-11-01"}, "all_merchants"),
    ],
    ids=["end-before-date", "over-31-days", "future", "no-merchant-unconfirmed", "merchant-and-all"],
)
def test_checks_across_fields_fail_the_first_task_before_data_is_touched(
    stack, merchants, query, metadata, conf, field
):
    body = {"conf": conf, **({"logical_date": None} if AIRFLOW_V3 else {})}
    status, run = http("POST", stack.trigger_url(DAG_ID), body, stack.api_headers())
    assert status == 200, run
    run_id = run["dag_run_id"]
    assert wait_for_run(metadata, run_id) == "failed"
    states = task_states(metadata, run_id)
    assert states["validate_request"] == "failed", states
    assert states.get("aggregate_merchant_day") in (None, "upstream_failed"), states
    log = _task_log(stack, run_id, "validate_request")
    assert f"Refused: {field}" in log, log[-2000:]
    assert rows(query, merchants) == {MERCHANT: 1, "globex": 1}


def _task_log(stack, run_id: str, task_id: str) -> str:
    folder = stack.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / f"task_id={task_id}"
    return "\n".join(path.read_text() for path in sorted(folder.glob("attempt=*.log")))
