"""The usage table and what lives beside it: names, identity, DDL, versions.

Every object sits in the usage table's schema. A table name is resolved to the
schema it lives in (or would be created in), so ``merchant_usage`` and
``public.merchant_usage`` are one table with one lock, one audit trail and one
set of checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from usage_agg.identifiers import TableName, quote_identifier

#: Bumped with every change to sql/schema.sql; stored as the usage table's comment.
SCHEMA_VERSION = 6
ERRORS_TABLE = "usage_aggregation_errors"
RUNS_TABLE = "usage_aggregation_runs"
INCARNATIONS_TABLE = "usage_redis_incarnations"
COMPANION_TABLES = (ERRORS_TABLE, RUNS_TABLE, INCARNATIONS_TABLE)
#: Suffixes of the names derived from a usage table's name (its hourly table, views,
#: window function and indexes).
DERIVED_SUFFIXES = ("_hourly", "_weekly", "_monthly", "_windows", "_idx")
#: The longest usage table name: its derived names (``{name}_usage_date_idx``) then fit
#: PostgreSQL's 63-byte identifiers whole, so two tables never share a derived name.
MAX_TABLE_NAME = 63 - len("_usage_date_idx")


@dataclass(frozen=True)
class SchemaNames:
    """The usage table and what is created beside it, in the same schema."""

    usage: TableName
    errors: TableName
    runs: TableName
    incarnations: TableName
    hourly: TableName
    weekly: TableName
    monthly: TableName
    windows: TableName
    #: other spellings of the usage table that earlier versions wrote in the audit
    aliases: tuple[str, ...] = ()

    @classmethod
    def for_table(cls, table: str | TableName) -> SchemaNames:
        """The names for ``table`` as given (see :func:`resolve_names` for its identity)."""
        usage = table if isinstance(table, TableName) else TableName.parse(table)
        _check_usage_table_name(usage.name)
        return cls(
            usage,
            usage.sibling(ERRORS_TABLE),
            usage.sibling(RUNS_TABLE),
            usage.sibling(INCARNATIONS_TABLE),
            usage.sibling(f"{usage.name}_hourly"),
            usage.sibling(f"{usage.name}_weekly"),
            usage.sibling(f"{usage.name}_monthly"),
            usage.sibling(f"{usage.name}_windows"),
        )

    @property
    def audit_names(self) -> list[str]:
        """Every spelling of the usage table in the audit's ``usage_table`` column."""
        return [str(self.usage), *self.aliases]

    def ddl(self) -> str:
        template = resources.files("usage_agg").joinpath("sql/schema.sql").read_text("utf-8")
        return template.format(
            usage_table=self.usage.quoted,
            errors_table=self.errors.quoted,
            runs_table=self.runs.quoted,
            incarnations_table=self.incarnations.quoted,
            hourly_table=self.hourly.quoted,
            hourly_index=quote_identifier(f"{self.hourly.name}_idx"),
            windows_function=self.windows.quoted,
            weekly_view=self.weekly.quoted,
            monthly_view=self.monthly.quoted,
            usage_date_index=quote_identifier(f"{self.usage.name}_usage_date_idx"),
            errors_open_index=quote_identifier(f"{ERRORS_TABLE}_open_idx"),
            runs_date_index=quote_identifier(f"{RUNS_TABLE}_date_idx"),
            version_comment=f"'{_version_comment()}'",
        )


def _check_usage_table_name(name: str) -> None:
    """Refuse a usage table name that would collide with what is created beside a usage table."""
    if name in COMPANION_TABLES:
        raise ValueError(f"table: {name!r} is the name of a usage-agg companion table; choose another name")
    if name.endswith(DERIVED_SUFFIXES):
        raise ValueError(
            f"table: {name!r} ends with {'/'.join(DERIVED_SUFFIXES)}, which usage-agg keeps for the views and "
            "indexes it creates beside a usage table; choose another name"
        )
    if len(name) > MAX_TABLE_NAME:
        raise ValueError(
            f"table: {name!r} is {len(name)} characters; at most {MAX_TABLE_NAME}, so the names derived "
            "from it fit PostgreSQL's 63-character limit"
        )


def resolve_names(conn, table: str | TableName) -> SchemaNames:
    """:meth:`SchemaNames.for_table`, with an unqualified name resolved to its schema.

    An existing table is found through ``search_path`` as PostgreSQL would; a new one
    goes where ``CREATE TABLE`` would put it (``current_schema()``). Ends its transaction.
    """
    names = SchemaNames.for_table(table)
    with conn.cursor() as cur:
        cur.execute(
            """SELECT coalesce((SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                WHERE c.oid = to_regclass(%s)), current_schema())""",
            (quote_identifier(names.usage.name),),
        )
        unqualified_schema = cur.fetchone()[0]  # where the bare name leads
    conn.rollback()
    schema = names.usage.schema or unqualified_schema
    if schema is None:
        raise ValueError(f"table: {names.usage.name!r} has no schema and search_path names none to create it in")
    resolved = SchemaNames.for_table(TableName(schema, names.usage.name))
    aliases = (names.usage.name,) if schema == unqualified_schema else ()
    return SchemaNames(**{**resolved.__dict__, "aliases": aliases})


def _version_comment() -> str:
    return f"usage-agg schema {SCHEMA_VERSION}"


def ensure_schema(conn, table: str | TableName) -> SchemaNames:
    """Create or upgrade the usage, dead-letter, audit and incarnation tables and the views, and commit.

    The usual case costs two catalogue queries: the usage table's comment names the
    current schema version, and nothing is done. Otherwise the idempotent DDL runs;
    concurrent first runs would race on it, so an advisory lock makes them take turns.
    """
    names = resolve_names(conn, table)
    if schema_is_current(conn, names):
        return names
    assert names.usage.schema is not None  # resolve_names names the schema (or raises)
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s)::bigint)", (f"usage_agg schema {names.usage}",))
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_identifier(names.usage.schema)}")
        cur.execute(names.ddl())
    conn.commit()
    return names


def _catalogue(conn, names: SchemaNames) -> tuple[list[str], str | None]:
    """The schema's missing tables and views, and the usage table's version comment.

    One read-only query; it ends its transaction.
    """
    objects = [names.usage, names.errors, names.runs, names.incarnations, names.hourly, names.weekly, names.monthly]
    with conn.cursor() as cur:
        cur.execute(
            """SELECT array_remove(array_agg(CASE WHEN to_regclass(n) IS NULL THEN n END), NULL),
                      obj_description(to_regclass(%s), 'pg_class')
               FROM unnest(%s::text[]) AS n""",
            (names.usage.quoted, [o.quoted for o in objects]),
        )
        missing_quoted, comment = cur.fetchone()
    conn.rollback()
    return [str(o) for o in objects if o.quoted in set(missing_quoted)], comment


def missing_objects(conn, names: SchemaNames) -> list[str]:
    """The tables and views of the schema that do not exist."""
    return _catalogue(conn, names)[0]


def schema_is_current(conn, names: SchemaNames) -> bool:
    """Whether the whole schema exists at the current version."""
    missing, comment = _catalogue(conn, names)
    return not missing and comment == _version_comment()
