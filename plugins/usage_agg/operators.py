"""``RedisUsageToPostgresOperator``: Airflow's hooks around :func:`usage_agg.aggregate.aggregate_day`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowFailException, AirflowSkipException, BaseOperator
from airflow.providers.common.compat.version_compat import AIRFLOW_V_3_0_PLUS

from usage_agg import metrics
from usage_agg.aggregate import AggregationResult, aggregate_day
from usage_agg.assets import changed, record_events, record_rescue_events
from usage_agg.audit import mark_announced, mark_not_announced, unannounced_dates
from usage_agg.identifiers import TableName
from usage_agg.keys import parse_date
from usage_agg.lock_waits import DEFAULT_LOCK_TIMEOUT
from usage_agg.options import AggregationOptions
from usage_agg.schema import schema_is_current
from usage_agg.source import DEFAULT_BATCH_SIZE, DEFAULT_SCAN_COUNT

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

DEFAULT_REDIS_CONN_ID = "usage_redis"
DEFAULT_POSTGRES_CONN_ID = "usage_postgres"


class RedisUsageToPostgresOperator(BaseOperator):
    """
    Copy one day's merchant usage counters from Redis into a PostgreSQL table.

    Redis keys ``usage:{merchant_id}:{YYYY-MM-DD}:{metric_type}`` hold each day's
    running total; the table takes that absolute value, so reruns never double
    count. Stored totals are never zeroed or deleted, and never lowered unless
    ``allow_decrease`` is set: a counter that Redis lost (a restart, failover, restore
    or eviction) is a *reset*, which keeps what was counted and adds what is counted
    after it, and alerts. Each date is written in one transaction.

    Bad keys (unparseable, not a non-negative bigint, not a string) never block good
    ones: good keys are committed, bad ones are logged and recorded as dead letters.
    The task then fails without retries if any bad key is new (not reported by an
    earlier run), so it alerts once per bad key instead of every hour.

    :param usage_date: the day to aggregate, ``YYYY-MM-DD`` (templated). When empty,
        the run's ``ds``, or today's UTC date for a run without a logical date.
    :param day_offset: days added to the resolved date; ``-1`` aggregates the day before.
    :param merchant_id: aggregate this merchant only; ``None`` (or empty once rendered)
        for every merchant (templated)
    :param table: target table, ``name`` or ``schema.name`` (templated)
    :param allow_decrease: Redis is the truth: set each row to its Redis value, even lower,
        and forget what earlier resets kept (templated)
    :param redis_conn_id: Airflow connection to Redis (templated)
    :param postgres_conn_id: Airflow connection to PostgreSQL (templated)
    :param batch_size: keys read per pipelined round trip and staged per ``COPY``
    :param scan_count: the ``COUNT`` hint of each ``SCAN``
    :param lock_timeout_seconds: how long to wait for another writer of the same date
    :param discovery: how keys are found: ``auto`` (the day's index written by
        ``usage_agg.tracking`` when it exists, else ``SCAN``), ``index`` or ``scan``
    :param once_per_day_in_backfill: in a backfill, leave the day to an earlier run of the
        same backfill that reads it, and skip (see :mod:`usage_agg.backfill` for the rule).
        Scheduled and manual runs always aggregate.
    :param redis_partition: aggregate only this Redis Cluster primary's keys (``host:port``),
        one part of a fanned-out day; mapped from :class:`RedisPartitionsOperator`
    :param partition_count: how many parts the day was split into (with ``redis_partition``)
    """

    template_fields: Sequence[str] = (
        "usage_date",
        "merchant_id",
        "table",
        "allow_decrease",
        "redis_conn_id",
        "postgres_conn_id",
    )
    ui_color = "#e8f4ea"

    def __init__(  # noqa: PLR0913  (an operator takes each setting as a keyword, as Airflow's own do)
        self,
        *,
        usage_date: str | None = None,
        day_offset: int = 0,
        merchant_id: str | None = None,
        table: str = "merchant_usage",
        allow_decrease: bool | str = False,
        redis_conn_id: str = DEFAULT_REDIS_CONN_ID,
        postgres_conn_id: str = DEFAULT_POSTGRES_CONN_ID,
        batch_size: int = DEFAULT_BATCH_SIZE,
        scan_count: int = DEFAULT_SCAN_COUNT,
        lock_timeout_seconds: float = DEFAULT_LOCK_TIMEOUT.total_seconds(),
        discovery: str = "auto",
        once_per_day_in_backfill: bool = True,
        redis_partition: str | None = None,
        partition_count: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.discovery = discovery
        self.once_per_day_in_backfill = once_per_day_in_backfill
        #: the day read as declared (rendering replaces usage_date and day_offset by the date itself)
        self.reads_run_day_offset: int | None = None if usage_date else day_offset
        self.redis_partition = redis_partition
        self.partition_count = partition_count
        self.usage_date = usage_date
        self.day_offset = day_offset
        self.merchant_id = merchant_id
        self.table = table
        self.allow_decrease = allow_decrease
        self.redis_conn_id = redis_conn_id
        self.postgres_conn_id = postgres_conn_id
        self.batch_size = batch_size
        self.scan_count = scan_count
        self.lock_timeout_seconds = lock_timeout_seconds

    _lineage_endpoints: dict | None = None

    def render_template_fields(self, context: Context, jinja_env=None) -> None:
        """Render, then resolve ``usage_date`` to the date this task reads, offset applied.

        So the UI's Rendered Template shows the date itself (``2025-11-01``), also for a
        run without a logical date, instead of an empty field. A date that does not
        resolve is left as rendered; :meth:`execute` refuses it with the reason.
        """
        super().render_template_fields(context, jinja_env)
        try:
            day = resolve_usage_date(self.usage_date, context, self.day_offset)
        except ValueError:
            return
        self.usage_date, self.day_offset = day.isoformat(), 0

    def aggregation_options(self) -> AggregationOptions:
        """The rendered arguments as one :class:`AggregationOptions`; ``ValueError`` names a bad one."""
        return AggregationOptions(
            merchant_id=self.merchant_id or None,
            table=self.table,
            allow_decrease=as_bool(self.allow_decrease, field="allow_decrease"),
            batch_size=self.batch_size,
            scan_count=self.scan_count,
            lock_timeout=dt.timedelta(seconds=self.lock_timeout_seconds),
            discovery=self.discovery,
            partition=self.redis_partition,
            partition_count=self.partition_count,
        )

    def execute(self, context: Context) -> dict:
        try:
            day = resolve_usage_date(self.usage_date, context, self.day_offset)
            options = self.aggregation_options()
        except ValueError as err:  # a configuration error: retrying cannot fix it
            raise AirflowFailException(str(err)) from None
        # A fanned-out part was planned by RedisPartitionsOperator, which decided for the run.
        if self.redis_partition is None and (why := repeated_backfill_work(context, self)):
            if AIRFLOW_V_3_0_PLUS:
                raise AirflowSkipException(f"Not aggregating {day}: {why}")
            # Airflow 2.11's backfill: a task that skips itself writes back the run it loaded
            # at its start, and now and then that stale copy (state running) overwrites the
            # run's final state, leaving a finished run "running" that holds a max_active_runs
            # slot. Succeeding at once, with nothing to announce, does not.
            self.log.info("Not aggregating %s: %s", day, why)
            self.outlets = []  # no asset event: nothing was written
            return {"usage_date": day.isoformat(), "not_aggregated": why}

        result = self._aggregate(day, options, context, lineage=True)
        next_result = None
        if next_day := backfill_next_day(context, self, day):
            from usage_agg.backfill import why_reading_next_day

            self.log.info(why_reading_next_day(next_day))
            try:
                next_result = self._aggregate(next_day, options, context)
            except BaseException:
                if changed(result):  # committed, and this task's event will not announce it
                    self._mark_not_announced(context, result.usage_date)
                raise
        results = [r for r in (result, next_result) if r is not None]
        payload = result.to_dict()
        if next_result is not None:
            payload["next_day"] = next_result.to_dict()
        new_bad = [r for r in results if r.new_bad_keys]
        if not new_bad:  # Airflow emits the outlets' events when the task succeeds
            record_events(self.outlets, context.get("outlet_events"), result, next_day=next_result)
        if new_bad:
            # The good keys are committed; publish the result before failing so the
            # XCom still shows what was written.
            context["ti"].xcom_push(key="aggregation_result", value=payload)
            raise AirflowFailException(
                "; ".join(f"{r.new_bad_keys} new bad key(s) for {r.usage_date} ({r.bad_keys} in all)" for r in new_bad)
                + "; good keys were committed, bad ones are in usage_aggregation_errors. "
                "Not retrying: bad data is not transient."
            )
        for known in results:
            if known.bad_keys:
                self.log.warning(
                    "%d bad key(s) of %s already reported by an earlier run; see usage_aggregation_errors",
                    known.bad_keys,
                    known.usage_date,
                )
        return payload

    def _mark_not_announced(self, context: Context, usage_date: str) -> None:
        """Record that ``usage_date``'s committed writes go unannounced (the task fails after them),
        so the next run of the date or the expiry check announces them (:mod:`usage_agg.audit`)."""
        from airflow.providers.postgres.hooks.postgres import PostgresHook

        from usage_agg.schema import resolve_names

        ti = context["ti"]
        pg_conn = PostgresHook(postgres_conn_id=self.postgres_conn_id).get_conn()
        try:
            runs_table = resolve_names(pg_conn, self.table).runs.quoted
            audit_row = _audit_row(ti)
            mark_not_announced(pg_conn, runs_table, audit_row, [usage_date])
        finally:
            pg_conn.close()

    def _aggregate(
        self, day: dt.date, options: AggregationOptions, context: Context, *, lineage: bool = False
    ) -> AggregationResult:
        """Aggregate ``day`` through Airflow's hooks, emit its metrics and alert on data loss."""
        from airflow.providers.postgres.hooks.postgres import PostgresHook
        from airflow.providers.redis.hooks.redis import RedisHook

        redis_hook = RedisHook(redis_conn_id=self.redis_conn_id)
        redis_client = redis_hook.get_conn()
        pg_hook = PostgresHook(postgres_conn_id=self.postgres_conn_id)
        pg_conn = pg_hook.get_conn()
        if lineage:
            self._lineage_endpoints = _endpoints(redis_hook, pg_hook, day, self.table)
        try:
            return aggregate_and_report(redis_client, pg_conn, day, options, context, self.log)
        except ValueError as err:
            raise AirflowFailException(str(err)) from None
        finally:
            pg_conn.close()

    def get_openlineage_facets_on_complete(self, task_instance):
        """Lineage for the OpenLineage provider: the Redis day read, the table written.

        Imported here so the OpenLineage provider stays optional.
        """
        from airflow.providers.common.compat.openlineage.facet import Dataset
        from airflow.providers.openlineage.extractors import OperatorLineage

        ends = self._lineage_endpoints
        if not ends:
            return OperatorLineage()
        return OperatorLineage(
            inputs=[Dataset(namespace=ends["redis_namespace"], name=ends["redis_name"])],
            outputs=[Dataset(namespace=ends["postgres_namespace"], name=ends["postgres_name"])],
        )


