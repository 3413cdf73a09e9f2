"""Real single Redis servers that tests start, crash, restart and fail over, on spare loopback ports.

Each server runs in its own process group with its own folder (its RDB snapshot lives
there); :meth:`LocalRedisServer.stop` kills the group. Used where the Redis server's
own life is what a test is about: restarts, snapshots, replicas, eviction.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from tests.conftest import redis_server_binary

#: Redis tells its start to the second, and the package rounds it down a second more
#: (servers.py): a restart within two seconds of the last read is taken for a rollback
#: (the safe side), so tests of restarts let more than two seconds pass first (1.2 s
#: failed now and then when the first aggregation was quick).
UPTIME_RESOLUTION = 2.2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalRedisServer:
    """One ``redis-server``; persistence off unless the options ask for it."""

    def __init__(self, workdir: Path, *options: str) -> None:
        self.port = free_port()
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir(parents=True)
        self.options = options
        self.process: subprocess.Popen | None = None

    def start(self, *extra: str, timeout: float = 30) -> LocalRedisServer:
        self.process = subprocess.Popen(
            [
                redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "no", *self.options, *extra,
            ],
            stdout=open(self.dir / "redis.log", "ab"),  # noqa: SIM115 - lives with the process
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        probe = redis.Redis(port=self.port, socket_timeout=1)
        while True:
            try:
                if probe.ping() and not int(probe.info("persistence").get("loading", 0)):
                    break
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start: {(self.dir / 'redis.log').read_text()}")
            time.sleep(0.05)
        probe.close()
        return self

    def crash(self) -> None:
        """SIGKILL: the server dies as in a crash or an OOM kill, saving nothing."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None

    def restart(self, *extra: str) -> LocalRedisServer:
        """Crash, then start again on the same port and folder (a snapshot there is loaded)."""
        self.crash()
        return self.start(*extra)

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    stop = crash
