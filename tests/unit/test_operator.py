"""The operator's own logic; the aggregation itself is tested against real services."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from airflow.providers.common.compat.sdk import AirflowFailException

from usage_agg.aggregate import AggregationResult
from usage_agg.operators import RedisUsageToPostgresOperator, as_bool, resolve_usage_date


def test_template_fields_are_a_tuple_with_the_contract_fields():
    fields = RedisUsageToPostgresOperator.template_fields
    assert isinstance(fields, tuple)
    assert {"usage_date", "merchant_id", "table", "redis_conn_id", "postgres_conn_id"} <= set(fields)


def test_constructor_opens_no_connection(mocker):
    redis_hook = mocker.patch("airflow.providers.redis.hooks.redis.RedisHook")
    pg_hook = mocker.patch("airflow.providers.postgres.hooks.postgres.PostgresHook")
    RedisUsageToPostgresOperator(task_id="t", usage_date="2025-11-01")
    redis_hook.assert_not_called()
    pg_hook.assert_not_called()


def test_resolve_usage_date_prefers_explicit_then_ds_then_today_utc():
    assert resolve_usage_date("2025-11-01", {"ds": "2025-12-24"}) == dt.date(2025, 11, 1)
    assert resolve_usage_date(None, {"ds": "2025-12-24"}, -1) == dt.date(2025, 12, 23)
    today = dt.datetime.now(dt.timezone.utc).date()
    assert resolve_usage_date(None, {}) in (today, dt.datetime.now(dt.timezone.utc).date())
    assert resolve_usage_date("", {}, -1) == resolve_usage_date(None, {}) - dt.timedelta(days=1)


@pytest.mark.parametrize(("value", "expected"), [(True, True), (False, False), ("True", True), ("false", False)])
def test_as_bool_accepts_booleans_and_their_rendered_form(value, expected):
    assert as_bool(value, field="allow_decrease") is expected


@pytest.mark.parametrize("value", ["yes", "1", 1, None])
def test_as_bool_refuses_anything_else(value):
    with pytest.raises(ValueError, match="^allow_decrease: "):
        as_bool(value, field="allow_decrease")


def _run_with_result(mocker, result: AggregationResult):
    mocker.patch("airflow.providers.redis.hooks.redis.RedisHook")
    mocker.patch("airflow.providers.postgres.hooks.postgres.PostgresHook")
    aggregate = mocker.patch("usage_agg.operators.aggregate_day", return_value=result)
    ti = mocker.MagicMock(dag_id="d", run_id="r", task_id="t", map_index=-1)
    operator = RedisUsageToPostgresOperator(task_id="t", usage_date="2025-11-01")
    return operator, aggregate, ti


def test_execute_returns_a_json_serialisable_result(mocker):
    result = AggregationResult(usage_date="2025-11-01", merchant_id=None, table="merchant_usage", keys_found=3)
    operator, aggregate, ti = _run_with_result(mocker, result)
    payload = operator.execute({"ti": ti})
    assert json.loads(json.dumps(payload))["keys_found"] == 3
    for key in ("usage_date", "merchant_id", "keys_found", "rows_written", "rows_unchanged", "decreases_refused", "bad_keys"):
        assert key in payload
    assert aggregate.call_args.kwargs["audit"] == {"dag_id": "d", "run_id": "r", "task_id": "t"}


def test_new_bad_keys_fail_without_retry_after_publishing_the_result(mocker):
    result = AggregationResult(
        usage_date="2025-11-01", merchant_id=None, table="merchant_usage", keys_found=3, bad_keys=1, new_bad_keys=1
    )
    operator, _, ti = _run_with_result(mocker, result)
    with pytest.raises(AirflowFailException, match="1 new bad key"):
        operator.execute({"ti": ti})
    ti.xcom_push.assert_called_once()
    assert ti.xcom_push.call_args.kwargs["value"]["bad_keys"] == 1


def test_known_bad_keys_do_not_fail_the_task(mocker):
    result = AggregationResult(usage_date="2025-11-01", merchant_id=None, table="merchant_usage", keys_found=3, bad_keys=1)
    operator, _, ti = _run_with_result(mocker, result)
    assert operator.execute({"ti": ti})["bad_keys"] == 1


def test_a_bad_date_is_a_configuration_error_not_retried(mocker):
    operator, aggregate, ti = _run_with_result(mocker, AggregationResult("x", None, "t"))
    operator.usage_date = "2025-11-31"
    with pytest.raises(AirflowFailException, match="usage_date"):
        operator.execute({"ti": ti})
    aggregate.assert_not_called()


def _backfill_context(ti, hour: int, run_type: str = "backfill") -> dict:
    from types import SimpleNamespace

    import pendulum

    return {
        "ti": ti,
        "dag_run": SimpleNamespace(run_type=run_type),
        "logical_date": pendulum.datetime(2025, 11, 3, hour, tz="UTC"),
        "ds": "2025-11-03",
    }


def _hourly_dag(fan_out: bool = False):
    """The hourly DAG's shape: two readers (or a planner and two mapped readers); returns the tasks."""
    import pendulum
    from airflow.providers.common.compat.sdk import DAG

    from usage_agg.operators import RedisPartitionsOperator

    with DAG("usage_aggregation", schedule=None, start_date=pendulum.datetime(2025, 1, 1, tz="UTC")):
        if not fan_out:
            return {
                task_id: RedisUsageToPostgresOperator(task_id=task_id, day_offset=offset)
                for task_id, offset in (("aggregate_previous_day", -1), ("aggregate_current_day", 0))
            }
        plan = RedisPartitionsOperator(task_id="plan_redis_partitions")
        for task_id, offset in (("aggregate_previous_day", -1), ("aggregate_current_day", 0)):
            RedisUsageToPostgresOperator.partial(task_id=task_id, day_offset=offset).expand_kwargs(plan.output)
        return {"plan_redis_partitions": plan}


