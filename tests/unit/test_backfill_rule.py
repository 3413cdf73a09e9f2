"""The backfill rule (``usage_agg.backfill``) over generated backfills, on both Airflow versions' terms.

A small simulator plays one backfill of the hourly DAG over three days: the runs that already
exist in and around the range (every run type and state), the reprocess behaviour (Airflow 3:
none, failed, completed) or the rerun of failed tasks (Airflow 2.11), which runs Airflow puts in
the backfill as ``airflow backfill create`` / ``airflow dags backfill`` do (read from their code:
``airflow/models/backfill.py``, ``airflow/jobs/backfill_job_runner.py``), ranges starting mid-day
and ending mid-day or at a midnight, forwards and backwards, a few runs at a time, tasks in a
random order, reads that fail, runs outside the backfill ending meanwhile. Each task decides
with only what it could see in Airflow (the run types and states, the task states and, on 2.11,
who queued each task), through the same functions the operator uses.

The promises checked, unless a run of the backfill failed (so the backfill does not end in
success): every day a task of the backfill was asked to read is read by a task of the backfill;
and with the forward read, every day of the range that a task the backfill executes is asked to
read, or that follows the day of one reading its run's own day. That covers a range's last day
whose only run, its midnight, Airflow left out of the backfill.
"""

from __future__ import annotations

import datetime as dt
import random
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usage_agg.backfill import (
    COVERING_STATES,
    Reader,
    covering_reader,
    days_read,
    first_window_start,
    in_backfill_v2,
    in_backfill_v2_run,
    in_backfill_v3,
    next_day_unread,
    readers_of,
    why_not_reading,
    why_reading_next_day,
)

#: the hourly DAG's readers, and with the fan-out the planner deciding for both days
READERS = {"aggregate_current_day": (0,), "aggregate_previous_day": (-1,)}
FAN_OUT = {"plan_redis_partitions": (-1, 0)}
FIRST = dt.datetime(2025, 10, 20, tzinfo=dt.UTC)
HOURS = [FIRST + dt.timedelta(hours=h) for h in range(-24, 24 * 4)]  # the day before to the day after
SCHEDULER_JOB, OLD_BACKFILL_JOB, BACKFILL_JOB = 1, 7, 42
IN_FLIGHT = ("queued", "running")


@dataclass
class Task:
    state: str | None = None
    queued_by: int | None = None


@dataclass
class Run:
    run_id: str
    logical_date: dt.datetime
    run_type: str
    state: str
    tasks: dict[str, Task]
    in_backfill: bool = False
    to_execute: list[str] = field(default_factory=list)
    creating_job: int | None = None


@dataclass(frozen=True)
class Existing:
    run_type: str
    state: str
    task_states: tuple[str | None, ...]  # one per decider, in order


@dataclass(frozen=True)
class Scenario:
    version: int
    reprocess: str  # 3: none | failed | completed; 2.11: plain | rerun_failed
    deciders: dict
    start: int  # index into HOURS
    end: int
    existing: dict  # index into HOURS -> Existing
    max_active: int
    reverse: bool
    fail_reads: bool
    seed: int


def _task_states_for(run_state: str, n: int) -> st.SearchStrategy[tuple]:
    if run_state == "success":
        return st.just(("success",) * n)
    if run_state == "failed":
        return st.lists(st.sampled_from(["success", "failed", "upstream_failed"]), min_size=n, max_size=n).filter(
            lambda s: "failed" in s
        ).map(tuple)
    return st.lists(st.sampled_from([None, "scheduled", "queued", "running", "success"]), min_size=n, max_size=n).map(
        tuple
    )


