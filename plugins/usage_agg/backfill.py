"""Which task of a backfill reads a day: the rule, as a pure function of what a task can see.

A backfill of the hourly DAG makes up to 24 runs a day, and each run has tasks that read a
day (``aggregate_current_day`` the run's day, ``aggregate_previous_day`` the day before). A
backfilled day's counters are final, so one read of it by the backfill is enough; a day that
no task of the backfill reads is usage the backfill silently did not count. The rule:

    A task of a backfill run leaves its day to another task only when that task reads the
    same day, belongs to a run that is provably part of the SAME backfill, comes from an
    earlier run (a smaller logical date, so leaving is never circular), and has not ended
    without reading (failed, upstream_failed, removed; it may be waiting, running, done, or
    have left the day in turn by this rule). Otherwise it reads the day.

Induction on the logical date then gives what matters: every day that a task of the backfill
was asked to read is read by a task of that backfill, or one of its runs fails (and so does
the backfill). The earliest task of the backfill that reads a day never leaves it to anyone.
Nothing here depends on a run at midnight: a range starting mid-day, a midnight run that is
not part of the backfill (it exists and is not reprocessed, or it is still running), or a
range whose last day has no next midnight are all the same case.

One day is asked of no task, though: a range's last day, when Airflow leaves its only run in
the range (its midnight) out of the backfill, because that run exists already. So a second
rule reads forward:

    A task that reads its run's own day ``d`` (it did not leave it) also reads ``d + 1`` when
    the runs of ``d + 1`` exist and none of them is provably part of the same backfill.

"None exist" is safe to leave: Airflow 3 creates every run of a backfill when the backfill is
created (a slot of the range holds the backfill's run or one that was there before), so a day
without runs is past the range; Airflow 2.11 creates each run of its range when it gets to it
and runs its tasks, so a day without runs yet is one it will read itself, or past the range.
The earliest run of the backfill on a day reads that day, so the day after is read whenever
the backfill has a run on the day before it (:func:`next_day_unread`). A day with no run of the
backfill on it, the day after or the day before is the one case left, and no rule can reach it:
no task of the backfill runs near it.

Which runs are "provably part of the same backfill" is all that differs between Airflow
versions; :mod:`usage_agg.backfill_facts` gathers it (it is deliberately conservative: a run
it cannot place is treated as another backfill's, and its task is not relied on):

- Airflow 3 (``airflow backfill create``): a task sees no backfill id. Only one backfill of a
  DAG is active at a time, every run of it is ``queued`` or ``running`` until it ends, and a run
  left out of it (existing and not reprocessed, or in flight at its creation) keeps its own run
  type or is already over. So a run of run type ``backfill`` that is still queued or running is
  part of the active backfill, which is this task's (:func:`in_backfill_v3`). A run of it that
  has already ended cannot be told from an earlier backfill's and is not relied on.
- Airflow 2.11 (``airflow dags backfill``): the CLI's backfill job queues every task it runs
  under its own job id (``queued_by_job_id``), so a task was run by this task's backfill when
  that id is this task's own (:func:`in_backfill_v2`). A task the backfill does not run (an
  existing run's task that already succeeded: 2.11 takes existing runs in but reruns only what
  has not finished) is not relied on.

Plain Python, no Airflow: tested over generated backfills in ``tests/unit/test_backfill_rule.py``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: A task in one of these states has read its day, will read it (or leave it by this rule), or
#: left it to an earlier task by this rule (``skipped`` on Airflow 3). ``None``: not scheduled yet.
COVERING_STATES: frozenset[str | None] = frozenset(
    {
        None,
        "scheduled",
        "queued",
        "running",
        "up_for_retry",
        "up_for_reschedule",
        "deferred",
        "restarting",
        "success",
        "skipped",
    }
)


@dataclass(frozen=True)
class Reader:
    """A task of another run of the DAG that reads ``day``, as the deciding task sees it now."""

    run_id: str
    logical_date: dt.datetime
    task_id: str
    day: dt.date
    #: its run (Airflow 3) or the task itself (Airflow 2.11) is provably part of the deciding task's backfill
    same_backfill: bool
    state: str | None


def day_of(logical_date: dt.datetime) -> dt.date:
    """The day a run's ``ds`` names: its logical date in UTC (the DAG's time zone)."""
    return logical_date.astimezone(dt.UTC).date()


def days_read(logical_date: dt.datetime, offsets: Iterable[int]) -> list[dt.date]:
    """The days a task with these day offsets reads in the run of ``logical_date``."""
    return [day_of(logical_date) + dt.timedelta(days=offset) for offset in offsets]


def readers_of(
    run_id: str,
    logical_date: dt.datetime,
    task_states: Mapping[str, str | None],
    offsets: Mapping[str, Iterable[int]],
    same_backfill: bool | Mapping[str, bool],
) -> list[Reader]:
    """The :class:`Reader` of every day the deciding tasks of one run read (``offsets``: task id ->
    day offsets), with each task's state (a task the run does not have: none)."""
    found = []
    for task_id, task_offsets in offsets.items():
        if task_id not in task_states:
            continue
        member = same_backfill if isinstance(same_backfill, bool) else same_backfill.get(task_id, False)
        for day in days_read(logical_date, task_offsets):
            found.append(Reader(run_id, logical_date, task_id, day, member, task_states[task_id]))
    return found


