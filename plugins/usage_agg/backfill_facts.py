"""What a task of a backfill run can learn about the earlier runs of its DAG: the one place where
Airflow 3 and Airflow 2.11 differ. The rule that decides on these facts is :mod:`usage_agg.backfill`.

- Airflow 3: tasks run under the Task SDK, without the metadata DB. The run in the context has a
  run type but no backfill id; the SDK's supervisor answers "the run before this logical date"
  (``GetPreviousDagRun``, which :meth:`RuntimeTaskInstance.get_previous_dagrun` sends for the
  task's own date) with the run's type and state, and ``get_task_states`` with its tasks' states.
  The earlier runs are walked back one at a time, nearest first, and only as far as needed: the
  first that qualifies ends the walk (usually the run an hour before).
- Airflow 2.11: tasks have the ORM. The backfill CLI queues each task it runs with its own job id
  (``TaskInstance.queued_by_job_id``), which the task's own instance carries: one query reads the
  earlier runs' tasks with theirs, and the runs it created carry its id (``DagRun.creating_job_id``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from typing import Any

from airflow.providers.common.compat.version_compat import AIRFLOW_V_3_0_PLUS

from usage_agg.backfill import Reader, in_backfill_v2, in_backfill_v2_run, in_backfill_v3, readers_of


def _value(enum_or_str: Any) -> str | None:
    return None if enum_or_str is None else str(getattr(enum_or_str, "value", enum_or_str))


def earlier_readers(
    context: Any, logical_date: dt.datetime, since: dt.datetime, offsets: Mapping[str, tuple[int, ...]]
) -> Iterator[Reader]:
    """The readers (``offsets``: task id -> day offsets) of the DAG's runs with a logical date in
    ``[since, logical_date)``, nearest first; lazy on Airflow 3."""
    ti = context["ti"]
    if AIRFLOW_V_3_0_PLUS:
        return _earlier_readers_v3(ti, logical_date, since, offsets)
    return iter(_earlier_readers_v2(ti, logical_date, since, offsets))


def runs_of_day(context: Any, day: dt.date, offsets: Mapping[str, tuple[int, ...]]) -> Iterator[bool]:
    """For each run of the DAG with a logical date on ``day``, whether it is provably part of the
    task's backfill and reads ``day`` there (Airflow 3: a run of the backfill runs all its tasks;
    latest first and lazily, the first member ending the walk. Airflow 2.11: a run its job created,
    or whose task reading the run's own day, of ``offsets``, it queued: 2.11 reruns only some tasks
    of a run it takes in, and a rerun task that reads the day before does not read ``day``)."""
    ti = context["ti"]
    start = dt.datetime.combine(day, dt.time(0), tzinfo=dt.UTC)
    end = start + dt.timedelta(days=1)
    if AIRFLOW_V_3_0_PLUS:
        return _runs_of_day_v3(ti, start, end)
    own_day_readers = [task_id for task_id, task_offsets in offsets.items() if 0 in task_offsets]
    return iter(_runs_of_day_v2(ti, start, end, own_day_readers))


def _runs_of_day_v3(ti: Any, start: dt.datetime, end: dt.datetime) -> Iterator[bool]:
    from airflow.sdk.execution_time.comms import GetPreviousDagRun, PreviousDagRunResult
    from airflow.sdk.execution_time.task_runner import SUPERVISOR_COMMS

    before = end
    while True:
        response = SUPERVISOR_COMMS.send(GetPreviousDagRun(dag_id=ti.dag_id, logical_date=before))
        if not isinstance(response, PreviousDagRunResult):
            # no answer to rely on: a run not provably this backfill's, so the day is read
            yield False
            return
        run = response.dag_run
        if run is None or run.logical_date is None or run.logical_date < start:
            return
        before = run.logical_date
        yield in_backfill_v3(_value(run.run_type), _value(run.state))


def _runs_of_day_v2(ti: Any, start: dt.datetime, end: dt.datetime, own_day_readers: list[str]) -> list[bool]:
    from airflow.models import DagRun, TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import and_, select

    with create_session() as session:
        backfill_job = _own_backfill_job(session, ti)
        rows = session.execute(
            select(DagRun.run_id, DagRun.creating_job_id, TaskInstance.queued_by_job_id)
            .outerjoin(
                TaskInstance,
                and_(
                    TaskInstance.dag_id == DagRun.dag_id,
                    TaskInstance.run_id == DagRun.run_id,
                    TaskInstance.task_id.in_(own_day_readers),
                    TaskInstance.map_index == -1,
                ),
            )
            .where(DagRun.dag_id == ti.dag_id, DagRun.execution_date >= start, DagRun.execution_date < end)
        ).all()
    members: dict[str, bool] = {}
    for run_id, creating_job, queued_by in rows:
        member = in_backfill_v2_run(creating_job, backfill_job) or in_backfill_v2(queued_by, backfill_job)
        members[run_id] = members.get(run_id, False) or member
    return list(members.values())


def _own_backfill_job(session: Any, ti: Any) -> int | None:
    """The id of the backfill job that queued ``ti``, or ``None`` (not queued by a backfill)."""
    from airflow.jobs.job import Job
    from sqlalchemy import select

    own_job = ti.queued_by_job_id
    job_type = session.scalar(select(Job.job_type).where(Job.id == own_job)) if own_job else None
    return own_job if job_type == "BackfillJob" else None


def _earlier_readers_v3(
    ti: Any, logical_date: dt.datetime, since: dt.datetime, offsets: Mapping[str, tuple[int, ...]]
) -> Iterator[Reader]:
    from airflow.sdk.execution_time.comms import GetPreviousDagRun, PreviousDagRunResult
    from airflow.sdk.execution_time.task_runner import SUPERVISOR_COMMS

    before = logical_date
    while True:
        response = SUPERVISOR_COMMS.send(GetPreviousDagRun(dag_id=ti.dag_id, logical_date=before))
        if not isinstance(response, PreviousDagRunResult):
            return  # no answer to rely on: the day is read
        run = response.dag_run
        if run is None or run.logical_date is None or run.logical_date < since:
            return
        before = run.logical_date
        if not in_backfill_v3(_value(run.run_type), _value(run.state)):
            continue  # not relied on: its tasks' states do not matter
        states = ti.get_task_states(dag_id=ti.dag_id, task_ids=list(offsets), run_ids=[run.run_id])
        task_states = {task: _value(state) for task, state in states.get(run.run_id, {}).items()}
        yield from readers_of(run.run_id, run.logical_date, task_states, offsets, True)


def _earlier_readers_v2(
    ti: Any, logical_date: dt.datetime, since: dt.datetime, offsets: Mapping[str, tuple[int, ...]]
) -> list[Reader]:
    from airflow.models import DagRun, TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import and_, select

    run_date = DagRun.execution_date  # Airflow 2's name of the logical date
    with create_session() as session:
        backfill_job = _own_backfill_job(session, ti)
        rows = session.execute(
            select(DagRun.run_id, run_date, TaskInstance.task_id, TaskInstance.state, TaskInstance.queued_by_job_id)
            .join(TaskInstance, and_(TaskInstance.dag_id == DagRun.dag_id, TaskInstance.run_id == DagRun.run_id))
            .where(
                DagRun.dag_id == ti.dag_id,
                run_date >= since,
                run_date < logical_date,
                TaskInstance.task_id.in_(list(offsets)),
                TaskInstance.map_index == -1,
            )
            .order_by(run_date.desc())
        ).all()
    runs: dict[str, tuple[dt.datetime, dict[str, str | None], dict[str, bool]]] = {}
    for run_id, when, task_id, state, queued_by in rows:
        _, states, members = runs.setdefault(run_id, (when, {}, {}))
        states[task_id] = _value(state)
        members[task_id] = in_backfill_v2(queued_by, backfill_job)
    return [
        reader
        for run_id, (when, states, members) in runs.items()
        for reader in readers_of(run_id, when, states, offsets, members)
    ]