@st.composite
def scenarios(draw) -> Scenario:
    version = draw(st.sampled_from([3, 2]))
    deciders = draw(st.sampled_from([READERS, FAN_OUT]))
    reprocess = draw(st.sampled_from(["none", "failed", "completed"] if version == 3 else ["plain", "rerun_failed"]))
    # a range from a midnight or mid-day of the first day to a midnight or mid-day of the last
    start = 24 + draw(st.sampled_from([0, 0, 5, 23]))
    end = 24 * 3 + draw(st.sampled_from([0, 0, 0, 7, 23]))
    midnights = [i for i in range(len(HOURS)) if HOURS[i].hour == 0]

    @st.composite
    def existing_run(draw):
        if version == 3:
            run_type = draw(st.sampled_from(["scheduled", "manual", "backfill"]))
            # A run of an earlier backfill still in flight cannot be told from this backfill's (there
            # is one active backfill per DAG); only a cancelled backfill's running runs are, not modelled.
            states = ["success", "failed"] + ([] if run_type == "backfill" else ["queued", "running"])
        else:
            run_type = draw(st.sampled_from(["scheduled", "manual", "backfill"]))
            states = ["success", "failed"]
        state = draw(st.sampled_from(states))
        return Existing(run_type, state, draw(_task_states_for(state, len(deciders))))

    existing = draw(st.dictionaries(st.sampled_from(midnights), existing_run(), max_size=len(midnights)))
    existing |= draw(st.dictionaries(st.sampled_from(range(len(HOURS))), existing_run(), max_size=12))
    return Scenario(
        version=version,
        reprocess=reprocess,
        deciders=deciders,
        start=start,
        end=end,
        existing=existing,
        max_active=draw(st.integers(1, 10)),
        reverse=draw(st.booleans()),
        fail_reads=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32)),
    )


def _existing_runs(scenario: Scenario) -> dict[dt.datetime, Run]:
    runs = {}
    for i, spec in scenario.existing.items():
        when = HOURS[i]
        job = OLD_BACKFILL_JOB if spec.run_type == "backfill" else SCHEDULER_JOB
        tasks = {
            task_id: Task(state, None if state is None else job)
            for task_id, state in zip(scenario.deciders, spec.task_states, strict=True)
        }
        run_id = f"{spec.run_type}__{when.isoformat()}"
        runs[when] = Run(run_id, when, spec.run_type, spec.state, tasks, creating_job=job)
    return runs


def _observed_readers(runs: dict, me: Run, task_id: str, deciders: dict, version: int, days: list) -> list[Reader]:
    """What the task could see: the earlier runs' deciding tasks, nearest first (as backfill_facts)."""
    since = first_window_start(days, deciders)
    own_job = me.tasks[task_id].queued_by
    found = []
    for when in sorted((w for w in runs if since <= w < me.logical_date), reverse=True):
        run = runs[when]
        states = {t: task.state for t, task in run.tasks.items()}
        if version == 3:
            if not in_backfill_v3(run.run_type, run.state):
                continue
            members: bool | dict = True
        else:
            members = {t: in_backfill_v2(task.queued_by, own_job) for t, task in run.tasks.items()}
        found += readers_of(run.run_id, when, states, deciders, members)
    return found


def _observed_next_day(runs: dict, me: Run, task_id: str, day: dt.date, deciders: dict, version: int) -> list[bool]:
    """What the task could see of the runs on ``day`` (as backfill_facts.runs_of_day): members or not."""
    own_job = me.tasks[task_id].queued_by
    own_day_readers = [t for t, offsets in deciders.items() if 0 in offsets]
    found = []
    for when in sorted((w for w in runs if w.date() == day), reverse=True):
        run = runs[when]
        if version == 3:
            found.append(in_backfill_v3(run.run_type, run.state))
        else:
            found.append(
                in_backfill_v2_run(run.creating_job, own_job)
                or any(in_backfill_v2(run.tasks[t].queued_by, own_job) for t in own_day_readers if t in run.tasks)
            )
    return found


@dataclass
class Outcome:
    asked: set
    read: set
    failed: bool
    #: the days of the range that a task the backfill executes is asked to read, or that follow the day
    #: of one that reads its run's own day (the forward read)
    near: set
    #: how many times each day was read: reading a day more than needed is safe, but costs
    reads: dict


