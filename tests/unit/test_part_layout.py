"""A part's slot layout, as a cluster primary reports it in ``CLUSTER NODES``.

A stub stands in for the cluster here: what is tested is the reading of the reply (a real
reshard during a part's read is in tests/integration/test_cluster.py).
"""

from __future__ import annotations

import pytest

from usage_agg.partitions import (
    RedisReshardedDuringRun,
    check_layout_unchanged,
    node_address,
    part_layout,
    partition_node,
    served_slots,
)

OTHER = b"af19 127.0.0.1:7001@17001 master - 0 1796088499000 0 connected 5461-10921\n"


class Node:
    name = "127.0.0.1:7000"

    def __init__(self, replies):
        self.replies = list(replies)

    def execute_command(self, *args):
        assert args == ("CLUSTER", "NODES")
        epoch, _, slots = self.replies.pop(0).partition(b" ")
        return OTHER + b"19c3 127.0.0.1:7000@17000 myself,master - 0 0 " + epoch + b" connected " + slots + b"\n"


class DecodingNode(Node):
    """A node of a client made with ``decode_responses=True``: replies are text."""

    def execute_command(self, *args):
        return super().execute_command(*args).decode()


class RedisCluster:  # the name is how the package tells a cluster client
    def __init__(self, *replies):
        self.node = Node(replies)

    def get_primaries(self):
        return [self.node]

    def get_redis_connection(self, node):
        return node


def test_the_layout_is_the_primarys_own_line():
    assert part_layout(RedisCluster(b"2 0-5460 5462"), "127.0.0.1:7000") == "epoch 2: 0-5460 5462"
    assert part_layout(RedisCluster(b"2 "), None) is None  # a whole-day read: no part to watch
    decoding = RedisCluster()
    decoding.node = DecodingNode([b"2 0-5460"])
    assert part_layout(decoding, "127.0.0.1:7000") == "epoch 2: 0-5460"


class Single:
    def __init__(self, **connection_kwargs):
        self.connection_pool = type("Pool", (), {"connection_kwargs": connection_kwargs})()


def test_a_single_node_is_named_by_its_host_and_port_with_redis_pys_defaults():
    assert node_address(Single(host="10.0.0.5", port=6380)) == "10.0.0.5:6380"
    import redis

    defaults = redis.Redis().connection_pool.connection_kwargs  # what a client made without them connects to
    assert node_address(Single()) == f"{defaults['host']}:{defaults['port']}"


def test_served_slots_leave_out_slots_moving_in():
    assert served_slots("epoch 3: 0-2 5 [7-<-abc] [2->-def]") == {0, 1, 2, 5}
    assert served_slots("epoch 3: ") == served_slots("") == set()


@pytest.mark.parametrize(
    ("before", "after", "moved"),
    [
        (b"2 0-5460", b"2 0-5460", False),
        (b"2 0-5460", b"2 0-5459", True),  # gave a slot away
        (b"2 0-5460", b"2 0-5460 [5461-<-af19]", True),  # taking one in
        (b"2 0-5460 [5460->-af19]", b"2 0-5460 [5460->-af19]", True),  # was moving one when the part began
        (b"2 0-5460", b"4 0-5460", True),  # gave one away and took it back: the same slots, a new epoch
    ],
)
def test_a_part_whose_slots_moved_commits_nothing(before, after, moved):
    client = RedisCluster(before, after)
    layout = part_layout(client, "127.0.0.1:7000")
    if not moved:
        check_layout_unchanged(client, "127.0.0.1:7000", layout)
        return
    with pytest.raises(RedisReshardedDuringRun, match="^the slots of Redis Cluster primary 127.0.0.1:7000 moved") as caught:
        check_layout_unchanged(client, "127.0.0.1:7000", layout)
    assert str(caught.value).endswith("nothing of this part is committed, and the retry reads the new layout")
    assert f"({layout} -> epoch" in str(caught.value)  # a short layout is shown whole


def test_a_long_layout_is_shortened_in_the_error():
    ranges = " ".join(f"{n}" for n in range(0, 2000, 2)).encode()
    client = RedisCluster(b"2 " + ranges, b"3 " + ranges)
    layout = part_layout(client, "127.0.0.1:7000")
    with pytest.raises(RedisReshardedDuringRun) as caught:
        check_layout_unchanged(client, "127.0.0.1:7000", layout)
    assert f"({layout[:200]}... -> epoch 3: 0 2 4" in str(caught.value) and len(str(caught.value)) < 700


def test_a_layout_of_exactly_the_limit_is_shown_whole():
    slots = b"1" * (200 - len("epoch 2: "))
    client = RedisCluster(b"2 " + slots, b"3 " + slots)
    layout = part_layout(client, "127.0.0.1:7000")
    assert len(layout) == 200
    with pytest.raises(RedisReshardedDuringRun) as caught:
        check_layout_unchanged(client, "127.0.0.1:7000", layout)
    assert f"({layout} -> epoch 3: " in str(caught.value) and "..." not in str(caught.value).split(" -> ")[0]


def test_an_unknown_part_is_refused_with_the_primaries_named():
    client = RedisCluster()
    other = Node([])
    other.name = "127.0.0.1:7001"
    client.get_primaries = lambda: [client.node, other]
    with pytest.raises(ValueError) as caught:
        partition_node(client, "127.0.0.1:1")
    assert str(caught.value) == (
        "redis_partition: '127.0.0.1:1' is not a primary of this cluster (127.0.0.1:7000, 127.0.0.1:7001)"
    )


def test_a_reply_that_names_no_node_as_itself_is_an_error():
    client = RedisCluster()
    client.node.execute_command = lambda *args: OTHER
    with pytest.raises(RuntimeError, match="^CLUSTER NODES of 127.0.0.1:7000 names no node as itself$"):
        part_layout(client, "127.0.0.1:7000")
