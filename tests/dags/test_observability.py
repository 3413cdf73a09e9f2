"""Metrics (real StatsD packets), alerts (a real webhook), lineage and the expiry check."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import subprocess
import threading

import pendulum
import pytest

from tests.conftest import PG_DATABASE, PG_HOST, PG_PORT, REDIS_HOST, REDIS_PORT
from tests.dags.conftest import load_dagbag, run_dag
from usage_agg.alerts import UsageAlertNotifier
from usage_agg.operators import RedisUsageToPostgresOperator
from usage_agg.tracking import track_usage


class FakeTI:
    dag_id, run_id, task_id, map_index = "usage_aggregation", "manual__x", "aggregate_current_day", -1


def test_notifier_posts_to_a_webhook_from_env_without_logging_its_url(webhook, monkeypatch, caplog):
    url, received = webhook
    monkeypatch.setenv("USAGE_AGG_ALERT_WEBHOOK", url)
    UsageAlertNotifier().notify({"task_instance": FakeTI(), "exception": ValueError("3 new bad keys")})
    assert received == [
        {
            "text": "usage-agg: usage_aggregation run manual__x failed at task aggregate_current_day: 3 new bad keys",
            "dag_id": "usage_aggregation",
            "run_id": "manual__x",
            "task_id": "aggregate_current_day",
            "reason": "3 new bad keys",
        }
    ]
    assert "SECRET-TOKEN" not in caplog.text


def test_notifier_reads_an_airflow_variable(webhook, monkeypatch):
    url, received = webhook
    monkeypatch.delenv("USAGE_AGG_ALERT_WEBHOOK", raising=False)
    monkeypatch.setenv("AIRFLOW_VAR_USAGE_AGG_ALERT_WEBHOOK", url)  # an Airflow Variable, from env
    UsageAlertNotifier().notify({"task_instance": FakeTI(), "reason": "task_failure"})
    assert len(received) == 1


def test_notifier_without_a_channel_logs_one_clear_line(monkeypatch, caplog):
    for name in ("USAGE_AGG_ALERT_WEBHOOK", "USAGE_AGG_ALERT_EMAIL"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(f"AIRFLOW_VAR_{name}", raising=False)
    UsageAlertNotifier().notify({"task_instance": FakeTI(), "reason": "task_failure"})
    assert (
        "no alert channel configured: define the Airflow connection 'usage_agg_alert' with the webhook URL as its "
        "password, or set USAGE_AGG_ALERT_WEBHOOK or USAGE_AGG_ALERT_EMAIL as env or Airflow Variable"
    ) in caplog.text


SCHEMELESS_URL = "hooks.example.com/services/T0/B0/secret-token"


def alert_connection(url: str) -> str:
    """The alert connection as ``AIRFLOW_CONN_*`` JSON: the webhook URL is its password."""
    return json.dumps({"conn_type": "generic", "password": url})


def configure_webhook(monkeypatch, source: str, url: str) -> None:
    """Point exactly one webhook source at ``url``."""
    for name in ("USAGE_AGG_ALERT_WEBHOOK", "AIRFLOW_VAR_USAGE_AGG_ALERT_WEBHOOK", "AIRFLOW_CONN_USAGE_AGG_ALERT",
                 "USAGE_AGG_ALERT_CONN_ID", "USAGE_AGG_ALERT_EMAIL", "AIRFLOW_VAR_USAGE_AGG_ALERT_EMAIL"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    name = {
        "env": "USAGE_AGG_ALERT_WEBHOOK",
        "variable": "AIRFLOW_VAR_USAGE_AGG_ALERT_WEBHOOK",  # an Airflow Variable, from env
        "connection": "AIRFLOW_CONN_USAGE_AGG_ALERT",
    }[source]
    monkeypatch.setenv(name, alert_connection(url) if source == "connection" else url)


@pytest.mark.parametrize("source", ["env", "variable", "connection"])
def test_a_webhook_url_without_a_scheme_neither_raises_nor_shows(source, monkeypatch, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    configure_webhook(monkeypatch, source, SCHEMELESS_URL)
    UsageAlertNotifier().notify({"task_instance": FakeTI(), "exception": ValueError("3 new bad keys")})
    out, err = capfd.readouterr()
    for shown in (caplog.text, out, err):
        assert "secret-token" not in shown and "services/T0" not in shown
    assert "is not usable (it does not start with http:// or https://" in caplog.text
    assert "failed at task aggregate_current_day: 3 new bad keys" in caplog.text  # the alert itself is not lost


@pytest.mark.parametrize("conn_id", [None, "pager_webhook"])
def test_notifier_posts_to_the_webhook_in_the_alert_connection(conn_id, webhook, monkeypatch, caplog, capfd):
    url, received = webhook
    configure_webhook(monkeypatch, "connection", url)
    if conn_id:  # another connection id, and no connection under the default one
        monkeypatch.delenv("AIRFLOW_CONN_USAGE_AGG_ALERT")
        monkeypatch.setenv("USAGE_AGG_ALERT_CONN_ID", conn_id)
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", alert_connection(url))
    UsageAlertNotifier().notify({"task_instance": FakeTI(), "exception": ValueError("3 new bad keys")})
    assert [r["text"] for r in received] == [
        "usage-agg: usage_aggregation run manual__x failed at task aggregate_current_day: 3 new bad keys"
    ]
    assert f"Alert posted to the webhook at 127.0.0.1 from connection '{conn_id or 'usage_agg_alert'}'" in caplog.text
    assert "SECRET-TOKEN" not in caplog.text + "".join(capfd.readouterr())


def test_a_webhook_in_both_the_connection_and_the_setting_gets_each_url_once(webhook, monkeypatch):
    url, received = webhook
    configure_webhook(monkeypatch, "connection", url)
    monkeypatch.setenv("USAGE_AGG_ALERT_WEBHOOK", url)  # the same URL twice: one POST
    UsageAlertNotifier().notify({"task_instance": FakeTI(), "reason": "task_failure"})
    assert len(received) == 1
    monkeypatch.setenv("USAGE_AGG_ALERT_WEBHOOK", url + "?copy=2")  # two URLs: each gets it
    UsageAlertNotifier().notify({"task_instance": FakeTI(), "reason": "task_failure"})
    assert len(received) == 3


@pytest.mark.parametrize("source", ["env", "variable", "connection"])
def test_the_webhook_url_is_registered_with_airflows_secrets_masker(source, webhook, monkeypatch):
    from airflow.providers.common.compat.sdk import redact  # what Airflow's task logs apply

    url, received = webhook
    url = f"{url}-{source}"  # a URL this process has not seen yet
    configure_webhook(monkeypatch, source, url)
    assert redact(f"posting to {url}") == f"posting to {url}"
    UsageAlertNotifier().notify({"task_instance": FakeTI(), "reason": "task_failure"})
    assert len(received) == 1
    assert redact(f"posting to {url}") == "posting to ***"


def test_a_failed_merchant_rerun_alerts_the_webhook_in_the_connection(webhook, monkeypatch, redis_client, usage_env):
    url, received = webhook
    configure_webhook(monkeypatch, "connection", url)
    redis_client.set("usage:acme:2025-11-01:queries", "NaN")
    states = run_dag("usage_aggregation_merchant", conf={"merchant_id": "acme", "date": "2025-11-01"})
    assert states["aggregate_merchant_day[0]"] == "failed"
    assert len(received) == 1 and received[0]["dag_id"] == "usage_aggregation_merchant"
    assert "new bad key" in received[0]["reason"]


def test_notifier_survives_an_unreachable_webhook(monkeypatch, caplog):
    monkeypatch.setenv("USAGE_AGG_ALERT_WEBHOOK", "http://127.0.0.1:1/hook")
    UsageAlertNotifier().notify({"task_instance": FakeTI(), "reason": "task_failure"})
    assert "could not be posted" in caplog.text


def test_a_failed_hourly_run_alerts_through_the_dag_callback(webhook, monkeypatch, redis_client, usage_env):
    url, received = webhook
    monkeypatch.setenv("USAGE_AGG_ALERT_WEBHOOK", url)
    redis_client.set("usage:broken:2025-11-02:queries", "NaN")
    states = run_dag("usage_aggregation", logical_date=pendulum.datetime(2025, 11, 2, 3, tz="UTC"))
    assert states["aggregate_current_day"] == "failed"
    run_id, state = last_run("usage_aggregation")
    assert state == "failed"
    # Both Airflow majors' dag.test() run the DAG-level callback when the run fails, as the
    # scheduler (2.x: the DAG processor) does: one alert, for this run.
    assert [(a["dag_id"], a["run_id"], a["reason"]) for a in received] == [
        ("usage_aggregation", run_id, "task_failure")
    ], received


def test_a_reset_succeeds_and_alerts_once_that_redis_lost_data(webhook, monkeypatch, redis_client, usage_env, query):
    url, received = webhook
    monkeypatch.setenv("USAGE_AGG_ALERT_WEBHOOK", url)
    track_usage(redis_client, "acme", "queries", 100, usage_date="2025-11-02")
    first = run_dag("usage_aggregation", logical_date=pendulum.datetime(2025, 11, 2, 3, tz="UTC"))
    assert set(first.values()) == {"success"} and received == []
    redis_client.set("usage:acme:2025-11-02:queries", 30)  # Redis lost the counter; writers count on
    states = run_dag("usage_aggregation", logical_date=pendulum.datetime(2025, 11, 2, 4, tz="UTC"))
    assert set(states.values()) == {"success"}  # the committed rows are right
    run_id, _ = last_run("usage_aggregation")
    assert [(a["dag_id"], a["run_id"], a["task_id"], a["reason"]) for a in received] == [
        ("usage_aggregation", run_id, "aggregate_current_day", "redis_data_loss")
    ], received
    assert received[0]["text"].startswith("usage-agg: Redis lost data: 1 counter(s) of 2025-11-02 in ")
    assert query(f"SELECT quantity, redis_offset FROM {usage_env}") == [(100, 70)]
    assert run_dag("usage_aggregation", logical_date=pendulum.datetime(2025, 11, 2, 5, tz="UTC")) and len(received) == 1


def last_run(dag_id: str) -> tuple[str, str]:
    """The run id and state of the DAG's latest run in the metadata DB."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        run = session.query(DagRun).filter(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).first()
        return run.run_id, str(getattr(run.state, "value", run.state))


