"""What merging staged rows did, and the one way its counts are added up.

A day's merge reports in pieces (each chunk, each table, each round of a key read
twice); :class:`MergeResult` holds one piece and :func:`add_merge` adds a piece to a
total, a :class:`MergeResult` or the run's :class:`usage_agg.aggregate.AggregationResult`,
which name these counts alike. Written once, so a new count is added in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from usage_agg.samples import add_samples
from usage_agg.source import BadKey

#: the counts a merge reports, named alike in :class:`MergeResult` and the run's result
COUNTS = (
    "rows_written",
    "rows_unchanged",
    "decreases_refused",
    "resets",
    "hourly_rows_written",
    "hourly_rows_unchanged",
    "hourly_resets",
)


@dataclass
class MergeResult:
    rows_written: int = 0
    rows_unchanged: int = 0
    #: Redis values lower than the value last read, which did not lower the total
    decreases_refused: int = 0
    #: rows whose counter was found reset (restarts, drops and rebases)
    resets: int = 0
    reset_samples: list[dict] = field(default_factory=list)
    #: counters PostgreSQL refused (set aside as bad keys; the rest of the chunk is merged)
    refused: list[BadKey] = field(default_factory=list)
    #: the same for the hourly rows of the chunk (their refused rows are in :attr:`refused`)
    hourly_rows_written: int = 0
    hourly_rows_unchanged: int = 0
    hourly_resets: int = 0

    def add(self, other: MergeResult) -> None:
        add_merge(self, other)
        self.refused.extend(other.refused)


class MergeTotal(Protocol):
    """A total that merges add up into: the :data:`COUNTS` as attributes, and reset samples."""

    reset_samples: list[dict]


def add_merge(total: MergeTotal, merged: MergeResult) -> None:
    """Add ``merged``'s counts (:data:`COUNTS`) and reset samples to ``total``."""
    for name in COUNTS:
        setattr(total, name, getattr(total, name) + getattr(merged, name))
    add_samples(total.reset_samples, merged.reset_samples)