def simulate(scenario: Scenario, decide=None, forward: bool = True) -> Outcome:
    """Play the backfill; return the days its tasks were asked to read, the days they read, and
    whether a run of the backfill failed. ``decide`` replaces the rule (to show a wrong one fails);
    ``forward=False`` leaves out the forward read."""
    rng = random.Random(scenario.seed)
    runs = _existing_runs(scenario)
    others_in_flight = [run for run in runs.values() if run.state in IN_FLIGHT]
    backfill: list[Run] = []
    for when in HOURS[scenario.start : scenario.end + 1]:
        run = runs.get(when)
        if scenario.version == 3:
            if run is None:
                run = runs[when] = Run(f"backfill__{when.isoformat()}", when, "backfill", "queued", {})
                run.tasks = {t: Task() for t in scenario.deciders}
            elif run.state in IN_FLIGHT or scenario.reprocess == "none":
                continue
            elif scenario.reprocess == "failed" and run.state != "failed":
                continue
            else:  # cleared into the backfill: its tasks start afresh
                run.run_type, run.state = "backfill", "queued"
                run.tasks = {t: Task() for t in scenario.deciders}
            run.to_execute = list(scenario.deciders)
        else:  # 2.11 takes every run of the range, creating it when it gets to it
            if run is None:
                run = Run(f"backfill__{when.isoformat()}", when, "backfill", "none yet", {})
                run.tasks = {t: Task() for t in scenario.deciders}
                run.creating_job = BACKFILL_JOB
            for task in run.tasks.values():
                if task.state in ("failed", "upstream_failed") and scenario.reprocess == "rerun_failed":
                    task.state, task.queued_by = None, None
            run.to_execute = [t for t, task in run.tasks.items() if task.state is None]
        run.in_backfill = True
        backfill.append(run)
    order = list(reversed(backfill)) if scenario.reverse else list(backfill)
    executes = [(run, list(run.to_execute)) for run in backfill if run.to_execute]

    asked, read = set(), set()
    reads: Counter = Counter()  # how many times each day is read
    active: list[Run] = []
    while order or active:
        while order and len(active) < scenario.max_active:
            run = order.pop(0)
            run.state = "running"
            if scenario.version == 2:  # 2.11 creates the run now, or takes the existing one in
                run.run_type = "backfill"
                runs[run.logical_date] = run
            for t in run.to_execute:
                run.tasks[t] = Task("queued", BACKFILL_JOB if scenario.version == 2 else None)
            active.append(run)
        if others_in_flight and rng.random() < 0.2:  # a run outside the backfill ends meanwhile
            other = others_in_flight.pop(rng.randrange(len(others_in_flight)))
            for task in other.tasks.values():
                task.state = "success" if task.state != "failed" else "failed"
            other.state = "failed" if any(t.state == "failed" for t in other.tasks.values()) else "success"
        run = rng.choice(active)
        if run.to_execute:
            task_id = run.to_execute.pop(rng.randrange(len(run.to_execute)))
            days = days_read(run.logical_date, scenario.deciders[task_id])
            asked.update(days)
            if decide is not None:
                leave = decide(run, days)
            else:
                readers = _observed_readers(runs, run, task_id, scenario.deciders, scenario.version, days)
                leave = all(covering_reader(day, run.logical_date, readers) for day in days)
            task = run.tasks[task_id]
            if leave:
                task.state = "skipped" if scenario.version == 3 else "success"
            elif scenario.fail_reads and rng.random() < 0.15:
                task.state = "failed"
            else:
                read.update(days)
                reads.update(days)
                own_day = run.logical_date.date()
                if forward and 0 in scenario.deciders[task_id]:
                    following = own_day + dt.timedelta(days=1)
                    observed = _observed_next_day(runs, run, task_id, following, scenario.deciders, scenario.version)
                    if next_day_unread(observed):
                        read.add(following)
                        reads[following] += 1
                task.state = "success"
        if not run.to_execute:
            done = {t.state for t in run.tasks.values()}
            run.state = "failed" if done & {"failed", "upstream_failed"} else "success"
            active.remove(run)
    range_days = {when.date() for when in HOURS[scenario.start : scenario.end + 1]}
    near = set()  # the days an executing task is asked to read, and those after its own day (forward)
    for run, task_ids in executes:
        for task_id in task_ids:
            near.update(days_read(run.logical_date, scenario.deciders[task_id]))
            if 0 in scenario.deciders[task_id]:
                near.add(run.logical_date.date() + dt.timedelta(days=1))
    near &= range_days
    return Outcome(asked, read, any(run.state == "failed" for run in backfill), near, dict(reads))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_every_day_the_backfill_is_asked_to_read_is_read_by_it_or_it_fails(scenario):
    done = simulate(scenario)
    assert done.failed or done.asked <= done.read, f"unread: {sorted(done.asked - done.read)}"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_every_day_of_the_range_near_a_run_of_the_backfill_is_read_by_it_or_it_fails(scenario):
    done = simulate(scenario)
    assert done.failed or done.near <= done.read, f"unread: {sorted(done.near - done.read)}"