def run_state_of_last_run(dag_id: str) -> str:
    return last_run(dag_id)[1]


def test_expiry_check_saves_usage_about_to_be_lost_and_fails_on_what_needs_a_person(redis_client, usage_env, query):
    track_usage(redis_client, "acme", "queries", 3, usage_date="2025-10-27", ttl=dt.timedelta(hours=2))
    assert run_dag("usage_expiry_check", logical_date=pendulum.datetime(2025, 11, 2, 3, tz="UTC")) == {
        "check_expiring_usage": "success"
    }  # never aggregated, about to expire: its day was aggregated by the check
    assert query(f"SELECT merchant_id, usage_date::text, quantity FROM {usage_env}") == [("acme", "2025-10-27", 3)]

    redis_client.set("usage:broken:2025-10-27:queries", "NaN", ex=7200)  # a new bad key, about to expire
    assert run_dag("usage_expiry_check", logical_date=pendulum.datetime(2025, 11, 2, 4, tz="UTC")) == {
        "check_expiring_usage": "failed"
    }
    assert run_state_of_last_run("usage_expiry_check") == "failed"
    assert run_dag("usage_expiry_check", logical_date=pendulum.datetime(2025, 11, 2, 5, tz="UTC")) == {
        "check_expiring_usage": "success"
    }  # its dead letter now holds its value: nothing to lose, nothing new