def _reader(day: dt.date, hour: int = 0, same_backfill: bool = True, state: str | None = "success"):
    from usage_agg.backfill import Reader

    when = dt.datetime(2025, 11, 3, hour, tzinfo=dt.UTC)
    return Reader(f"backfill__{when.isoformat()}", when, "aggregate_current_day", day, same_backfill, state)


def test_the_deciding_tasks_and_their_days_come_from_the_dag():
    from usage_agg.operators import backfill_deciders

    tasks = _hourly_dag()
    assert backfill_deciders(tasks["aggregate_current_day"].dag) == {
        "aggregate_previous_day": (-1,),
        "aggregate_current_day": (0,),
    }
    plan = _hourly_dag(fan_out=True)["plan_redis_partitions"]
    assert backfill_deciders(plan.dag) == {"plan_redis_partitions": (-1, 0)}


def test_the_day_offset_survives_rendering_for_the_decision():
    """Rendering replaces usage_date by the date read and the offset by 0; the decision needs the offset."""
    import pendulum

    operator = _hourly_dag()["aggregate_previous_day"]
    operator.render_template_fields({"ds": "2025-11-03", "logical_date": pendulum.datetime(2025, 11, 3, tz="UTC")})
    assert (operator.usage_date, operator.day_offset) == ("2025-11-02", 0)
    assert operator.reads_run_day_offset == -1


@pytest.mark.parametrize("hour", [1, 12, 23])
def test_a_backfill_run_leaves_its_day_to_an_earlier_run_of_the_same_backfill_that_reads_it(mocker, hour):
    """Airflow 3: skipped. Airflow 2.11: succeeds at once with nothing to announce, since a task
    that skips itself there can leave its finished backfill run in state running."""
    from airflow.providers.common.compat.sdk import AirflowSkipException
    from airflow.providers.common.compat.version_compat import AIRFLOW_V_3_0_PLUS

    _, aggregate, ti = _run_with_result(mocker, AggregationResult("x", None, "t"))
    readers = mocker.patch(
        "usage_agg.backfill_facts.earlier_readers", return_value=iter([_reader(dt.date(2025, 11, 3))])
    )
    operator = _hourly_dag()["aggregate_current_day"]
    operator.outlets = ["the usage asset"]
    why = r"leaves 2025-11-03 to aggregate_current_day of backfill__2025-11-03T00:00:00\+00:00"
    if AIRFLOW_V_3_0_PLUS:
        with pytest.raises(AirflowSkipException, match=why):
            operator.execute(_backfill_context(ti, hour))
    else:
        result = operator.execute(_backfill_context(ti, hour))
        assert result["usage_date"] == "2025-11-03" and "an earlier run of the same backfill" in result["not_aggregated"]
        assert operator.outlets == []
    aggregate.assert_not_called()
    since = readers.call_args.args[2]
    assert since == dt.datetime(2025, 11, 3, tzinfo=dt.UTC)  # runs before the day cannot read it


