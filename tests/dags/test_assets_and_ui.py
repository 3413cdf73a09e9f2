"""What the DAGs show and announce: asset events per date, the rendered date, names, docs, pools, late runs.

The runs go through ``dag.test()`` against the real Redis and PostgreSQL; the events and
rendered fields are read back from Airflow's own metadata database, where the scheduler
and the UI find them.
"""

from __future__ import annotations

import asyncio
import datetime as dt

import pendulum
import pytest

from tests.conftest import PG_DATABASE, PG_HOST, PG_PORT
from tests.dags.conftest import AIRFLOW_V3, load_dagbag, run_dag
from usage_agg import assets, dag_config
from usage_agg.alerts import late_run_alert, late_run_sla_miss
from usage_agg.tracking import track_usage


def asset_events(uri: str) -> list[dict]:
    """The events of the asset ``uri``, oldest first: their extra and (Airflow 3) partition key."""
    from airflow.utils.session import create_session

    if AIRFLOW_V3:
        from airflow.models.asset import AssetEvent, AssetModel

        event, model, model_id = AssetEvent, AssetModel, AssetEvent.asset_id
    else:
        from airflow.models.dataset import DatasetEvent, DatasetModel

        event, model, model_id = DatasetEvent, DatasetModel, DatasetEvent.dataset_id
    with create_session() as session:
        rows = session.query(event).join(model, model.id == model_id).filter(model.uri == uri).order_by(event.id)
        return [{"extra": dict(row.extra or {}), "partition_key": getattr(row, "partition_key", None)} for row in rows]


def rendered_usage_date(dag_id: str, task_id: str, logical_date) -> list:
    """The rendered ``usage_date`` of the task in the runs of ``logical_date`` (``None``: the newest run)."""
    from airflow.models import DagRun
    from airflow.models.renderedtifields import RenderedTaskInstanceFields as Rendered
    from airflow.utils.session import create_session

    date_column = DagRun.logical_date if AIRFLOW_V3 else DagRun.execution_date
    with create_session() as session:
        runs = session.query(DagRun).filter(DagRun.dag_id == dag_id)
        if logical_date is None:
            run_ids = [runs.order_by(DagRun.id.desc()).first().run_id]
        else:
            run_ids = [run.run_id for run in runs.filter(date_column == logical_date)]
        rows = session.query(Rendered).filter(
            Rendered.dag_id == dag_id, Rendered.task_id == task_id, Rendered.run_id.in_(run_ids)
        )
        return [row.rendered_fields.get("usage_date") for row in rows]


def test_each_aggregation_emits_an_event_per_date_with_what_it_wrote(redis_client, usage_env):
    track_usage(redis_client, "acme", "queries", 5, usage_date="2025-11-01")
    track_usage(redis_client, "acme", "queries", 6, usage_date="2025-11-02")
    uri = assets.usage_asset_uri(usage_env)
    assert uri.endswith(f"/{usage_env.replace('.', '/')}")

    run_dag("usage_aggregation", logical_date=pendulum.datetime(2025, 11, 2, 0, tz="UTC"))
    first = sorted(asset_events(uri), key=lambda e: e["extra"]["usage_date"])
    assert [e["extra"]["usage_date"] for e in first] == ["2025-11-01", "2025-11-02"]
    assert all(e["extra"]["rows_written"] == 1 and e["extra"]["changed"] for e in first)
    assert all(e["extra"]["resets"] == 0 and e["extra"]["table"] == usage_env for e in first)
    if AIRFLOW_V3:  # partitioned events: the partition key is the date written
        assert [e["partition_key"] for e in first] == ["2025-11-01", "2025-11-02"]

    # The same hour again, one counter grown: only 2025-11-02 changed.
    track_usage(redis_client, "acme", "queries", 1, usage_date="2025-11-02")
    run_dag("usage_aggregation", logical_date=pendulum.datetime(2025, 11, 2, 0, 30, tz="UTC"))
    second = {e["extra"]["usage_date"]: e for e in asset_events(uri)[2:]}
    assert second["2025-11-02"]["extra"]["rows_written"] == 1 and second["2025-11-02"]["extra"]["changed"]
    assert second["2025-11-01"]["extra"]["rows_written"] == 0 and not second["2025-11-01"]["extra"]["changed"]
    if AIRFLOW_V3:  # an unchanged date's event has no partition key: it wakes no partitioned DAG
        assert second["2025-11-02"]["partition_key"] == "2025-11-02"
        assert second["2025-11-01"]["partition_key"] is None


