"""PostgreSQL identifiers that come from configuration: validated, then quoted.

A table name is user input (an operator argument, an env var); it reaches SQL only
through :class:`TableName`, which accepts ``name`` or ``schema.name`` made of
letters, digits and underscores and always emits it double-quoted.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_IDENTIFIER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def quote_identifier(name: str) -> str:
    if not isinstance(name, str) or not _IDENTIFIER_RE.fullmatch(name):
        raise ValueError(
            f"table: {name!r} is not a valid identifier "
            "(letters, digits and underscores, not starting with a digit, at most 63 characters)"
        )
    return f'"{name}"'


class TableName(NamedTuple):
    schema: str | None
    name: str

    @classmethod
    def parse(cls, qualified: str) -> TableName:
        """Parse ``name`` or ``schema.name``; raise ``ValueError`` naming the problem."""
        if not isinstance(qualified, str) or not qualified:
            raise ValueError(f"table: must be a non-empty string, got {qualified!r}")
        parts = qualified.split(".")
        if len(parts) > 2:
            raise ValueError(f"table: {qualified!r} has more than one '.'; use schema.table")
        for part in parts:
            quote_identifier(part)
        return cls(parts[0], parts[1]) if len(parts) == 2 else cls(None, parts[0])

    def sibling(self, name: str) -> TableName:
        """Another table in the same schema (the audit and dead-letter tables)."""
        quote_identifier(name)
        return TableName(self.schema, name)

    @property
    def quoted(self) -> str:
        name = quote_identifier(self.name)
        return f"{quote_identifier(self.schema)}.{name}" if self.schema else name

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name
