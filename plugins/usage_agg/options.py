"""One options object for one date's aggregation.

The operator, the expiry check's rescue, the CLI and the benchmark all build an
:class:`AggregationOptions` and hand it down (``aggregate_day`` -> reader and writer), so
a new setting is added here and where it is used, not to five signatures on the way.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass

from usage_agg.keys import check_merchant_id
from usage_agg.lock_waits import DEFAULT_LOCK_TIMEOUT
from usage_agg.source import DEFAULT_BATCH_SIZE, DEFAULT_SCAN_COUNT, DISCOVERY_MODES


@dataclass(frozen=True)
class AggregationOptions:
    """What shapes one date's aggregation; checked when built.

    :param merchant_id: only this merchant's keys; ``None`` for every merchant.
    :param table: the usage table, ``name`` or ``schema.name``.
    :param allow_decrease: Redis is the truth: set each row to its Redis value, even lower.
    :param batch_size: keys read per pipelined round trip and staged per ``COPY``.
    :param scan_count: the ``COUNT`` hint of each ``SCAN``/``SSCAN``.
    :param lock_timeout: the longest wait for any lock in the day's transaction.
    :param discovery: ``auto`` (the day's index when it exists, else ``SCAN``; always
        ``SCAN`` for one merchant), ``index`` or ``scan``.
    :param create_schema: create (or upgrade) the tables when needed.
    :param partition: only the keys of this Redis Cluster primary (one part of a
        fanned-out day, see :mod:`usage_agg.partitions`), committed alone.
    :param partition_count: how many parts the day was split into (with ``partition``).
    :param hourly: also aggregate each key's hourly hash into the hourly table.
    """

    merchant_id: str | None = None
    table: str = "merchant_usage"
    allow_decrease: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE
    scan_count: int = DEFAULT_SCAN_COUNT
    lock_timeout: dt.timedelta = DEFAULT_LOCK_TIMEOUT
    discovery: str = "auto"
    create_schema: bool = True
    partition: str | None = None
    partition_count: int | None = None
    hourly: bool = True

    def __post_init__(self) -> None:
        if self.merchant_id is not None:
            if not isinstance(self.merchant_id, str) or not self.merchant_id:
                raise ValueError(f"merchant_id: must be a non-empty string or None, got {self.merchant_id!r}")
            check_merchant_id(self.merchant_id)
        if (self.partition is None) != (self.partition_count is None) or (
            self.partition_count is not None and self.partition_count < 1
        ):
            raise ValueError(
                f"redis_partition and partition_count: give both (a positive count) or neither, "
                f"got {self.partition!r} and {self.partition_count!r}"
            )
        if self.discovery not in DISCOVERY_MODES:
            raise ValueError(f"discovery: must be one of {', '.join(DISCOVERY_MODES)}, got {self.discovery!r}")
        if self.batch_size < 1 or self.scan_count < 1:
            raise ValueError("batch_size and scan_count must be positive")

    def replace(self, **changes) -> AggregationOptions:
        return dataclasses.replace(self, **changes)
