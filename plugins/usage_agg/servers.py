"""Which life of which Redis server a day's counters were read from.

A counter only grows while the Redis process holding it lives. When Redis restarts
without persistence every counter starts again from zero; after a failover to a
lagging replica or a restore from a snapshot, counters go back to older values. The
values alone cannot always tell (a counter that passes its old total before the next
run looks like growth), so each run notes the server's *incarnation*: its ``run_id``
(new with every start) and how it started (see :attr:`RedisIncarnation.started_empty`).
The writer keeps, per row, the incarnation its last value came from
(:mod:`usage_agg.write_routes`), which is how it tells a restart from growth.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from usage_agg.partitions import is_cluster, node_address

#: Commands that copy keys in from elsewhere (``MIGRATE`` sends ``RESTORE``): a server
#: that ran one did not build its counters from zero.
_COPY_COMMANDS = ("cmdstat_restore", "cmdstat_restore-asking")


class RedisRestartedDuringRun(RuntimeError):
    """The server's life changed while a day was read (it restarted, or, started empty, took in keys
    from elsewhere): its values mix two lives. Transient."""


class RedisTookKeysIn(RedisRestartedDuringRun):
    """A server noted as started empty took in keys from elsewhere (``MIGRATE``) while a day
    was read. The caller records that this life did not start empty before the retry."""

    def __init__(self, message: str, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


@dataclass(frozen=True)
class RedisIncarnation:
    """One life of one Redis server (a primary, on a cluster)."""

    #: the server's ``run_id``, with its replication id after it (``run_id/replid``) where it
    #: is or was a replica in this process (see :func:`_life_id`)
    run_id: str
    address: str
    #: when this life began, on the server's clock, rounded down a second more to be safe
    started_at: dt.datetime
    #: this life began with an empty keyspace and every counter in it was counted from
    #: zero since: no keys loaded at start (RDB or AOF), never a replica (a promoted
    #: replica keeps its old primary's replication id as ``master_replid2``), no keys
    #: copied in with ``RESTORE``/``MIGRATE``. Only then is a row last read from an
    #: older life known to hold none of what Redis holds now.
    started_empty: bool
    #: the server's clock when this was read
    seen_at: dt.datetime


#: The ``INFO`` sections :func:`server_life` reads, in the order :func:`read_incarnation` asks for them.
INFO_SECTIONS = ("server", "persistence", "replication", "commandstats")


@dataclass(frozen=True)
class ServerLife:
    """What one reply of ``INFO`` says about the server's life (see :func:`server_life`)."""

    #: the ``run_id``, with the replication id after it (``run_id/replid``) where the server
    #: is or was a replica in this process (see :func:`_life_id`)
    life_id: str
    #: when this life began, on the server's clock, rounded down a second more to be safe
    started_at: dt.datetime
    #: the server's clock when ``INFO`` was read
    seen_at: dt.datetime
    #: keys may have been loaded at start: a snapshot's (``rdb_last_load_keys_loaded`` not 0, or
    #: unknown before Redis 7.0) or an append-only file's (``aof_enabled`` not 0, or unknown)
    may_have_loaded_keys: bool
    #: the server is a replica, or was one in this process (a promoted replica keeps its old
    #: primary's replication id as ``master_replid2``): its data came by replication
    replicated: bool
    #: the server ran ``RESTORE`` (what ``MIGRATE`` sends; ``RESTORE-ASKING`` on a cluster):
    #: keys were copied in from elsewhere
    took_keys_in: bool

    @property
    def started_empty(self) -> bool:
        """Every counter this life holds was counted from zero in it: nothing loaded at start,
        never a replica, nothing copied in (:attr:`RedisIncarnation.started_empty`)."""
        return not (self.may_have_loaded_keys or self.replicated or self.took_keys_in)

    def incarnation(self, address: str) -> RedisIncarnation:
        """This life as the writer notes it, for the server at ``address``."""
        return RedisIncarnation(self.life_id, address, self.started_at, self.started_empty, self.seen_at)