def test_operator_reports_lineage_without_credentials(redis_client, usage_env, mocker):
    track_usage(redis_client, "acme", "queries", 1, usage_date="2025-11-01")
    operator = RedisUsageToPostgresOperator(task_id="t", usage_date="2025-11-01", table=usage_env)
    operator.execute({"ti": mocker.MagicMock(dag_id="d", run_id="r", task_id="t", map_index=-1)})
    lineage = operator.get_openlineage_facets_on_complete(None)
    db = redis_client.connection_pool.connection_kwargs["db"]
    assert [(d.namespace, d.name) for d in lineage.inputs] == [
        (f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}", "usage:*:2025-11-01:*")
    ]
    schema = usage_env.split(".")[0]
    assert [(d.namespace, d.name) for d in lineage.outputs] == [
        (f"postgres://{PG_HOST}:{PG_PORT}", f"{PG_DATABASE}.{schema}.merchant_usage")
    ]


def test_metrics_reach_statsd(redis_client, usage_env):
    track_usage(redis_client, "acme", "queries", 1, usage_date="2025-11-02")
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(0.5)
    env = {
        **os.environ,
        "AIRFLOW__METRICS__STATSD_ON": "True",
        "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
        "AIRFLOW__METRICS__STATSD_PORT": str(listener.getsockname()[1]),
        "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
    }
    packets: list[str] = []

    def collect():
        while not stop.is_set():
            try:
                packets.extend(listener.recv(65535).decode().split("\n"))
            except OSError:
                continue

    stop = threading.Event()
    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    runs = [
        subprocess.run(
            ["airflow", "dags", "test", dag_id, "2025-11-02T00:00:00+00:00"],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        for dag_id in ("usage_aggregation", "usage_expiry_check")
    ]
    stop.set()
    thread.join()
    listener.close()
    for done in runs:
        assert done.returncode == 0, done.stderr[-2000:]
    names = {p.split(":")[0] for p in packets if p}
    for metric in ("keys_found", "rows_written", "bad_keys", "decreases_refused", "resets", "duration",
                   "unaggregated_lag_days", "days_expiring_unaggregated"):  # fmt: skip
        assert f"airflow.usage_agg.{metric}" in names, sorted(n for n in names if "usage_agg" in n)
    assert "airflow.usage_agg.keys_found:1|c" in packets


@pytest.fixture
def smtp_server():
    """A real SMTP server on loopback that keeps what it receives."""
    from aiosmtpd.controller import Controller

    received = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            received.append((envelope.rcpt_tos, envelope.content.decode("utf-8", "replace")))
            return "250 OK"

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    yield port, received
    controller.stop()


def test_notifier_sends_email_through_the_smtp_provider(smtp_server, monkeypatch):
    port, received = smtp_server
    monkeypatch.delenv("USAGE_AGG_ALERT_WEBHOOK", raising=False)
    monkeypatch.setenv("USAGE_AGG_ALERT_EMAIL", "oncall@example.com, billing@example.com")
    monkeypatch.setenv(
        "AIRFLOW_CONN_SMTP_DEFAULT",
        json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": port,
                    "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "usage-agg@example.com"}}),
    )  # fmt: skip
    dag = load_dagbag().get_dag("usage_aggregation")  # callback contexts carry the DAG
    UsageAlertNotifier().notify({"dag": dag, "task_instance": FakeTI(), "exception": "3 new bad keys"})
    assert len(received) == 1
    recipients, message = received[0]
    assert sorted(recipients) == ["billing@example.com", "oncall@example.com"]
    assert "usage_aggregation run manual__x failed at task aggregate_current_day: 3 new bad keys" in message