def test_a_failed_aggregation_emits_no_event(redis_client, usage_env):
    redis_client.set("usage:broken:2025-11-02:queries", "not-a-number")
    states = run_dag("usage_aggregation", logical_date=pendulum.datetime(2025, 11, 2, 3, tz="UTC"))
    assert states["aggregate_current_day"] == "failed"
    events = asset_events(assets.usage_asset_uri(usage_env))
    assert [e["extra"]["usage_date"] for e in events] == ["2025-11-01"]  # the day before succeeded


def test_a_run_that_meets_a_known_bad_hour_says_so_in_its_event(redis_client, usage_env):
    """A billing DAG reading the event can tell that a date's hours are incomplete, also when
    the bad hour is known (the run succeeds): the extra counts the bad hourly fields."""
    track_usage(redis_client, "acme", "queries", 5, at=dt.datetime(2025, 11, 2, 1, tzinfo=dt.UTC))
    redis_client.hset("usage-hourly:acme:2025-11-02:queries", "24", 1)  # no hour 24
    first = run_dag("usage_aggregation", logical_date=pendulum.datetime(2025, 11, 2, 3, tz="UTC"))
    assert first["aggregate_current_day"] == "failed"  # new: red once, committed
    known = run_dag("usage_aggregation", logical_date=pendulum.datetime(2025, 11, 2, 4, tz="UTC"))
    assert known["aggregate_current_day"] == "success"
    events = [e for e in asset_events(assets.usage_asset_uri(usage_env)) if e["extra"]["usage_date"] == "2025-11-02"]
    assert [(e["extra"]["bad_hourly"], e["extra"]["bad_keys"]) for e in events] == [(1, 0)]


def test_a_merchant_rerun_emits_one_event_per_date_of_its_range(redis_client, usage_env):
    for day in ("2025-11-01", "2025-11-02", "2025-11-03"):
        track_usage(redis_client, "acme", "queries", 2, usage_date=day)
    conf = {"merchant_id": "acme", "date": "2025-11-01", "end_date": "2025-11-03"}
    run_dag("usage_aggregation_merchant", conf=conf)
    events = asset_events(assets.usage_asset_uri(usage_env))
    assert sorted(e["extra"]["usage_date"] for e in events) == ["2025-11-01", "2025-11-02", "2025-11-03"]
    assert {e["extra"]["merchant_id"] for e in events} == {"acme"}


def test_the_configured_asset_uri_is_the_one_producers_and_consumers_share(monkeypatch, usage_env):
    uri = f"postgres://{PG_HOST}:{PG_PORT}/{PG_DATABASE}/billing/merchant_usage"  # where the table really is
    monkeypatch.setenv("USAGE_AGG_ASSET_URI", uri)
    assert assets.usage_asset().uri == uri
    dag = load_dagbag().get_dag("usage_aggregation")
    assert {o.uri for t in dag.tasks for o in t.outlets} == {uri}


def test_rendered_template_shows_the_date_each_task_reads(redis_client, usage_env):
    when = pendulum.datetime(2025, 11, 2, 5, 17, tz="UTC")
    run_dag("usage_aggregation", logical_date=when)
    assert rendered_usage_date("usage_aggregation", "aggregate_previous_day", when) == ["2025-11-01"]
    assert rendered_usage_date("usage_aggregation", "aggregate_current_day", when) == ["2025-11-02"]