@pytest.mark.parametrize(
    "reader",
    [
        None,  # no earlier run (the first of the day in the backfill, a range starting mid-day)
        _reader(dt.date(2025, 11, 3), same_backfill=False),  # a run the backfill left out (failed, existing)
        _reader(dt.date(2025, 11, 3), state="failed"),  # ended without reading
        _reader(dt.date(2025, 11, 2)),  # reads another day
    ],
)
def test_a_backfill_run_reads_its_day_when_no_earlier_run_of_the_same_backfill_does(mocker, reader):
    result = AggregationResult(usage_date="2025-11-03", merchant_id=None, table="merchant_usage")
    _, aggregate, ti = _run_with_result(mocker, result)
    mocker.patch("usage_agg.backfill_facts.earlier_readers", return_value=iter([reader] if reader else []))
    mocker.patch("usage_agg.backfill_facts.runs_of_day", return_value=iter([True]))  # tomorrow: the backfill's
    operator = _hourly_dag()["aggregate_current_day"]
    operator.execute(_backfill_context(ti, 5))
    assert aggregate.call_args.args[2] == dt.date(2025, 11, 3)


def _results_by_day(mocker, **fields):
    """``aggregate_day`` answering with a result of the day it is asked for (``fields`` per day)."""
    mocker.patch("airflow.providers.redis.hooks.redis.RedisHook")
    mocker.patch("airflow.providers.postgres.hooks.postgres.PostgresHook")

    def aggregate(redis_client, pg_conn, day, options, **kwargs):
        return AggregationResult(day.isoformat(), None, "merchant_usage", **fields.get(day.isoformat(), {}))

    return mocker.patch("usage_agg.operators.aggregate_day", side_effect=aggregate)


class _Outlet:
    """What ``context["outlet_events"][asset]`` is: the event's extra, set by the task."""

    extra: dict | None = None


def _asset_outlets(operator):
    from usage_agg.assets import usage_asset

    asset = usage_asset("merchant_usage")
    operator.outlets = [asset]
    events = {asset: _Outlet()}
    return events, asset


@pytest.mark.parametrize("hour", [0, 1, 23])
def test_a_backfill_task_reading_its_day_also_reads_the_next_day_no_run_of_the_backfill_reads(mocker, hour):
    """The range's last day, whose only run (its midnight) exists and was left out of the backfill."""
    aggregate = _results_by_day(mocker, **{"2025-11-04": {"rows_written": 2}})
    mocker.patch("usage_agg.backfill_facts.earlier_readers", return_value=iter([]))
    runs_of_day = mocker.patch("usage_agg.backfill_facts.runs_of_day", return_value=iter([False]))
    operator = _hourly_dag()["aggregate_current_day"]
    events, asset = _asset_outlets(operator)
    ti = mocker.MagicMock(dag_id="usage_aggregation", run_id="r", task_id="aggregate_current_day", map_index=-1)
    payload = operator.execute({**_backfill_context(ti, hour), "outlet_events": events})
    assert [c.args[2] for c in aggregate.call_args_list] == [dt.date(2025, 11, 3), dt.date(2025, 11, 4)]
    assert runs_of_day.call_args.args[1] == dt.date(2025, 11, 4)
    assert payload["usage_date"] == "2025-11-03" and payload["next_day"]["usage_date"] == "2025-11-04"
    extra = events[asset].extra
    assert extra["usage_date"] == "2025-11-03" and extra["next_day"]["usage_date"] == "2025-11-04"
    assert extra["next_day"]["changed"] is True and extra["changed"] is False
    assert json.loads(json.dumps(payload)) == payload