def server_life(
    server: Mapping[str, Any],
    persistence: Mapping[str, Any],
    replication: Mapping[str, Any],
    commandstats: Mapping[str, Any],
) -> ServerLife:
    """The life facts in one reply of ``INFO``, given its sections parsed as redis-py returns
    them (``client.info(section)``). No I/O: every decision on ``INFO`` fields is made here."""
    now = dt.datetime.fromtimestamp(int(server["server_time_usec"]) / 1e6, dt.UTC)
    uptime = dt.timedelta(seconds=int(server["uptime_in_seconds"]) + 1)
    loaded = persistence.get("rdb_last_load_keys_loaded")  # Redis 7.0+; unknown before: assume loaded
    return ServerLife(
        life_id=_life_id(server, replication),
        started_at=now - uptime,
        seen_at=now,
        may_have_loaded_keys=(loaded is None or int(loaded) != 0 or str(persistence.get("aof_enabled", "1")) != "0"),
        replicated=_replicated(replication),
        took_keys_in=any(int(commandstats.get(name, {}).get("calls", 0)) for name in _COPY_COMMANDS),
    )


def read_incarnation(node_client, address: str) -> RedisIncarnation:
    """The incarnation of one server, from its ``INFO`` (one round trip)."""
    pipe = node_client.pipeline(transaction=False)
    for section in INFO_SECTIONS:
        pipe.info(section)
    return server_life(*pipe.execute()).incarnation(address)


def _life_id(server, replication) -> str:
    """The ``run_id``, and the replication id where the server's data may have been replaced
    by replication since it started: a replica, or a primary that was one (a failback, a
    snapshot restored through a replica link) keeps its ``run_id``, but its counters then
    come from elsewhere. Each replication history is then a life of its own (a primary
    never a replica, the usual case, keeps the plain ``run_id``)."""
    run_id = str(server["run_id"])
    if not _replicated(replication):
        return run_id
    return f"{run_id}/{replication.get('master_replid')}"


def _replicated(replication) -> bool:
    """Whether the server is a replica or was one in this process (a primary that was promoted
    keeps its former primary's replication id as ``master_replid2``)."""
    return not (replication.get("role") == "master" and _is_zero_id(replication.get("master_replid2")))


def _is_zero_id(value) -> bool:
    """Whether a replication id is all zeros (redis-py may have parsed it as the int 0)."""
    try:
        return value is not None and int(str(value), 16) == 0
    except ValueError:
        return False


def node_clients(client, partition: str | None = None) -> dict[str, Any]:
    """A plain client per server a read covers: the node itself, or a cluster's primaries
    (only ``partition``'s, when given), by ``host:port``."""
    if not is_cluster(client):
        return {node_address(client): client}
    nodes = [node for node in client.get_primaries() if partition is None or node.name == partition]
    return {node.name: client.get_redis_connection(node) for node in nodes}


def read_incarnations(client, partition: str | None = None) -> dict[str, RedisIncarnation]:
    """:func:`read_incarnation` of every server a read covers, by ``host:port``."""
    return {address: read_incarnation(node, address) for address, node in node_clients(client, partition).items()}


def check_unchanged(client, before: dict[str, RedisIncarnation], partition: str | None = None) -> None:
    """Raise :class:`RedisRestartedDuringRun` if a server restarted since ``before`` was read,
    or if a server that had started empty received keys from elsewhere since (``MIGRATE``
    during a cluster reshard): its values may then include what another server's rows
    already hold, and the run must not take them for counts begun from zero."""
    for address, node in node_clients(client, partition).items():
        if address not in before:
            continue
        change = life_change(address, before[address], read_incarnation(node, address))
        if change is not None:
            raise change


def life_change(address: str, before: RedisIncarnation, now: RedisIncarnation) -> RedisRestartedDuringRun | None:
    """Why the values a run read from the server at ``address`` between ``before`` and ``now``
    may mix two lives (see :func:`check_unchanged`), or ``None``. No I/O."""
    if now.run_id != before.run_id:
        return RedisRestartedDuringRun(
            f"Redis at {address} restarted, or took its data by replication, while the day was read (run_id "
            f"{before.run_id} -> {now.run_id}); nothing of this run is committed, and the retry reads"
            " the new server"
        )
    if before.started_empty and not now.started_empty:
        return RedisTookKeysIn(
            f"Redis at {address} started empty, and received keys from elsewhere (MIGRATE or RESTORE, a "
            "cluster reshard?) while the day was read; nothing of this run is committed, and the retry "
            "no longer takes its values for counts begun from zero",
            now.run_id,
        )
    return None