#: a range of three days (2025-10-20 to 2025-10-22 00:00) whose last midnight failed before the backfill
LAST_MIDNIGHT_FAILED = {72: Existing("scheduled", "failed", ("failed", "success"))}


def test_a_range_end_whose_only_run_is_left_out_is_read_by_the_day_before():
    """A range's last day has one run in the range, its midnight. If Airflow leaves that run out of the
    backfill (3.3: it exists and is not reprocessed), no task is asked to read the day: the earliest run
    of the day before reads it forward. Without the forward read, it is not read and the backfill succeeds."""
    scenario = Scenario(3, "none", READERS, 24, 72, LAST_MIDNIGHT_FAILED, 10, False, False, 0)
    before = simulate(scenario, forward=False)
    assert dt.date(2025, 10, 22) not in before.read and not before.failed
    done = simulate(scenario)
    assert dt.date(2025, 10, 22) in done.read and not done.failed


def test_on_2_11_a_last_midnight_that_succeeded_before_is_read_forward():
    existing = {72: Existing("scheduled", "success", ("success", "success"))}
    scenario = Scenario(2, "plain", READERS, 24, 72, existing, 8, False, False, 1)
    assert dt.date(2025, 10, 22) not in simulate(scenario, forward=False).read
    done = simulate(scenario)
    assert dt.date(2025, 10, 22) in done.read and not done.failed


def test_on_2_11_a_last_midnight_whose_day_before_task_is_rerun_is_still_read_forward():
    """Found by the property: 2.11 with --rerun-failed-tasks reruns only the failed task of an existing
    run. When that is the midnight's aggregate_previous_day, the run is the backfill's but does not read
    its own day: only a run whose task reading its own day the backfill runs is relied on."""
    existing = {72: Existing("scheduled", "failed", ("success", "failed"))}
    scenario = Scenario(2, "rerun_failed", READERS, 24, 72, existing, 1, True, False, 0)
    done = simulate(scenario)
    assert dt.date(2025, 10, 22) in done.near and dt.date(2025, 10, 22) in done.read and not done.failed


def test_a_day_whose_runs_are_this_backfills_is_not_read_forward():
    """The forward read costs one read of a day only where it is needed: in a plain range whose runs are
    all the backfill's, the next day's runs are members and no task reads ahead."""
    for version, reprocess in ((3, "none"), (2, "plain")):
        scenario = Scenario(version, reprocess, READERS, 24, 72, {}, 1, False, False, 2)
        assert next_day_unread([]) is False  # past the range: no run there
        assert simulate(scenario).read == simulate(scenario, forward=False).read


