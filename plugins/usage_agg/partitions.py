"""How one day's keys split into parts that separate workers can aggregate.

On Redis Cluster each primary serves its own slots: a part is one primary, named
``host:port`` as redis-py names its nodes, and reads only the keys that primary
holds. A single node is one part. The hourly DAG maps one task per part when its
fan-out is on (``USAGE_AGGREGATION_FAN_OUT``).
"""

from __future__ import annotations


def is_cluster(client) -> bool:
    return type(client).__name__ == "RedisCluster"


def redis_partitions(client) -> list[str]:
    """The parts of the keyspace: every primary of a cluster, or the single node itself."""
    if is_cluster(client):
        return sorted(node.name for node in client.get_primaries())
    return [node_address(client)]


def node_address(client) -> str:
    """A single-node client's server as ``host:port``, as redis-py names cluster nodes."""
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def partition_node(client, partition: str | None):
    """The cluster primary a part names, or ``None`` to read the whole keyspace (a single node)."""
    if partition is None or not is_cluster(client):
        return None
    primaries = client.get_primaries()
    for node in primaries:
        if node.name == partition:
            return node
    names = ", ".join(sorted(node.name for node in primaries))
    raise ValueError(f"redis_partition: {partition!r} is not a primary of this cluster ({names})")


class RedisReshardedDuringRun(RuntimeError):
    """A part's primary took, gave or was moving slots while the part was read. Transient."""


def part_layout(client, partition: str | None) -> str | None:
    """The slots a part's primary serves, as the primary itself says (``CLUSTER NODES``), with
    any slot it is moving in or out (``[slot->-node]``, ``[slot-<-node]``), after its config
    epoch. ``None`` for a whole-day read or a single node: nothing else reads its keys at the
    same time.

    Parts of a day commit apart; a slot moving between two primaries while their parts read
    could have one key read by both, and an older read merged after a newer one looks like
    a drop. A part whose layout is not the same, and still, from its start to its commit
    commits nothing (:func:`check_layout_unchanged`). The epoch tells a slot that moved away
    and back: a primary taking a slot in bumps its config epoch, which never goes back.
    """
    node = partition_node(client, partition)
    if node is None:
        return None
    reply = client.get_redis_connection(node).execute_command("CLUSTER", "NODES")  # raw: no parser's shape
    for line in (reply.decode() if isinstance(reply, bytes) else reply).splitlines():
        fields = line.split()
        if "myself" in fields[2].split(","):
            return f"epoch {fields[6]}: " + " ".join(fields[8:])
    raise RuntimeError(f"CLUSTER NODES of {partition} names no node as itself")


def served_slots(layout: str) -> set[int]:
    """The slots a :func:`part_layout` serves (a slot moving in or out is not yet, or still, served)."""
    slots: set[int] = set()
    for item in layout.partition(": ")[2].split():
        if not item.startswith("["):
            first, _, last = item.partition("-")
            slots.update(range(int(first), int(last or first) + 1))
    return slots


def check_layout_unchanged(client, partition: str | None, before: str | None) -> None:
    """Raise :class:`RedisReshardedDuringRun` if the part's slots moved since ``before`` (or were moving then)."""
    if before is None:
        return
    now = part_layout(client, partition)
    if now != before or "[" in before:
        raise RedisReshardedDuringRun(
            f"the slots of Redis Cluster primary {partition} moved while its part was read ({_shown(before)} ->"
            f" {_shown(now)}): a key may have been read by two parts; nothing of this part is committed, and"
            " the retry reads the new layout"
        )


def _shown(layout: str | None, limit: int = 200) -> str:
    """A layout for an error message: a primary of many slot ranges is shortened."""
    text = layout or "none"
    return text if len(text) <= limit else f"{text[:limit]}..."
