"""A real Redis Cluster of three primaries on loopback, started from the ``redis-server`` binary
(the machine's, or the embedded one where it has none: ``tests.conftest.redis_server_binary``).

Each node runs in its own process group in a temporary folder and keeps nothing on
disk but its cluster config; :meth:`LocalRedisCluster.stop` kills the groups.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import redis_server_binary


def _free_ports(count: int) -> list[int]:
    """Ports free now, below 55536: a cluster node also listens on its port + 10000."""
    ports: list[int] = []
    candidate = random.randrange(20000, 50000)
    while len(ports) < count:
        candidate += 1
        with socket.socket() as sock, socket.socket() as bus:
            try:
                sock.bind(("127.0.0.1", candidate))
                bus.bind(("127.0.0.1", candidate + 10000))
            except OSError:
                continue
        ports.append(candidate)
    return ports


class LocalRedisCluster:
    def __init__(self, workdir: Path, primaries: int = 3):
        self.workdir = workdir
        self.ports = _free_ports(primaries)
        self.processes: dict[int, subprocess.Popen] = {}

    def start(self, timeout: float = 60) -> None:
        import redis

        for port in self.ports:
            self._spawn(port)
        deadline = time.monotonic() + timeout
        for port in self.ports:
            while not self._answers(port):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {port} did not start")
                time.sleep(0.1)
        # Assign the 16384 slots evenly over the primaries, then introduce them to each other.
        per_node = 16384 // len(self.ports)
        for index, port in enumerate(self.ports):
            first = index * per_node
            last = 16383 if index == len(self.ports) - 1 else first + per_node - 1
            node = redis.Redis(port=port)
            node.execute_command("CLUSTER ADDSLOTS", *range(first, last + 1))  # ADDSLOTSRANGE is Redis 7+
            for other in self.ports:
                node.execute_command("CLUSTER MEET", "127.0.0.1", other)
            node.close()
        while not all(self._cluster_ok(port) for port in self.ports):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster never reached cluster_state:ok")
            time.sleep(0.2)

    def _spawn(self, port: int) -> None:
        node_dir = self.workdir / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        self.processes[port] = subprocess.Popen(
            [
                redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"), "--dir", str(node_dir),
                "--save", "", "--appendonly", "no", "--cluster-node-timeout", "5000",
            ],
            stdout=open(node_dir / "redis.log", "ab"),  # noqa: SIM115 - lives with the process
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def restart_empty(self, port: int, timeout: float = 60) -> None:
        """Kill one primary and start it again with its cluster config and no data (no
        persistence): a new life, started empty, serving the same slots."""
        self._restart(port, None, timeout)

    def snapshot(self, port: int) -> Path:
        """One primary's data now, as an RDB file beside its folder (``SAVE``), for :meth:`restart_from`."""
        import redis

        node = redis.Redis(port=port)
        node.save()
        node.close()
        kept = self.workdir / f"{port}-snapshot-{time.monotonic_ns()}.rdb"
        shutil.move(self.workdir / str(port) / "dump.rdb", kept)
        return kept

    def restart_from(self, port: int, snapshot: Path, timeout: float = 60) -> None:
        """Kill one primary and start it again from an RDB snapshot (:meth:`snapshot`): a new
        life that did not start empty, as a restore of the last good backup makes."""
        self._restart(port, snapshot, timeout)

    def _restart(self, port: int, snapshot: Path | None, timeout: float) -> None:
        process = self.processes.pop(port)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        dump = self.workdir / str(port) / "dump.rdb"
        dump.unlink(missing_ok=True)
        if snapshot is not None:
            shutil.copy(snapshot, dump)
        self._spawn(port)
        deadline = time.monotonic() + timeout
        while not (self._answers(port) and all(self._cluster_ok(p) for p in self.ports)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster never recovered after restarting {port}")
            time.sleep(0.2)

    def migrate_slot(self, slot: int, to_port: int) -> None:
        """Move one slot and its keys to another primary as a reshard does (``SETSLOT``,
        ``MIGRATE``, which the receiving server runs as ``RESTORE-ASKING``)."""
        import redis

        nodes = {port: redis.Redis(port=port) for port in self.ports}
        try:
            ids = {port: node.execute_command("CLUSTER MYID").decode() for port, node in nodes.items()}
            from_port = self._serving(slot)
            nodes[to_port].execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[from_port])
            nodes[from_port].execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[to_port])
            while keys := nodes[from_port].execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
                nodes[from_port].execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)
            for node in nodes.values():
                node.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[to_port])
        finally:
            for node in nodes.values():
                node.close()

    def reassign_slot(self, slot: int, to_port: int, timeout: float = 30) -> None:
        """Give a slot to another primary by ``CLUSTER DELSLOTS``/``ADDSLOTS``, as an operator
        may: its keys stay where they were, on a primary that no longer serves the slot."""
        import redis

        for port in self.ports:
            with redis.Redis(port=port) as node:
                node.execute_command("CLUSTER DELSLOTS", slot)
        with redis.Redis(port=to_port) as node:
            node.execute_command("CLUSTER ADDSLOTS", slot)
        deadline = time.monotonic() + timeout
        while not all(self._serving(slot, asking=port) == to_port for port in self.ports):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster never agreed that {to_port} serves slot {slot}")
            time.sleep(0.1)

    def port_of(self, key: str) -> int:
        """The port of the primary serving ``key``'s slot."""
        port = self._serving(self.slot_of(key))
        if port is None:
            raise RuntimeError(f"no primary serves {key!r}")
        return port

    def merchant_where(self, wanted: Callable[[str], bool], tries: int = 1000) -> str:
        """A merchant id (``m0``, ``m1``, ...) whose keys land where a test needs them:
        ``wanted(merchant)`` asks, typically of :meth:`port_of` its keys."""
        for n in range(tries):
            if wanted(f"m{n}"):
                return f"m{n}"
        raise RuntimeError(f"none of {tries} merchant ids lands as wanted")

    def slot_of(self, key: str) -> int:
        import redis

        with redis.Redis(port=self.ports[0]) as node:
            return int(node.execute_command("CLUSTER KEYSLOT", key))

    def _serving(self, slot: int, asking: int | None = None) -> int | None:
        """The port of the primary serving ``slot``, as the first node (or ``asking``) sees it."""
        import redis

        with redis.Redis(port=asking or self.ports[0]) as node:
            for first, last, (_, port, *_), *_ in node.execute_command("CLUSTER SLOTS"):
                if first <= slot <= last:
                    return int(port)
        return None

    @staticmethod
    def _answers(port: int) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=port, socket_timeout=1).ping())
        except redis.ConnectionError:
            return False

    def _cluster_ok(self, port: int) -> bool:
        import redis

        info = redis.Redis(port=port).cluster("info")
        return info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == len(self.ports)

    def client(self):
        from redis.cluster import RedisCluster

        return RedisCluster(host="127.0.0.1", port=self.ports[0])

    def stop(self) -> None:
        for process in self.processes.values():
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        self.processes.clear()
