"""``usage-agg``: status (reconciliation) and health, through Airflow's connections.

It runs wherever Airflow's connections resolve (``AIRFLOW_CONN_*``, a secrets
backend, the metadata DB) with the same connection ids and table as the DAGs.
Errors are one line on stderr, never a traceback; exit status 2 means the check
could not be made, 1 out of sync / unhealthy, 0 in sync / healthy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import urllib.parse
import warnings
from typing import Any

EXIT_OK, EXIT_PROBLEM, EXIT_ERROR = 0, 1, 2


class CliError(Exception):
    """An error worth one line to the user."""


def main(argv: list[str] | None = None) -> int:
    """The console script ``usage-agg``. Parsing imports no Airflow, so ``--help`` answers at once."""
    args = _parser().parse_args(argv)
    return _run(args, args.command)


def _run(args, command) -> int:
    import airflow  # noqa: F401  (its settings install warning filters; ours go in front of them)

    warnings.filterwarnings("ignore")  # Airflow's import-time deprecation notices are not ours to show
    # Our errors are one line each. Airflow 2 also logs, to stdout, a traceback for a secrets
    # backend entry it cannot parse, and the traceback can quote the entry, password included.
    logging.getLogger("airflow").setLevel(logging.CRITICAL)
    try:
        _resolve_defaults(args)
        _check_utf8(args)
        return command(args)
    except CliError as err:
        print(f"usage-agg: {err}", file=sys.stderr)
        return EXIT_ERROR


#: Options left out on the command line take the DAGs' settings (``usage_agg.config``, same names).
_SETTINGS = ("redis_conn_id", "postgres_conn_id", "table")


def _resolve_defaults(args) -> None:
    from usage_agg import config

    for option in _SETTINGS:
        if getattr(args, option, None) is None:
            setattr(args, option, config.value(option))


def _default(option: str) -> str:
    from usage_agg.config import OPTIONS_BY_NAME

    setting = OPTIONS_BY_NAME[option]
    # No square brackets: Airflow's help formatter (rich) would take "[usage_agg]" for markup.
    return f"default: {setting.env}, else {option} of the usage_agg config section, else {setting.default}"


#: The arguments of each command, as (flags, argparse keywords): the console script and Airflow's
#: own CLI (``airflow usage-agg``, Airflow 3) build their parsers from these.
#: One command-line argument: its flags and add_argument's keywords.
_Argument = tuple[tuple[str, ...], dict[str, Any]]
COMMON_ARGUMENTS: tuple[_Argument, ...] = (
    (("--redis-conn-id",), {"help": f"the Redis connection ({_default('redis_conn_id')})"}),
    (("--postgres-conn-id",), {"help": f"the PostgreSQL connection ({_default('postgres_conn_id')})"}),
    (("--table",), {"help": f"the usage table ({_default('table')})"}),
    (("--json",), {"action": "store_true", "help": "machine-readable output"}),
)
STATUS_ARGUMENTS: tuple[_Argument, ...] = (
    (("date",), {"help": "YYYY-MM-DD"}),
    (("--merchant",), {"help": "one merchant only"}),
    (("--hourly",), {"action": "store_true", "help": "also show the day's 24 UTC hours against Redis"}),
)
STATUS_HELP = "reconcile one date between Redis and PostgreSQL"
HEALTH_HELP = "check both stores and data-loss risks"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usage-agg", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="command")
    for name, help_text, arguments, command in (
        ("status", STATUS_HELP, STATUS_ARGUMENTS + COMMON_ARGUMENTS, run_status),
        ("health", HEALTH_HELP, COMMON_ARGUMENTS, run_health),
    ):
        sub = commands.add_parser(name, help=help_text)
        for flags, keywords in arguments:
            sub.add_argument(*flags, **keywords)
        sub.set_defaults(command=command)
    return parser


def get_airflow_cli_commands() -> list:
    """``airflow usage-agg status|health``: the provider's ``cli`` entry, read by Airflow 3's CLI."""
    from airflow.cli.cli_config import ActionCommand, Arg, GroupCommand

    def arguments(specs) -> tuple:
        return tuple(Arg(flags, **keywords) for flags, keywords in specs)

    return [
        GroupCommand(
            name="usage-agg",
            help="Usage aggregation: reconcile a date, check the stores (the usage-agg command)",
            subcommands=(
                ActionCommand(
                    name="status",
                    help=STATUS_HELP,
                    func=airflow_status,
                    args=arguments(STATUS_ARGUMENTS + COMMON_ARGUMENTS),
                ),
                ActionCommand(name="health", help=HEALTH_HELP, func=airflow_health, args=arguments(COMMON_ARGUMENTS)),
            ),
        )
    ]


def airflow_status(args) -> None:
    sys.exit(_run(args, run_status))


def airflow_health(args) -> None:
    sys.exit(_run(args, run_health))


def run_status(args) -> int:
    from usage_agg.keys import check_merchant_id, parse_date
    from usage_agg.reconcile import SchemaMissing, reconcile_date

    try:
        day = parse_date(args.date, field="date")
    except ValueError as err:
        raise CliError(str(err)) from None
    if args.merchant is not None:
        if not args.merchant:
            raise CliError("--merchant: must not be empty")
        try:
            check_merchant_id(args.merchant)
        except ValueError as err:
            raise CliError(f"--merchant: {err}") from None

    def reconcile(redis_client, pg_conn):
        try:
            return reconcile_date(
                redis_client, pg_conn, day, merchant_id=args.merchant, table=args.table, hourly=args.hourly,
                require_schema=True,
            )  # fmt: skip
        except SchemaMissing as err:  # nothing to compare Redis with: not checkable, exit status 2
            raise CliError(str(err)) from None

    with _stores(args) as (redis_client, pg_conn):
        status = _guard("reading", lambda: reconcile(redis_client, pg_conn))
    if args.json:
        print(json.dumps(status.to_dict(), indent=2, default=str))
    else:
        print(_format_status(status))
    return EXIT_OK if status.in_sync else EXIT_PROBLEM


def run_health(args) -> int:
    from usage_agg.health import HealthReport, check_postgres, check_redis

    report = HealthReport()
    redis_client = _guard(f"Redis through connection {args.redis_conn_id!r}", lambda: _redis(args.redis_conn_id))
    _guard(f"Redis through connection {args.redis_conn_id!r}", lambda: check_redis(redis_client, report))
    pg_conn = _guard(
        f"PostgreSQL through connection {args.postgres_conn_id!r}", lambda: _postgres(args.postgres_conn_id)
    )
    try:
        _guard(
            f"PostgreSQL through connection {args.postgres_conn_id!r}",
            lambda: check_postgres(pg_conn, args.table, report),
        )
    finally:
        pg_conn.close()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for check in report.checks:
            print(f"{'OK  ' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
        print("healthy" if report.healthy else "NOT healthy")
    return EXIT_OK if report.healthy else EXIT_PROBLEM


#: What each argument holds, for errors about its bytes.
_ARGUMENT_NAMES = {
    "merchant": ("--merchant", "the merchant id"),
    "date": ("date", "the date"),
    "table": ("--table", "the table name"),
    "redis_conn_id": ("--redis-conn-id", "the connection id"),
    "postgres_conn_id": ("--postgres-conn-id", "the connection id"),
}


def _check_utf8(args) -> None:
    """Refuse arguments whose bytes are not UTF-8 (Python keeps them as lone surrogates).

    Redis keys and PostgreSQL text are UTF-8: such an argument could never match, and
    would fail deep inside a driver with an encoding error that names neither.
    """
    for attribute, value in vars(args).items():
        if not isinstance(value, str):
            continue
        problem = _not_utf8(value)
        if problem:
            option, what = _ARGUMENT_NAMES.get(attribute, (attribute, "the value"))
            raise CliError(f"{option}: {what} is not valid UTF-8 ({problem})")


def _not_utf8(value: str) -> str | None:
    """``None`` for a valid UTF-8 string, else where its first bad byte is."""
    try:
        value.encode("utf-8")
        return None
    except UnicodeEncodeError as err:
        try:
            raw = value.encode("utf-8", "surrogateescape")  # the bytes as the command line held them
            offset = len(value[: err.start].encode("utf-8", "surrogateescape"))
            return f"byte 0x{raw[offset]:02x} at byte offset {offset}"
        except UnicodeEncodeError:
            return f"a lone surrogate at character {err.start}"


class _stores:
    def __init__(self, args) -> None:
        self.args = args

    def __enter__(self):
        self.redis = _guard(
            f"Redis through connection {self.args.redis_conn_id!r}", lambda: _redis(self.args.redis_conn_id)
        )
        self.pg = _guard(
            f"PostgreSQL through connection {self.args.postgres_conn_id!r}",
            lambda: _postgres(self.args.postgres_conn_id),
        )
        return self.redis, self.pg

    def __exit__(self, *exc) -> None:
        self.pg.close()


def _resolvable(conn_id: str) -> None:
    """Look the connection up the way Airflow's own CLI does, and hand it to the hooks.

    Airflow 3's hooks resolve connections through the task SDK, which outside a task
    sees env vars and secrets backends but not the metadata DB; the core model also
    searches the metadata DB. The result is passed on in this process's environment only.

    A connection set in the environment is parsed here first: Airflow skips a value
    it cannot parse and reports the connection as not defined (Airflow 2 also logs
    a traceback that may quote the value).
    """
    variable = f"AIRFLOW_CONN_{conn_id.upper()}"
    if variable in os.environ:
        _check_env_connection(variable, os.environ[variable], conn_id)
        return
    from airflow.models.connection import Connection

    os.environ[variable] = Connection.get_connection_from_secrets(conn_id).as_json()


def _check_env_connection(variable: str, value: str, conn_id: str) -> None:
    """Parse ``value`` as Airflow's environment backend does; explain, without the value, why it cannot be."""
    from airflow.providers.common.compat.sdk import Connection

    unusable = f"{variable} is set but cannot be parsed as an Airflow connection"
    problem = _not_utf8(value)
    if problem:
        raise CliError(f"{unusable}: it is not valid UTF-8 ({problem})")
    text = value.strip()
    if not text:
        raise CliError(f"{unusable}: it is empty")
    try:
        if text.startswith("{"):  # JSON, as Airflow decides by the first character
            Connection.from_json(value=text, conn_id=conn_id)
            return
        if "://" not in text:  # Airflow would make an empty connection of it, with no type and no host
            raise ValueError("not a JSON object and not a URI of the form type://[login:password@]host[:port][/schema]")
        if hasattr(Connection, "from_uri"):  # Airflow 3's task SDK
            Connection.from_uri(conn_id=conn_id, uri=text)
        else:  # Airflow 2's Connection (mypy sees Airflow 3's, which takes no uri)
            Connection(conn_id=conn_id, uri=text)  # type: ignore[call-arg]
    except Exception as err:
        kind = "JSON" if text.startswith("{") else "URI"
        reason = err.msg if isinstance(err, json.JSONDecodeError) else " ".join(str(err).split())
        where = f" (line {err.lineno} column {err.colno})" if isinstance(err, json.JSONDecodeError) else ""
        raise CliError(f"{unusable} ({kind}): {_redact(reason, text) or type(err).__name__}{where}") from None