def first_window_start(days: Iterable[dt.date], offsets: Mapping[str, Iterable[int]]) -> dt.datetime:
    """The earliest logical date whose run can read one of ``days``: only runs from then on matter."""
    latest_offset = max((o for task_offsets in offsets.values() for o in task_offsets), default=0)
    first = min(days) - dt.timedelta(days=latest_offset)
    return dt.datetime.combine(first, dt.time(0), tzinfo=dt.UTC)


def covering_reader(day: dt.date, logical_date: dt.datetime, readers: Iterable[Reader]) -> Reader | None:
    """The task the deciding task (of the run of ``logical_date``, reading ``day``) may leave
    ``day`` to, or ``None``: it must read ``day`` itself. ``readers`` may be lazy; the first
    that qualifies is taken and the rest are not looked at."""
    for reader in readers:
        if (
            reader.day == day
            and reader.logical_date < logical_date
            and reader.same_backfill
            and reader.state in COVERING_STATES
        ):
            return reader
    return None


def in_backfill_v3(run_type: str | None, run_state: str | None) -> bool:
    """Airflow 3: whether another run is provably part of the (only) active backfill of its DAG."""
    return run_type == "backfill" and run_state in ("queued", "running")


def in_backfill_v2(queued_by_job_id: int | None, own_backfill_job_id: int | None) -> bool:
    """Airflow 2.11: whether another task was queued by the backfill job that queued this one."""
    return own_backfill_job_id is not None and queued_by_job_id == own_backfill_job_id


def next_day_unread(next_day_runs: Iterable[bool]) -> bool:
    """Whether a task that reads its run's day ``d`` must read ``d + 1`` too: ``next_day_runs``
    tells, for each run of the DAG on ``d + 1`` (in any order, lazily), whether it is provably part
    of the task's backfill. True when there is one and none is; the first member ends the walk."""
    any_run = False
    for member in next_day_runs:
        if member:
            return False
        any_run = True
    return any_run


def in_backfill_v2_run(creating_job_id: int | None, own_backfill_job_id: int | None) -> bool:
    """Airflow 2.11: whether another run was created by the backfill job running this task (it then
    runs all of that run's tasks, or fails)."""
    return in_backfill_v2(creating_job_id, own_backfill_job_id)


def why_not_reading(day: dt.date, logical_date: dt.datetime, reader: Reader) -> str:
    """The log line of a task that leaves ``day`` to ``reader``."""
    return (
        f"backfill run of {logical_date.astimezone(dt.UTC).isoformat()} leaves {day} to {reader.task_id} of "
        f"{reader.run_id} ({reader.logical_date.astimezone(dt.UTC).isoformat()}, {reader.state or 'not started'}), "
        "an earlier run of the same backfill that reads it"
    )


def why_reading_next_day(day: dt.date) -> str:
    """The log line of a task that reads the day after its own by :func:`next_day_unread`."""
    return (
        f"also aggregating {day}: it has runs and none is part of this backfill, so no other task of "
        "the backfill reads it (a range's last day whose midnight run existed before the backfill)"
    )