def test_a_run_without_logical_date_renders_todays_date(redis_client, usage_env):
    today = dt.datetime.now(dt.timezone.utc).date()
    run_dag("usage_aggregation", logical_date=None)
    assert rendered_usage_date("usage_aggregation", "aggregate_current_day", None)[0] in (
        today.isoformat(),
        (today + dt.timedelta(days=1)).isoformat(),  # the run crossed midnight
    )


def test_every_dag_and_task_has_a_name_a_description_docs_a_pool_and_a_timeout(monkeypatch, usage_env):
    monkeypatch.setenv("USAGE_AGG_POOL", "usage_agg")
    bag = load_dagbag()
    assert bag.import_errors == {}
    for dag_id in ("usage_aggregation", "usage_aggregation_merchant", "usage_expiry_check"):
        dag = bag.get_dag(dag_id)
        assert dag.dag_display_name != dag_id and dag.description, dag_id
        for task in dag.tasks:
            assert task.task_display_name != task.task_id and (task.doc_md or task.doc), task.task_id
            assert task.pool == "usage_agg", task.task_id
            assert task.execution_timeout == dag_config.TASK_EXECUTION_TIMEOUT, task.task_id


def test_the_rerun_form_groups_its_params_in_sections():
    dag = load_dagbag().get_dag("usage_aggregation_merchant")
    sections = {name: param.schema.get("section") for name, param in dag.params.items()}
    assert sections == {
        "merchant_id": "Whose usage",
        "all_merchants": "Whose usage",
        "date": "Which days",
        "end_date": "Which days",
        "allow_decrease": "How",
    }


@pytest.mark.parametrize("minutes", ["90", "0"])
def test_a_late_hourly_run_alerts(monkeypatch, minutes):
    monkeypatch.setenv("USAGE_AGGREGATION_LATE_AFTER_MINUTES", minutes)
    dag = load_dagbag().get_dag("usage_aggregation")
    late = dt.timedelta(minutes=int(minutes)) or None
    if AIRFLOW_V3:
        deadlines = dag.deadline if isinstance(dag.deadline, list) else [dag.deadline] if dag.deadline else []
        if late is None:
            assert deadlines == []
            return
        (deadline,) = deadlines
        assert deadline.interval == late
        assert "usage_agg.alerts.late_run_alert" in str(deadline.callback.path)
    else:
        assert {task.sla for task in dag.tasks} == {late}
        assert (dag.sla_miss_callback is late_run_sla_miss) == (late is not None)


def test_a_bad_late_after_setting_names_itself(monkeypatch):
    monkeypatch.setenv("USAGE_AGGREGATION_LATE_AFTER_MINUTES", "two hours")
    with pytest.raises(ValueError, match="USAGE_AGGREGATION_LATE_AFTER_MINUTES: expected a whole number"):
        dag_config.late_after()


def test_the_late_run_callbacks_post_the_alert(webhook, monkeypatch):
    url, received = webhook
    monkeypatch.setenv("USAGE_AGG_ALERT_WEBHOOK", url)
    context = {"dag_run": {"dag_id": "usage_aggregation", "run_id": "scheduled__2025-11-02T05:00:00+00:00"},
               "deadline": {"deadline_time": "2025-11-02T07:00:00+00:00"}}  # fmt: skip
    asyncio.run(late_run_alert(context=context))

    class Dag:
        dag_id = "usage_aggregation"

    late_run_sla_miss(Dag(), "aggregate_current_day", "", [], [])
    assert [r["reason"] for r in received] == ["late_run", "late_run"]
    assert "usage_aggregation run scheduled__2025-11-02T05:00:00+00:00 has not succeeded in time" in received[0]["text"]
    assert "2025-11-02T07:00:00+00:00" in received[0]["text"]
    assert received[1]["dag_id"] == "usage_aggregation"