def _endpoints(redis_hook, pg_hook, day: dt.date, table: str) -> dict | None:
    """Where the data came from and went, for lineage (hosts and names, no credentials)."""
    from usage_agg.keys import day_pattern

    try:
        target = TableName.parse(table)
    except ValueError:
        return None  # execute() refuses the table with a clear error
    conn = pg_hook.get_connection(pg_hook.postgres_conn_id)
    return {
        "redis_namespace": f"redis://{redis_hook.host}:{redis_hook.port or 6379}/{redis_hook.db or 0}",
        "redis_name": day_pattern(day),
        "postgres_namespace": f"postgres://{conn.host}:{conn.port or 5432}",
        "postgres_name": f"{conn.schema or 'postgres'}.{target.schema or 'public'}.{target.name}",
    }


class RedisPartitionsOperator(BaseOperator):
    """
    List the parts a day's keys split into, for mapped aggregation tasks to fan out over.

    One part per primary of a Redis Cluster (one for a single node). Returns a list of
    ``{"redis_partition": "host:port", "partition_count": n}`` for
    ``RedisUsageToPostgresOperator.partial(...).expand_kwargs(...)``. Skipped, with
    everything mapped over it, in the backfill runs that would repeat another's work.

    :param redis_conn_id: Airflow connection to Redis (templated)
    """

    template_fields: Sequence[str] = ("redis_conn_id",)
    ui_color = "#e8f4ea"

    def __init__(self, *, redis_conn_id: str = DEFAULT_REDIS_CONN_ID, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.redis_conn_id = redis_conn_id

    def execute(self, context: Context) -> list[dict]:
        from airflow.providers.redis.hooks.redis import RedisHook

        from usage_agg.partitions import redis_partitions

        if why := repeated_backfill_work(context, self):
            if AIRFLOW_V_3_0_PLUS:
                raise AirflowSkipException(f"Not planning: {why}")
            # Airflow 2.11: no self-skip (see RedisUsageToPostgresOperator.execute); no parts
            # makes the scheduler skip the mapped aggregation tasks.
            self.log.info("Not planning: %s", why)
            return []
        parts = redis_partitions(RedisHook(redis_conn_id=self.redis_conn_id).get_conn())
        self.log.info("Fanning out over %d Redis part(s): %s", len(parts), ", ".join(parts))
        return [{"redis_partition": part, "partition_count": len(parts)} for part in parts]


class UsageExpiryCheckOperator(BaseOperator):
    """
    Fail (and so alert) when usage in Redis is about to expire without ever being aggregated.

    Scans every counter in Redis; any with less than a day to live whose current value
    is not in PostgreSQL (whatever earlier runs did) gets its day aggregated on the
    spot, under the day's lock. Fails without retries (and so alerts) if such a counter
    is still not stored after that, or the rescue met new bad keys. Emits the
    ``usage_agg.unaggregated_lag_days`` and ``days_expiring_unaggregated`` gauges.

    :param table: the usage table whose audit table is read (templated)
    :param redis_conn_id: Airflow connection to Redis (templated)
    :param postgres_conn_id: Airflow connection to PostgreSQL (templated)
    """

    template_fields: Sequence[str] = ("table", "redis_conn_id", "postgres_conn_id")
    ui_color = "#fbeaea"

    def __init__(
        self,
        *,
        table: str = "merchant_usage",
        redis_conn_id: str = DEFAULT_REDIS_CONN_ID,
        postgres_conn_id: str = DEFAULT_POSTGRES_CONN_ID,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.table = table
        self.redis_conn_id = redis_conn_id
        self.postgres_conn_id = postgres_conn_id

    def execute(self, context: Context) -> dict:
        from airflow.providers.postgres.hooks.postgres import PostgresHook
        from airflow.providers.redis.hooks.redis import RedisHook

        from usage_agg.expiry import check_expiry

        if is_backfill(context):
            raise AirflowSkipException(
                "Backfill run: expiry is about what Redis holds now, which the scheduled runs check"
            )
        redis_client = RedisHook(redis_conn_id=self.redis_conn_id).get_conn()
        pg_conn = PostgresHook(postgres_conn_id=self.postgres_conn_id).get_conn()
        ti = context["ti"]
        rescues: list[AggregationResult] = []

        def rescue(day: dt.date) -> None:
            """Aggregate a day whose expiring counters are not stored, under its lock, as a run would."""
            self.log.warning("Counters of %s expire within a day and are not stored: aggregating %s now", day, day)
            try:
                result = aggregate_and_report(
                    redis_client, pg_conn, day, AggregationOptions(table=self.table), context, self.log
                )
            except Exception as err:
                self.log.error("Could not aggregate %s to save its expiring usage: %s", day, err)
                raise
            rescues.append(result)

        late: list = []
        try:
            report = check_expiry(redis_client, pg_conn, table=self.table, rescue=rescue)
            names = report.names
            if rescues and (report.at_risk or any(r.new_bad_keys for r in rescues)):
                # this task fails below, so Airflow announces none of the days it saved: the
                # audit says so, and the date's next run (or the next check) announces them
                audit_row = _audit_row(ti)
                mark_not_announced(pg_conn, names.runs.quoted, audit_row, [r.usage_date for r in rescues])
            elif not report.at_risk and schema_is_current(pg_conn, names):
                # writes of any date that no event announced (their task failed after its commit)
                with pg_conn.cursor() as cur:
                    late = unannounced_dates(cur, names.runs.quoted, names.audit_names)
                if late:
                    mark_announced(pg_conn, names.runs.quoted, names.audit_names, late, f"{ti.dag_id}/{ti.run_id}")
        finally:
            pg_conn.close()
        metrics.emit_lag(report.lag_days, len(report.at_risk), table=self.table)
        if report.unindexed_keys:
            self.log.warning(
                "%d usage key(s) were missing from their day's index (written by another writer than "
                "usage_agg.tracking); added, so the next aggregation of their day reads them",
                report.unindexed_keys,
            )
        self.log.info(
            "Redis holds %d day(s) of usage; oldest not yet aggregated: %d day(s) ago; rescued: %s",
            len(report.days),
            report.lag_days,
            ", ".join(d.usage_date for d in report.rescued) or "none",
        )
        if report.at_risk:
            days = "; ".join(
                f"{d.usage_date}: {d.unsaved_keys} key(s), e.g. {d.unsaved_samples[:3]}" for d in report.at_risk
            )
            raise AirflowFailException(
                f"Usage about to be lost: counters expiring within a day whose value is not in PostgreSQL, "
                f"even after aggregating their day: {days}. See the log above for why."
            )
        new_bad = sum(r.new_bad_keys for r in rescues)
        if new_bad:
            raise AirflowFailException(
                f"{new_bad} new bad key(s) found while saving expiring usage of "
                f"{', '.join(r.usage_date for r in rescues if r.new_bad_keys)}; good keys were committed, "
                "bad ones are in usage_aggregation_errors. Not retrying: bad data is not transient."
            )
        # Airflow emits the outlets' events when the task succeeds: one only when there is news.
        late_dates = [day.isoformat() for day in late]
        if late_dates:
            self.log.info("Announcing writes no event announced yet (their task failed after commit): %s", late_dates)
        if not record_rescue_events(self.outlets, context.get("outlet_events"), rescues, late_dates):
            self.outlets = []
        return {**report.to_dict(), "rescues": [r.to_dict() for r in rescues]}


def aggregate_and_report(
    redis_client: Any, pg_conn: Any, day: dt.date, options: AggregationOptions, context: Context, logger: Any
) -> AggregationResult:
    """Aggregate ``day`` as a task of ``context`` (its audit row names the task), emit the run's
    metrics and, when Redis lost counters, alert: committed and right, but someone should know.
    The one sequence of the aggregation task and of the expiry check's rescues."""
    ti = context["ti"]
    result = aggregate_day(
        redis_client,
        pg_conn,
        day,
        options,
        audit=_audit_row(ti),
        logger=logger,
    )
    metrics.emit_aggregation(result, dag_id=ti.dag_id)
    if result.resets:
        from usage_agg.alerts import UsageAlertNotifier, describe_data_loss

        UsageAlertNotifier().send(describe_data_loss(context, result), context)
    return result


def resolve_usage_date(usage_date: str | dt.date | None, context: Context, day_offset: int = 0) -> dt.date:
    """The date a task aggregates: explicit, else the run's ``ds``, else today in UTC.

    An Airflow 3 run triggered without a logical date has no ``ds`` in its context.
    """
    if usage_date:
        day = parse_date(usage_date)
    elif context.get("ds"):
        day = parse_date(context["ds"], field="ds")
    else:
        day = dt.datetime.now(dt.UTC).date()
    return day + dt.timedelta(days=day_offset)


def is_backfill(context: Context) -> bool:
    """Whether the task runs in a backfill (``airflow dags backfill`` / ``airflow backfill create``)."""
    run_type = getattr(context.get("dag_run"), "run_type", None)
    return str(getattr(run_type, "value", run_type)) == "backfill"


def backfill_deciders(dag: Any) -> dict[str, tuple[int, ...]]:
    """The tasks of ``dag`` that decide in a backfill whether to read, with the day offsets they read.

    Each :class:`RedisUsageToPostgresOperator` reading its run's day (no explicit ``usage_date``,
    ``once_per_day_in_backfill`` on) decides for its own day; with the fan-out, the
    :class:`RedisPartitionsOperator` decides for the days of the mapped tasks it plans, which
    then do not decide again.
    """
    deciders: dict[str, tuple[int, ...]] = {}
    for task in dag.tasks:
        if isinstance(task, RedisPartitionsOperator):
            offsets = {
                kwargs.get("day_offset", 0)
                for kwargs in (getattr(down, "partial_kwargs", None) for down in task.downstream_list)
                if kwargs is not None and not kwargs.get("usage_date")
            }
            if offsets:
                deciders[task.task_id] = tuple(sorted(offsets))
        elif (
            isinstance(task, RedisUsageToPostgresOperator)
            and task.once_per_day_in_backfill
            and task.reads_run_day_offset is not None
        ):
            deciders[task.task_id] = (task.reads_run_day_offset,)
    return deciders


def repeated_backfill_work(context: Context, task: Any) -> str | None:
    """Why ``task`` need not read its days in this backfill run, or ``None``: it reads them.

    A backfill of the hourly DAG creates 24 runs per day and each day's counters are final by
    then, so one read per day by the backfill is enough: the task leaves each of its days to
    an earlier run of the same backfill that reads it, by the rule of :mod:`usage_agg.backfill`,
    on the facts :mod:`usage_agg.backfill_facts` gathers. A day no earlier run of the backfill
    provably reads is read here.
    """
    from usage_agg.backfill import covering_reader, days_read, first_window_start, why_not_reading
    from usage_agg.backfill_facts import earlier_readers

    if not is_backfill(context):
        return None
    logical_date = context.get("logical_date")
    offsets = backfill_deciders(task.dag) if task.has_dag() else {}
    if logical_date is None or task.task_id not in offsets:
        return None
    days = days_read(logical_date, offsets[task.task_id])
    readers = earlier_readers(context, logical_date, first_window_start(days, offsets), offsets)
    seen: list = []  # the readers walked so far, for the next day (the planner decides for two)
    reasons = []
    for day in days:
        reader = covering_reader(day, logical_date, seen) or covering_reader(
            day, logical_date, _remember(readers, seen)
        )
        if reader is None:
            return None
        reasons.append(why_not_reading(day, logical_date, reader))
    return "; ".join(reasons)


def backfill_next_day(context: Context, task: Any, day: dt.date) -> dt.date | None:
    """The day after ``day`` when ``task``, which reads its backfill run's own day ``day``, must read
    it too: its runs exist and none is part of this backfill (:func:`usage_agg.backfill.next_day_unread`).
    A fanned-out part reading the run's day decides this for itself (its planner read the day)."""
    from usage_agg.backfill import next_day_unread
    from usage_agg.backfill_facts import runs_of_day

    if not is_backfill(context) or not task.once_per_day_in_backfill or task.reads_run_day_offset != 0:
        return None
    if context.get("logical_date") is None or not task.has_dag():
        return None
    following = day + dt.timedelta(days=1)
    return following if next_day_unread(runs_of_day(context, following, backfill_deciders(task.dag))) else None


def _remember(readers: Any, seen: list) -> Any:
    for reader in readers:
        seen.append(reader)
        yield reader


def as_bool(value: bool | str, *, field: str) -> bool:
    """A boolean that may have passed through a Jinja template as ``"True"``/``"False"``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{field}: expected true or false, got {value!r}")


def _audit_row(ti) -> dict[str, str]:
    """The task instance as the audit table names it: ``dag_id``, ``run_id``, ``task_id`` (with its map index)."""
    return {"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": _task_label(ti)}


def _task_label(ti) -> str:
    map_index = getattr(ti, "map_index", -1)
    return ti.task_id if map_index is None or map_index < 0 else f"{ti.task_id}[{map_index}]"