_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")


def _redact(message: str, value: str) -> str:
    """``message`` without anything taken from ``value`` that could be a secret.

    Airflow's parse errors can quote the value whole ("Invalid connection string:
    <URI>") or in part (a port, a key): the value, its password and any quoted
    fragment of it but a JSON object's field name become ``***``.
    """
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    names = set(parsed) if isinstance(parsed, dict) else set()  # a field name says what is wrong, holds no secret
    secrets = {value}
    userinfo = value.partition("://")[2].rpartition("@")[0]
    if userinfo:
        secrets.add(userinfo)
        password = userinfo.partition(":")[2]
        if password:
            secrets |= {password, urllib.parse.unquote(password)}
    for match in re.finditer(r'"password"\s*:\s*"((?:[^"\\]|\\.)*)"', value):
        secrets.add(match.group(1))  # as written, escapes and all; and as decoded:
    if isinstance(parsed, dict) and isinstance(parsed.get("password"), str):
        secrets.add(parsed["password"])
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        message = message.replace(secret, "***")

    def quoted(match: re.Match) -> str:
        fragment = match.group(1) if match.group(1) is not None else match.group(2)
        return "'***'" if fragment and fragment in value and fragment not in names else match.group(0)

    return _QUOTED.sub(quoted, message)


def _redis(conn_id: str):
    from airflow.providers.redis.hooks.redis import RedisHook

    _resolvable(conn_id)
    client = RedisHook(redis_conn_id=conn_id).get_conn()
    client.ping()
    return client


