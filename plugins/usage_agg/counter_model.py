"""The counting rules of one stored row, written once, in plain Python: the specification.

A stored row (``merchant_usage`` or ``merchant_usage_hourly``) keeps ``quantity``,
``redis_offset`` and ``redis_incarnation``: ``quantity = redis_offset + the Redis value
last read``, read from the Redis server life ``redis_incarnation`` (an id of
``usage_redis_incarnations``). A run reads a new value from a server life, knowing which
older lives that life started empty after (:attr:`usage_agg.lives.Source.predecessors`),
and whether ``allow_decrease`` was asked for. :func:`next_state` says what the row
becomes, by the first rule of :data:`RULES` that applies.

Why a second copy of rules the SQL already holds: the SQL (:mod:`usage_agg.merge_sql`)
states them in several places (the ``CASE`` of the offset, the reset label, the
pre-filter, the "unchanged" test, the ``ON CONFLICT`` arm), tuned for speed. This module
states them once, for people and for tests: a table in the order the rules apply, each
rule with the README sentence that promises it. The differential test
(``tests/integration/test_counter_model_differential.py``) runs the real statements over
thousands of generated rows and checks every row against this module, so the two cannot
drift apart unnoticed. Nothing here does I/O or imports Airflow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from usage_agg.keys import BIGINT_MAX

#: The reset kinds, as the merge statement labels them (``reset`` in the reset samples).
RESTART, DROP, REBASE = "restart", "drop", "rebase"


@dataclass(frozen=True)
class Row:
    """A stored row's counting state (the other columns do not take part in the rules)."""

    #: ``quantity``: the total counted, never negative
    quantity: int
    #: ``redis_offset``: what was counted before the Redis value last read (resets kept)
    offset: int = 0
    #: ``redis_incarnation``: the server life the value last read came from (``None``: unknown)
    life: int | None = None

    @property
    def last_read(self) -> int:
        """The Redis value last read: ``quantity - redis_offset``."""
        return self.quantity - self.offset


@dataclass(frozen=True)
class Read:
    """What one run reads for the row's counter, and how."""

    #: the Redis value now
    value: int
    #: the server life read now (``None``: no life known, as for a writer given none)
    life: int | None = None
    #: the lives this one started empty after the last read of (a restart without
    #: persistence, never a replica, no keys taken in): a row last read from one of them
    #: holds none of what Redis holds now. A life is never its own predecessor.
    predecessors: frozenset[int] = field(default_factory=frozenset)
    #: ``allow_decrease``: Redis is the truth, even where it is lower
    allow_decrease: bool = False

    def __post_init__(self) -> None:
        if self.life is not None and self.life in self.predecessors:
            raise ValueError(f"life {self.life} cannot have started empty after itself")
        if not 0 <= self.value <= BIGINT_MAX:
            raise ValueError(f"a Redis value is a bigint at least 0, not {self.value}")


@dataclass(frozen=True)
class Rule:
    """One row of the rule table: when it applies, what the row's quantity and offset become,
    the reset it is (``None``: none), and the sentence of the README (or, where the README
    says nothing, of ``usage_agg.write_routes``' docstring) that promises it."""

    name: str
    #: whether the rule applies to the stored row (``None`` only for the first rule: every rule
    #: after "new row" is asked about a row that exists, hence ``Any``, not ``Row | None``)
    applies: Callable[[Any, Read], bool]
    #: ``(quantity, offset)`` the row takes; evaluated only when :attr:`applies`
    outcome: Callable[[Any, Read], tuple[int, int]]
    reset: str | None
    says: str


def _takes_new_life(row: Row, read: Read) -> bool:
    """A row holding an offset, last read from another life than the one read now: it must
    take the new life even where its value is the same, or later growth in this life would
    still be compared with a value of the old one (``merge_sql.changed_life``)."""
    return row.offset != 0 and row.life != read.life


