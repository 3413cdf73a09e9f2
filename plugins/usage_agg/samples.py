"""How many examples a run's report names: every count is complete, the samples are its first few.

One limit for the resets, mismatches and unsaved keys that an aggregation run, its merges and the
expiry check name one by one (in the log, the result and the XCom), so that a day of a million
resets does not make a result of a million entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: Examples named per kind of finding; all are counted.
SAMPLE_LIMIT = 20


def add_samples(samples: list, more: Sequence[Any]) -> None:
    """Append to ``samples`` as many of ``more`` as fit under :data:`SAMPLE_LIMIT`."""
    samples.extend(more[: max(SAMPLE_LIMIT - len(samples), 0)])