@pytest.mark.parametrize(
    "runs",
    [
        [True],  # the next day's midnight is the backfill's: it reads its own day
        [False, False, True],  # a later run of the next day is the backfill's
        [],  # no run on the next day: past the range (3.3), or runs the backfill creates (2.11)
    ],
)
def test_a_backfill_task_does_not_read_a_next_day_that_the_backfill_reads(mocker, runs):
    aggregate = _results_by_day(mocker)
    mocker.patch("usage_agg.backfill_facts.earlier_readers", return_value=iter([]))
    mocker.patch("usage_agg.backfill_facts.runs_of_day", return_value=iter(runs))
    ti = mocker.MagicMock(dag_id="usage_aggregation", run_id="r", task_id="aggregate_current_day", map_index=-1)
    payload = _hourly_dag()["aggregate_current_day"].execute(_backfill_context(ti, 5))
    assert [c.args[2] for c in aggregate.call_args_list] == [dt.date(2025, 11, 3)] and "next_day" not in payload


@pytest.mark.parametrize("run_type", ["scheduled", "manual"])
def test_only_a_backfill_task_reading_its_own_day_reads_forward(mocker, run_type):
    aggregate = _results_by_day(mocker)
    mocker.patch("usage_agg.backfill_facts.earlier_readers", return_value=iter([]))
    runs_of_day = mocker.patch("usage_agg.backfill_facts.runs_of_day", return_value=iter([False]))
    ti = mocker.MagicMock(dag_id="usage_aggregation", run_id="r", task_id="t", map_index=-1)
    tasks = _hourly_dag()
    tasks["aggregate_previous_day"].execute(_backfill_context(ti, 5))  # reads the day before: never forward
    tasks["aggregate_current_day"].execute(_backfill_context(ti, 5, run_type))  # not a backfill
    tasks["aggregate_current_day"].once_per_day_in_backfill = False
    tasks["aggregate_current_day"].execute(_backfill_context(ti, 5))  # asked to read every run
    assert [c.args[2] for c in aggregate.call_args_list] == [dt.date(2025, 11, 2), *[dt.date(2025, 11, 3)] * 2]
    runs_of_day.assert_not_called()


def test_new_bad_keys_on_the_next_day_fail_the_task_after_both_days_are_committed(mocker):
    _results_by_day(mocker, **{"2025-11-04": {"bad_keys": 1, "new_bad_keys": 1}})
    mocker.patch("usage_agg.backfill_facts.earlier_readers", return_value=iter([]))
    mocker.patch("usage_agg.backfill_facts.runs_of_day", return_value=iter([False]))
    ti = mocker.MagicMock(dag_id="usage_aggregation", run_id="r", task_id="aggregate_current_day", map_index=-1)
    with pytest.raises(AirflowFailException, match=r"^1 new bad key\(s\) for 2025-11-04 \(1 in all\); good keys"):
        _hourly_dag()["aggregate_current_day"].execute(_backfill_context(ti, 5))
    published = ti.xcom_push.call_args.kwargs["value"]
    assert published["usage_date"] == "2025-11-03" and published["next_day"]["new_bad_keys"] == 1


@pytest.mark.parametrize(("rows_written", "marked"), [(3, True), (0, False)])
def test_a_next_day_read_that_fails_leaves_the_first_days_writes_to_be_announced(mocker, rows_written, marked):
    """The task fails, so no event announces the first day's commit: the audit says so, for the expiry check."""
    calls = []

    def aggregate(redis_client, pg_conn, day, options, **kwargs):
        calls.append(day)
        if len(calls) == 2:
            raise ConnectionError("Redis went away")
        return AggregationResult(day.isoformat(), None, "merchant_usage", rows_written=rows_written)

    mocker.patch("airflow.providers.redis.hooks.redis.RedisHook")
    mocker.patch("airflow.providers.postgres.hooks.postgres.PostgresHook")
    mocker.patch("usage_agg.operators.aggregate_day", side_effect=aggregate)
    mocker.patch("usage_agg.schema.resolve_names", return_value=mocker.MagicMock(**{"runs.quoted": '"usage_runs"'}))
    mark = mocker.patch("usage_agg.operators.mark_not_announced")
    mocker.patch("usage_agg.backfill_facts.earlier_readers", return_value=iter([]))
    mocker.patch("usage_agg.backfill_facts.runs_of_day", return_value=iter([False]))
    ti = mocker.MagicMock(dag_id="usage_aggregation", run_id="r", task_id="aggregate_current_day", map_index=-1)
    with pytest.raises(ConnectionError):
        _hourly_dag()["aggregate_current_day"].execute(_backfill_context(ti, 5))
    if marked:
        audit = {"dag_id": "usage_aggregation", "run_id": "r", "task_id": "aggregate_current_day"}
        mark.assert_called_once_with(mocker.ANY, '"usage_runs"', audit, ["2025-11-03"])
    else:
        mark.assert_not_called()