def _must_take_life(row: Row, read: Read) -> bool:
    """Whether the row must be written to take the life read now, even where its quantity and
    offset stay: a row holding an offset read from another life (:func:`_takes_new_life`), and any
    row that ``allow_decrease`` set from another life. The latter holds that life's value now; left
    on the old life, a plain run after it would take the old life for one Redis started empty
    after, and add the value again (found by the history test: 1 stored as 2)."""
    return _takes_new_life(row, read) or (read.allow_decrease and row.life != read.life)


#: The rules, in the order they apply (the first that applies decides).
RULES: tuple[Rule, ...] = (
    Rule(
        "new row",
        lambda row, read: row is None,
        lambda row, read: (read.value, 0),
        None,
        "Redis holds the day's running total; the row takes that value (upsert).",
    ),
    Rule(
        "allow_decrease",
        lambda row, read: read.allow_decrease,
        lambda row, read: (read.value, 0),
        None,
        "| `allow_decrease` (Redis is the truth) | `value`, offset 0 |",
    ),
    Rule(
        "restart",
        lambda row, read: row.life in read.predecessors,
        lambda row, read: (row.quantity + read.value, row.quantity),
        RESTART,
        "| the Redis server restarted empty since the row was last read (its `run_id` changed; it loaded no"
        " keys, was never a replica, received no keys by `RESTORE`/`MIGRATE`) | `quantity + value`: all of it"
        " is new (*restart*) |",
    ),
    Rule(
        "drop",
        lambda row, read: read.value < row.last_read,
        lambda row, read: (row.quantity, row.quantity - read.value),
        DROP,
        "| a value below the one last read (eviction, lagging replica, snapshot restore, a writer lowering it)"
        " | `quantity` unchanged, offset `quantity - value`; growth after it counts (*drop*) |",
    ),
    Rule(
        "rebase",
        lambda row, read: read.value > row.last_read and _takes_new_life(row, read),
        lambda row, read: (max(row.quantity, read.value), max(row.quantity - read.value, 0)),
        REBASE,
        "it may hold counts the offset holds already, so it is never taken for growth over the last read (the rebase).",
    ),
    Rule(
        "new life, same value",
        _takes_new_life,
        lambda row, read: (row.quantity, row.offset),
        None,
        "A row whose value did not change is never rewritten, except to take the current life where it"
        " holds an offset.",
    ),
    Rule(
        "growth",
        lambda row, read: True,
        lambda row, read: (row.offset + read.value, row.offset),
        None,
        "| a value at or above the one last read | `redis_offset + value` (growth) |",
    ),
)


@dataclass(frozen=True)
class Step:
    """What one read does to one row."""

    #: the row after the read (the stored row itself where nothing is written)
    row: Row
    #: the name of the rule that applied
    rule: str
    #: ``restart``, ``drop``, ``rebase`` or ``None``: counted in ``resets`` unless :attr:`unchanged`
    reset: str | None
    #: nothing to write: the rule gives the row its own quantity and offset, and it need not
    #: take the current life (a row without an offset keeps the life it was read from)
    unchanged: bool
    #: the total would pass the bigint: the row is left as it was and its key set aside as bad
    refused: bool
    #: a reset whose value is below the one last read, and the total did not fall (``decreases_refused``)
    decrease_refused: bool

    @property
    def written(self) -> bool:
        return not (self.unchanged or self.refused)


def rule_for(row: Row | None, read: Read) -> Rule:
    """The first rule of :data:`RULES` that applies."""
    return next(rule for rule in RULES if rule.applies(row, read))


def next_state(row: Row | None, read: Read) -> Step:
    """The row's next state for ``read`` (``row`` ``None``: no row yet)."""
    rule = rule_for(row, read)
    quantity, offset = rule.outcome(row, read)
    if row is None:
        return Step(Row(quantity, offset, read.life), rule.name, None, False, False, False)
    unchanged = (quantity, offset) == (row.quantity, row.offset) and not _must_take_life(row, read)
    refused = not unchanged and quantity > BIGINT_MAX
    decrease_refused = rule.reset is not None and read.value < row.last_read
    written = not (unchanged or refused)
    return Step(
        Row(quantity, offset, read.life) if written else row,
        rule.name,
        rule.reset,
        unchanged,
        refused,
        decrease_refused,
    )