@pytest.mark.parametrize(("deciders", "most"), [(READERS, 1), (FAN_OUT, 2)], ids=["readers", "fan-out"])
def test_a_2_11_backfill_over_a_range_without_runs_reads_each_day_once(deciders, most):
    """The rule's point is cost as much as coverage: on 2.11 (which relies on every task its job
    queued) one read per day, two with the fan-out (its planner plans both days of a run when one
    needs reading); a rule that relied on no other task would read each day 24 times and still
    cover every day. Airflow 3.3 relies only on runs still queued or running, so a day is read
    once per stretch of its runs that ran one after another (the README's "1 to 16")."""
    done = simulate(Scenario(2, "plain", deciders, 24, 72, {}, 8, False, False, 4))
    assert not done.failed and done.asked <= done.read
    assert max(done.reads.values()) == most and min(done.reads.values()) == 1, done.reads


def test_on_3_3_runs_still_running_are_relied_on():
    """All the backfill's runs in flight at once: later runs leave their days to the earlier, far
    fewer reads than runs (48 runs read 2025-10-20 and 2025-10-21)."""
    done = simulate(Scenario(3, "none", READERS, 24, 72, {}, 49, False, False, 6))
    assert not done.failed and done.asked <= done.read
    assert sum(done.reads.values()) < 24, done.reads


def test_on_2_11_a_day_whose_midnight_ran_before_is_read_forward_once_and_by_its_own_runs():
    """2025-10-21 00:00 ran before the backfill and is not rerun: the day before reads 2025-10-21
    forward (its runs exist, none is the backfill's yet), and its own 01:00 run reads it too: two
    reads, the forward read's price where a day's runs exist only in part; every other day once."""
    existing = {48: Existing("scheduled", "success", ("success", "success"))}
    done = simulate(Scenario(2, "plain", READERS, 24, 72, existing, 8, False, False, 5))
    assert not done.failed and done.asked <= done.read
    assert done.reads == {
        dt.date(2025, 10, 19): 1, dt.date(2025, 10, 20): 1, dt.date(2025, 10, 21): 2, dt.date(2025, 10, 22): 1
    }


def test_readers_of_names_each_task_of_a_run_with_its_day_and_membership():
    when = dt.datetime(2025, 10, 21, 5, tzinfo=dt.UTC)
    states = {"aggregate_current_day": "success", "aggregate_previous_day": "failed", "other": "success"}
    found = readers_of("r1", when, states, READERS, {"aggregate_current_day": True})
    assert found == [
        Reader("r1", when, "aggregate_current_day", dt.date(2025, 10, 21), True, "success"),
        Reader("r1", when, "aggregate_previous_day", dt.date(2025, 10, 20), False, "failed"),
    ]
    assert readers_of("r1", when, {"aggregate_current_day": None}, READERS, True) == [
        Reader("r1", when, "aggregate_current_day", dt.date(2025, 10, 21), True, None)
    ]  # a task the run does not have (aggregate_previous_day) reads nothing


def test_the_log_lines_name_the_day_the_run_and_the_reader():
    when = dt.datetime(2025, 10, 21, 5, tzinfo=dt.UTC)
    reader = Reader("backfill__r4", when - dt.timedelta(hours=1), "aggregate_current_day", when.date(), True, None)
    assert why_not_reading(when.date(), when, reader) == (
        "backfill run of 2025-10-21T05:00:00+00:00 leaves 2025-10-21 to aggregate_current_day of backfill__r4 "
        "(2025-10-21T04:00:00+00:00, not started), an earlier run of the same backfill that reads it"
    )
    assert why_reading_next_day(dt.date(2025, 10, 22)).startswith("also aggregating 2025-10-22: it has runs and none")


def test_membership_by_the_creating_job_on_2_11():
    assert in_backfill_v2_run(42, 42)
    assert not in_backfill_v2_run(1, 42) and not in_backfill_v2_run(None, 42) and not in_backfill_v2_run(42, None)