@pytest.mark.parametrize("run_type", ["scheduled", "manual"])
def test_scheduled_and_manual_runs_always_aggregate_without_looking_at_other_runs(mocker, run_type):
    result = AggregationResult(usage_date="2025-11-03", merchant_id=None, table="merchant_usage")
    _, aggregate, ti = _run_with_result(mocker, result)
    readers = mocker.patch("usage_agg.backfill_facts.earlier_readers")
    _hourly_dag()["aggregate_current_day"].execute(_backfill_context(ti, 5, run_type))
    assert aggregate.call_args.args[2] == dt.date(2025, 11, 3)
    readers.assert_not_called()


def test_a_backfill_can_be_asked_to_aggregate_every_run(mocker):
    result = AggregationResult(usage_date="2025-11-03", merchant_id=None, table="merchant_usage")
    _, aggregate, ti = _run_with_result(mocker, result)
    readers = mocker.patch("usage_agg.backfill_facts.earlier_readers")
    operator = _hourly_dag()["aggregate_current_day"]
    operator.once_per_day_in_backfill = False
    operator.execute(_backfill_context(ti, 7))
    aggregate.assert_called_once()
    readers.assert_not_called()


def test_the_partition_plan_lists_every_part_and_skips_only_when_both_days_are_read_earlier(mocker):
    from airflow.providers.common.compat.sdk import AirflowSkipException
    from airflow.providers.common.compat.version_compat import AIRFLOW_V_3_0_PLUS

    mocker.patch("airflow.providers.redis.hooks.redis.RedisHook")
    mocker.patch("usage_agg.partitions.redis_partitions", return_value=["10.0.0.1:7000", "10.0.0.2:7000"])
    operator = _hourly_dag(fan_out=True)["plan_redis_partitions"]
    ti = mocker.MagicMock()
    both = [_reader(dt.date(2025, 11, 3)), _reader(dt.date(2025, 11, 2), hour=1)]
    parts = [
        {"redis_partition": "10.0.0.1:7000", "partition_count": 2},
        {"redis_partition": "10.0.0.2:7000", "partition_count": 2},
    ]
    mocker.patch("usage_agg.backfill_facts.earlier_readers", return_value=iter(both[:1]))
    assert operator.execute(_backfill_context(ti, 3)) == parts  # the day before is read by nobody earlier
    mocker.patch("usage_agg.backfill_facts.earlier_readers", return_value=iter(both))
    if AIRFLOW_V_3_0_PLUS:
        with pytest.raises(AirflowSkipException, match="Not planning"):
            operator.execute(_backfill_context(ti, 3))
    else:  # no parts: the scheduler skips the mapped tasks (a task skipping itself is avoided on 2.11)
        assert operator.execute(_backfill_context(ti, 3)) == []


def test_the_operator_hands_every_argument_down_as_one_options_object():
    from usage_agg.options import AggregationOptions

    operator = RedisUsageToPostgresOperator(
        task_id="t", merchant_id="acme", table="billing.usage", allow_decrease="True", batch_size=7,
        scan_count=11, lock_timeout_seconds=3.5, discovery="scan", redis_partition="10.0.0.1:7000",
        partition_count=3,
    )  # fmt: skip
    assert operator.aggregation_options() == AggregationOptions(
        merchant_id="acme", table="billing.usage", allow_decrease=True, batch_size=7, scan_count=11,
        lock_timeout=dt.timedelta(seconds=3.5), discovery="scan", partition="10.0.0.1:7000", partition_count=3,
    )  # fmt: skip
    operator.merchant_id = ""  # a template rendered empty: every merchant
    assert operator.aggregation_options().merchant_id is None
    operator.discovery = "everything"
    with pytest.raises(ValueError, match="discovery: must be one of"):
        operator.aggregation_options()