def test_the_example_downstream_dag_schedules_on_the_usage_asset(usage_env):
    try:
        from airflow.dag_processing.dagbag import DagBag  # Airflow 3
    except ImportError:
        from airflow.models.dagbag import DagBag  # Airflow 2
    from pathlib import Path

    bag = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "example_dags"))
    assert bag.import_errors == {}
    dag = bag.get_dag("usage_invoice_totals")
    uri = assets.usage_asset_uri(usage_env)
    if AIRFLOW_V3:
        from airflow.sdk import PartitionedAssetTimetable

        assert isinstance(dag.timetable, PartitionedAssetTimetable)
        assert dag.timetable.asset_condition.uri == uri
    else:
        assert [found for found, _ in dag.timetable.dataset_condition.iter_datasets()] == [uri]


def test_the_example_finds_dates_whose_totals_an_event_never_reached(redis_client, usage_env):
    """Airflow 2 can drop a dataset event; the example's next run then rolls up what is out of step."""
    import importlib.util
    from pathlib import Path

    from tests.conftest import pg_connect
    from usage_agg.identifiers import TableName

    path = Path(__file__).resolve().parents[2] / "example_dags" / "usage_invoice_totals.py"
    spec = importlib.util.spec_from_file_location("example_usage_invoice_totals", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    usage = TableName.parse(usage_env)
    totals = usage.sibling("usage_invoice_totals")
    schema = usage.schema

    def out_of_step() -> list[str]:
        conn = pg_connect()
        try:
            with conn, conn.cursor() as cur:
                return example.dates_out_of_step(cur, usage, totals)
        finally:
            conn.close()

    def execute(sql: str) -> None:
        conn = pg_connect()
        try:
            with conn, conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    days = ("2025-11-01", "2025-11-02", "2025-11-03")
    for day in days:
        track_usage(redis_client, "acme", "queries", 3, usage_date=day)
    run_dag("usage_aggregation_merchant", conf={"all_merchants": True, "date": days[0], "end_date": days[-1]})
    execute(f"CREATE TABLE {totals.quoted} (usage_date date, merchant_id text, metric_type text, quantity bigint)")
    assert out_of_step() == list(days)  # written, never rolled up

    execute(f"INSERT INTO {totals.quoted} SELECT usage_date, merchant_id, metric_type, quantity FROM {usage.quoted}")
    assert out_of_step() == []  # every date in step

    track_usage(redis_client, "acme", "queries", 1, usage_date="2025-11-02")
    run_dag("usage_aggregation_merchant", conf={"merchant_id": "acme", "date": "2025-11-02"})
    assert out_of_step() == ["2025-11-02"]  # a count grew; its event may never have reached the consumer

    execute(f"INSERT INTO {totals.quoted} VALUES ('2025-11-01', 'ghost', 'queries', 1)")
    assert out_of_step() == ["2025-11-01", "2025-11-02"]  # a total no usage row backs

    # Only dates written lately are compared: an old write is the past, not a dropped event.
    execute(
        f"UPDATE {schema}.usage_aggregation_runs SET finished_at = now() - interval '3 days' WHERE usage_date = '2025-11-01'"
    )
    assert out_of_step() == ["2025-11-02"]


def test_the_expiry_check_announces_the_days_it_saved_and_nothing_else(redis_client, usage_env):
    uri = assets.usage_asset_uri(usage_env)
    assert run_dag("usage_expiry_check", logical_date=pendulum.datetime(2025, 11, 2, 2, tz="UTC")) == {
        "check_expiring_usage": "success"
    }
    assert asset_events(uri) == []  # nothing about to expire: no event, no downstream run

    for day in ("2025-10-26", "2025-10-27"):  # never aggregated, expiring within the hour
        track_usage(redis_client, "acme", "queries", 3, usage_date=day, ttl=dt.timedelta(hours=1))
    assert run_dag("usage_expiry_check", logical_date=pendulum.datetime(2025, 11, 2, 3, tz="UTC")) == {
        "check_expiring_usage": "success"
    }
    events = asset_events(uri)
    assert {e["extra"]["source"] for e in events} == {"expiry_check"}
    assert all(e["extra"]["usage_dates"] == ["2025-10-26", "2025-10-27"] for e in events)
    assert [r["rows_written"] for r in events[0]["extra"]["rescued"]] == [1, 1]
    if AIRFLOW_V3:  # one emission per saved date, keyed by it: a partitioned consumer runs once for each
        assert sorted(e["partition_key"] for e in events) == ["2025-10-26", "2025-10-27"]
    else:
        assert len(events) == 1

    assert run_dag("usage_expiry_check", logical_date=pendulum.datetime(2025, 11, 2, 4, tz="UTC")) == {
        "check_expiring_usage": "success"
    }
    assert len(asset_events(uri)) == len(events)  # both days stored now: nothing new to announce


def test_rows_a_failed_task_committed_are_announced_by_the_dates_next_run(redis_client, usage_env):
    """A run that meets a new bad key commits the good keys and fails: Airflow emits no event.
    The date's next run announces them as changed, though it writes nothing itself."""
    uri = assets.usage_asset_uri(usage_env)
    redis_client.incrby("usage:acme:2025-11-02:queries", 5)  # plain writers: the day is read by SCAN
    redis_client.set("usage:broken:2025-11-02:queries", "NaN")
    states = run_dag("usage_aggregation", logical_date=pendulum.datetime(2025, 11, 2, 5, tz="UTC"))
    assert states["aggregate_current_day"] == "failed"
    assert [e for e in asset_events(uri) if e["extra"]["usage_date"] == "2025-11-02"] == []

    run_dag("usage_aggregation", logical_date=pendulum.datetime(2025, 11, 2, 6, tz="UTC"))  # the bad key is known now
    (late,) = [e for e in asset_events(uri) if e["extra"]["usage_date"] == "2025-11-02"]
    assert late["extra"]["rows_written"] == 0 and late["extra"]["changed"]
    if AIRFLOW_V3:
        assert late["partition_key"] == "2025-11-02"

    run_dag("usage_aggregation", logical_date=pendulum.datetime(2025, 11, 2, 7, tz="UTC"))  # announced: no news now
    latest = [e for e in asset_events(uri) if e["extra"]["usage_date"] == "2025-11-02"][-1]
    assert not latest["extra"]["changed"] and latest["partition_key"] is None


def test_days_a_failed_expiry_check_saved_are_announced_by_the_next_check(redis_client, usage_env, query):
    """The check saves two days, then fails on a new bad key: Airflow announces neither. No
    aggregation reads those days again (they are about to expire); the next check announces them."""
    uri = assets.usage_asset_uri(usage_env)
    for day in ("2025-10-26", "2025-10-27"):
        track_usage(redis_client, "acme", "queries", 3, usage_date=day, ttl=dt.timedelta(hours=1))
    redis_client.set("usage:broken:2025-10-27:queries", "not-a-number", ex=3600)
    checks = [pendulum.datetime(2025, 11, 2, hour, tz="UTC") for hour in (3, 4, 5)]
    assert run_dag("usage_expiry_check", logical_date=checks[0]) == {"check_expiring_usage": "failed"}
    assert query(f"SELECT usage_date::text, quantity FROM {usage_env} ORDER BY 1") == [
        ("2025-10-26", 3), ("2025-10-27", 3),
    ]  # fmt: skip
    assert asset_events(uri) == []

    assert run_dag("usage_expiry_check", logical_date=checks[1]) == {"check_expiring_usage": "success"}
    events = asset_events(uri)
    assert all(e["extra"]["announced_late"] == ["2025-10-26", "2025-10-27"] for e in events) and events
    if AIRFLOW_V3:
        assert sorted(e["partition_key"] for e in events) == ["2025-10-26", "2025-10-27"]

    assert run_dag("usage_expiry_check", logical_date=checks[2]) == {"check_expiring_usage": "success"}
    assert len(asset_events(uri)) == len(events)  # announced once