def test_the_next_day_rule():
    assert next_day_unread([False]) and next_day_unread([False, False])
    assert not next_day_unread([]) and not next_day_unread([True]) and not next_day_unread([False, True])
    walked = []

    def lazy():
        for member in (False, True, False):
            walked.append(member)
            yield member

    assert not next_day_unread(lazy()) and walked == [False, True]  # the first member ends the walk


def _midnight_rule(run: Run, days: list) -> bool:
    """The rule before: a backfill run after midnight left its day to the midnight run, whatever that was."""
    return run.logical_date.hour != 0


def test_the_simulator_finds_the_midnight_rule_leaving_days_unread():
    """The reported case: a plain 3.3 backfill over three days whose first two midnights failed."""
    existing = {24 + 24 * n: Existing("scheduled", "failed", ("failed", "success")) for n in (0, 1)}
    scenario = Scenario(3, "none", READERS, 24, 72, existing, 10, False, False, 0)
    done = simulate(scenario, decide=_midnight_rule)
    assert not done.failed and dt.date(2025, 10, 20) in done.asked - done.read
    done = simulate(scenario)
    assert not done.failed and done.asked <= done.read


def test_on_2_11_a_midnight_whose_tasks_succeeded_before_is_not_relied_on():
    existing = {i: Existing("manual", "success", ("success", "success")) for i in (24, 48)}
    scenario = Scenario(2, "plain", READERS, 24, 72, existing, 8, False, False, 3)
    done = simulate(scenario, decide=_midnight_rule)
    assert dt.date(2025, 10, 20) in done.asked - done.read
    done = simulate(scenario)
    assert not done.failed and done.asked <= done.read


@pytest.mark.parametrize("state", sorted(COVERING_STATES, key=str))
def test_a_task_of_the_same_backfill_in_a_covering_state_is_left_the_day(state):
    when = dt.datetime(2025, 10, 20, 5, tzinfo=dt.UTC)
    reader = Reader("r", when - dt.timedelta(hours=1), "aggregate_current_day", when.date(), True, state)
    assert covering_reader(when.date(), when, [reader]) == reader


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"same_backfill": False}, "another backfill's, or none"),
        ({"state": "failed"}, "ended without reading"),
        ({"state": "upstream_failed"}, "ended without reading"),
        ({"state": "removed"}, "ended without reading"),
        ({"logical_date": dt.datetime(2025, 10, 20, 5, tzinfo=dt.UTC)}, "not earlier"),
        ({"day": dt.date(2025, 10, 19)}, "another day"),
    ],
)
def test_no_other_task_is_left_the_day(change, why):
    when = dt.datetime(2025, 10, 20, 5, tzinfo=dt.UTC)
    fields = {
        "run_id": "r",
        "logical_date": when - dt.timedelta(hours=1),
        "task_id": "aggregate_current_day",
        "day": when.date(),
        "same_backfill": True,
        "state": "success",
    }
    assert covering_reader(when.date(), when, [Reader(**{**fields, **change})]) is None, why


def test_membership_on_each_version():
    assert in_backfill_v3("backfill", "running") and in_backfill_v3("backfill", "queued")
    assert not in_backfill_v3("backfill", "success")  # may be an earlier backfill's: not relied on
    assert not in_backfill_v3("scheduled", "running") and not in_backfill_v3("manual", "queued")
    assert in_backfill_v2(42, 42)
    assert not in_backfill_v2(1, 42) and not in_backfill_v2(None, 42) and not in_backfill_v2(None, None)


def test_the_window_of_runs_that_can_read_a_day():
    assert first_window_start([dt.date(2025, 10, 20)], READERS) == dt.datetime(2025, 10, 20, tzinfo=dt.UTC)
    assert first_window_start([dt.date(2025, 10, 19), dt.date(2025, 10, 20)], FAN_OUT) == dt.datetime(
        2025, 10, 19, tzinfo=dt.UTC
    )
