"""The Redis lives a usage schema has read: the registry behind the reset rules.

A row's offset stands for what was counted before its Redis counter was reset, and
which reset a new value means depends on the server life it was read from (see the
rules in :mod:`usage_agg.write_routes`). Each run notes, in ``usage_redis_incarnations``, the
lives it reads (:mod:`usage_agg.servers` tells them apart) and learns which older lives
a life started empty after; a life seen taking keys in is noted as not empty for good.

This is its own module because the registry outlives any one day's write: it is written
in short transactions of its own, before and beside the day's transaction
(:class:`usage_agg.sink.DayWriter`), so runs of other dates never wait on each other here.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from usage_agg.lock_waits import DEFAULT_LOCK_TIMEOUT, pg_milliseconds
from usage_agg.schema import SchemaNames
from usage_agg.servers import RedisIncarnation


@dataclass(frozen=True)
class Source:
    """A Redis server life as the usage schema knows it (see :func:`register_incarnations`)."""

    id: int | None
    #: incarnations whose rows hold nothing of what this one holds: it started empty after their last read
    predecessors: tuple[int, ...] = ()


def register_incarnations(
    conn,
    names: SchemaNames,
    incarnations: dict[str, RedisIncarnation],
    lock_timeout: dt.timedelta = DEFAULT_LOCK_TIMEOUT,
) -> dict[str, Source]:
    """Note the Redis lives a run reads, in a short transaction of its own, and commit.

    Runs of other dates note the same lives at the same time; a transaction of its own
    keeps them from waiting on each other's day transactions.
    """
    sources = {}
    with conn.cursor() as cur:
        cur.execute("SELECT set_config('lock_timeout', %s, true)", (pg_milliseconds(lock_timeout),))
        for address, life in sorted(incarnations.items()):
            cur.execute(
                f"""INSERT INTO {names.incarnations.quoted} AS i
                        (run_id, address, started_at, started_empty, first_seen, last_seen)
                    VALUES (%(run_id)s, %(address)s, %(started_at)s, %(started_empty)s, %(seen)s, %(seen)s)
                    ON CONFLICT (run_id) DO UPDATE
                       SET last_seen = greatest(i.last_seen, EXCLUDED.last_seen), address = EXCLUDED.address,
                           started_empty = i.started_empty AND EXCLUDED.started_empty
                    RETURNING id, started_empty""",
                {**life.__dict__, "seen": life.seen_at},
            )
            # Started empty as every read of this life said: a read that saw keys taken in
            # (RESTORE) is not undone by the statistics being reset (CONFIG RESETSTAT) since.
            own_id, started_empty = cur.fetchone()
            cur.execute(
                f"""SELECT coalesce(array_agg(id ORDER BY id), '{{}}') FROM {names.incarnations.quoted}
                    WHERE %(empty)s AND id <> %(id)s AND last_seen < %(started_at)s""",
                {"empty": started_empty, "id": own_id, "started_at": life.started_at},
            )
            sources[address] = Source(own_id, tuple(cur.fetchone()[0]))
    conn.commit()
    return sources


def note_keys_taken_in(conn, names: SchemaNames, run_id: str) -> None:
    """Record, in a transaction of its own, that a Redis life did not start empty after all
    (a run saw it take keys in, and failed): statistics reset before the retry
    (``CONFIG RESETSTAT``) cannot then make it look empty again."""
    with conn.cursor() as cur:
        cur.execute(f"UPDATE {names.incarnations.quoted} SET started_empty = false WHERE run_id = %s", (run_id,))
    conn.commit()