def _postgres(conn_id: str):
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    _resolvable(conn_id)
    return PostgresHook(postgres_conn_id=conn_id).get_conn()


def _guard(what: str, action):
    """Run ``action``; turn the errors a user can act on into one line."""
    try:
        return action()
    except CliError:
        raise
    except Exception as err:
        name = type(err).__name__
        if name == "AirflowNotFoundException":
            conn_id = what.split("'")[1] if "'" in what else what
            raise CliError(
                f"connection {conn_id!r} is not defined "
                f"(set AIRFLOW_CONN_{conn_id.upper()}, a secrets backend entry, or add it to the metadata DB; "
                "Airflow skips a secrets backend entry it cannot parse as if it were not there)"
            ) from None
        if name == "ValueError":
            raise CliError(str(err)) from None
        message = " ".join(str(err).split()) or name
        raise CliError(f"cannot reach {what}: {message}") from None


def _day_against_hours(sample: dict, no_day: str) -> str:
    """One key whose day and hours disagree, for the status text (``no_day`` where it has no day)."""
    day = no_day if sample["daily"] is None else f"daily {sample['daily']}"
    return f"    {sample['merchant_id']!r} {sample['metric_type']}: {day}, hours sum to {sample['hourly_sum']}"


def _format_status(s) -> str:
    scope = f" merchant {s.merchant_id!r}" if s.merchant_id is not None else ""
    lines = [f"usage-agg status {s.usage_date}{scope} ({s.table}): {'IN SYNC' if s.in_sync else 'NOT IN SYNC'}"]
    lines.append(f"  {'':<22}{'Redis':>14}{'PostgreSQL':>14}")
    lines.append(f"  {'keys / rows':<22}{s.redis_keys:>14}{s.table_rows:>14}")
    for metric in sorted(set(s.redis_totals) | set(s.table_totals)):
        lines.append(f"  {'total ' + metric:<22}{s.redis_totals.get(metric, 0):>14}{s.table_totals.get(metric, 0):>14}")
    lines.append(f"  rows that differ: {s.differing_rows}")
    lines += [
        f"    {d['merchant_id']!r} {d['metric_type']}: Redis {d['redis']}, stored {d['stored']}"
        + (f" ({d['offset']} of it counted before a reset)" if d.get("offset") else "")
        for d in s.differences
    ]
    lines.append(f"  keys not yet in the table: {s.keys_not_in_table}")
    lines += [f"    {k}" for k in s.missing_keys[:10]]
    lines.append(f"  never aggregated and expiring within a day: {s.expiring_unaggregated}")
    lines += [f"    {e['key']} (TTL {e['ttl_seconds']} s)" for e in s.expiring_keys[:10]]
    lines.append(f"  bad keys in Redis: {s.redis_bad_keys}")
    lines.append(f"  bad hourly fields in Redis: {s.redis_bad_hours}")
    run = s.last_successful_run
    lines.append(
        f"  last successful run: {run['dag_id']} {run['run_id']} {run['task_id']} at {run['finished_at']}"
        if run
        else "  last successful run: none recorded"
    )
    lines.append(f"  open dead letters: {s.open_dead_letters}")
    lines += [f"    {d['key']}: {d['reason']} (seen {d['times_seen']}x)" for d in s.dead_letters[:10]]
    lines.append(f"  hourly counts not stored: {s.hourly_differing_rows}")
    lines.append(f"  keys whose daily total differs from their hours: {s.hourly_mismatches}")
    lines += [_day_against_hours(d, "no daily counter") for d in s.hourly_mismatch_samples[:10]]
    lines.append(f"  stored days whose hourly rows sum differently: {s.stored_hourly_mismatches}")
    lines += [_day_against_hours(d, "no daily row") for d in s.stored_hourly_mismatch_samples[:10]]
    if s.hours:
        lines.append(f"  {'hour (UTC)':<22}{'Redis':>14}{'PostgreSQL':>14}")
        lines += [f"  {h['hour'] + ':00':<22}{h['redis']:>14}{h['stored']:>14}" for h in s.hours]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
