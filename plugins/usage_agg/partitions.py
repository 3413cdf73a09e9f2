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
