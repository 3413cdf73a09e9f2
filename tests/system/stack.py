"""A real Airflow deployment for the tests: its own metadata DB, scheduler and API server.

Airflow runs as its users run it: a PostgreSQL metadata database (created here,
dropped afterwards), the LocalExecutor, and the long-running processes of the
installed Airflow major (3: ``api-server``, ``scheduler``, ``dag-processor``;
2: ``scheduler``, ``webserver``). Every process starts in its own process group
and the whole group is stopped, so nothing is left running after the tests.
:class:`CeleryStack` runs the same installation on the CeleryExecutor with workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from airflow import __version__ as AIRFLOW_VERSION
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
AIRFLOW_V3 = Version(AIRFLOW_VERSION).major >= 3
ADMIN_USER = "admin"
#: what Airflow 2's backfill CLI says when its own metadata-DB connection is lost
LOST_METADATA_CONNECTION = "server closed the connection unexpectedly"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AirflowStack:
    """One Airflow installation under ``home``; ``env`` is what every process of it sees."""

    def __init__(self, home: Path, metadata_dsn: str, extra_env: dict[str, str]):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        #: random; one in 64 starts with "-", which argparse takes for an option unless given as --password=...
        self.password = secrets.token_urlsafe(12)
        #: the metadata DB as libpq reads it (the SQLAlchemy URL without its driver)
        self.metadata_dsn = metadata_dsn.replace("postgresql+psycopg2", "postgresql")
        self.processes: dict[str, subprocess.Popen] = {}
        self.unpaused: set[str] = set()
        self.parsed: set[str] = set()
        self.env = {
            **os.environ,
            **extra_env,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_dsn,
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGS_FOLDER": str(self._dags_folder()),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            # The DAG files do not change during the tests: parse them once, not every few seconds.
            "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "600",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        }
        if AIRFLOW_V3:
            passwords = home / "simple_auth_manager_passwords.json"
            passwords.write_text(json.dumps({ADMIN_USER: self.password}))
            self.env.update(
                {
                    "AIRFLOW__CORE__AUTH_MANAGER": (
                        "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
                    ),
                    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
                    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
                    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                    "AIRFLOW__API__BASE_URL": self.url,
                    "AIRFLOW__API__PORT": str(self.port),
                    "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
                    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                }
            )
        else:
            self.env.update(
                {
                    "AIRFLOW__API__AUTH_BACKENDS": "airflow.api.auth.backend.basic_auth",
                    "AIRFLOW__WEBSERVER__WORKERS": "1",
                    "AIRFLOW__WEBSERVER__SECRET_KEY": secrets.token_urlsafe(32),
                    "AIRFLOW__WEBSERVER__WEB_SERVER_PORT": str(self.port),
                    # Airflow 2's parsing processes each write their DAGs' new datasets with a
                    # SELECT then an INSERT: two files naming the usage dataset, parsed at once,
                    # race, and the loser's DAG is not written until its next parse (600 s here).
                    # One process is the workaround Airflow's issue #42105 gives.
                    "AIRFLOW__SCHEDULER__PARSING_PROCESSES": "1",
                }
            )

    def _dags_folder(self) -> Path:
        """The repository's DAG files and its example downstream DAG, linked into one folder."""
        folder = self.home / "dags"
        folder.mkdir(exist_ok=True)
        for source in [*(REPO / "dags").glob("*.py"), *(REPO / "example_dags").glob("*.py")]:
            if source.name != "__init__.py":
                (folder / source.name).symlink_to(source)
        return folder

    # -- the CLI -----------------------------------------------------------------------

    def airflow(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``airflow ARGS`` as a user would, in this installation; its whole group dies with it."""
        process = subprocess.Popen(
            ["airflow", *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        finally:
            _signal_group(process, signal.SIGKILL)  # executors a CLI command forked, on any exit
            process.wait()
        done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        if check and done.returncode != 0:
            raise AssertionError(
                f"airflow {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    def backfill(self, *args: str, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess:
        """``airflow ARGS`` for a backfill command; on Airflow 2 run once more, as an operator
        would, when the CLI lost its own metadata-DB connection. That happened in CI inside
        Airflow 2.11's in-process backfill (``DAG.get_num_active_runs``, between two runs, with
        nothing in PostgreSQL's log); what the tests promise is how the runs end."""
        if AIRFLOW_V3 and args[:2] == ("backfill", "create"):
            self.wait_for_backfills_to_complete(args[args.index("--dag-id") + 1])
        done = self.airflow(*args, timeout=timeout, check=False)
        if not AIRFLOW_V3 and done.returncode != 0 and LOST_METADATA_CONNECTION in done.stdout + done.stderr:
            done = self.airflow(*args, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(
                f"airflow {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    def wait_for_backfills_to_complete(self, dag_id: str, timeout: float = 180) -> None:
        """Airflow 3 allows one running backfill per DAG and refuses a second with
        ``AlreadyRunningBackfill``; its scheduler marks a backfill complete on a 30-second
        timer after its last run ended. So a test's backfill waits for an earlier test's, as
        an operator would, instead of failing on whichever timer tick came first."""
        deadline = time.monotonic() + timeout
        query = "SELECT id FROM backfill WHERE dag_id = %s AND completed_at IS NULL"
        while running := self.metadata_rows(query, (dag_id,)):
            if time.monotonic() > deadline:
                raise AssertionError(f"backfills {running} of {dag_id} still running after {timeout} s")
            time.sleep(2)

    def unpause(self, dag_id: str) -> None:
        """``airflow dags unpause DAG_ID``, once per DAG: no test pauses one again, and each
        CLI start costs seconds. Airflow 2's command prints "No paused DAGs were found" and
        exits 0 for a DAG the scheduler has not written yet (which is then created paused),
        so it waits for the DAG first and checks the metadata DB after."""
        if dag_id not in self.unpaused:
            self.wait_for_dag(dag_id)
            self.airflow("dags", "unpause", dag_id)
            assert self.metadata_rows("SELECT is_paused FROM dag WHERE dag_id = %s", (dag_id,)) == [(False,)], dag_id
            self.unpaused.add(dag_id)

    def migrate(self) -> None:
        self.airflow("db", "migrate", timeout=600)
        if not AIRFLOW_V3:
            self.airflow(
                "users", "create", "--username", ADMIN_USER, f"--password={self.password}", "--role", "Admin",
                "--email", "admin@example.com", "--firstname", "Ada", "--lastname", "Admin",
            )  # fmt: skip

    # -- the long-running processes ----------------------------------------------------

    def start(self) -> None:
        services = (
            {"api-server": ["api-server", "--port", str(self.port)], "scheduler": ["scheduler"], "dag-processor": ["dag-processor"]}
            if AIRFLOW_V3
            else {"webserver": ["webserver", "--port", str(self.port)], "scheduler": ["scheduler"]}
        )
        for name, args in services.items():
            self.spawn(name, args)
        self.wait_until_healthy()

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        """Start ``airflow ARGS`` in a process group of its own, logging to ``<home>/<name>.log``."""
        log = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.processes[name] = subprocess.Popen(
            ["airflow", *args], env=env or self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_until_healthy(self, timeout: float = 180) -> None:
        health = f"{self.url}/api/v2/monitor/health" if AIRFLOW_V3 else f"{self.url}/health"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise AssertionError(f"airflow {name} exited with {process.returncode}:\n{self.log_tail(name)}")
            try:
                with urllib.request.urlopen(health, timeout=5) as response:
                    body = json.load(response)
                if body.get("scheduler", {}).get("status") == "healthy":
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                pass
            time.sleep(1)
        raise AssertionError(f"Airflow not healthy after {timeout} s:\n" + "\n".join(map(self.log_tail, self.processes)))

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> None:
        """Until the scheduler's DAG processor has written ``dag_id`` to the metadata DB, active
        and serialized; once per DAG (no test deletes one). Not ``airflow dags list``: Airflow
        2's parses the DAG files itself, and lists a DAG the scheduler has not written yet."""
        if dag_id in self.parsed:
            return
        active = "NOT d.is_stale" if AIRFLOW_V3 else "d.is_active"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.metadata_rows(
                f"SELECT 1 FROM dag d JOIN serialized_dag s USING (dag_id) WHERE d.dag_id = %s AND {active}", (dag_id,)
            ):
                self.parsed.add(dag_id)
                return
            time.sleep(1)
        raise AssertionError(f"{dag_id} never parsed:\n" + "\n".join(map(self.log_tail, self.processes)) + self.parse_logs())

    def parse_logs(self, chars: int = 3000) -> str:
        """What the DAG processor said while parsing: its manager's log and each file's latest
        log (Airflow 2 writes them under the log folder, not to the scheduler's output)."""
        logs = sorted((self.home / "logs").glob("dag_processor_manager/*.log"))
        logs += sorted((self.home / "logs").glob("scheduler/latest/*.log"))
        return "".join(f"\n--- {log.name} ---\n" + log.read_text(errors="replace")[-chars:] for log in logs)

    @contextlib.contextmanager
    def metadata_queries(self) -> Iterator[Callable[..., list[tuple]]]:
        """A function running a query on this installation's metadata DB (one autocommit
        connection, for the ``with`` block): ``run(sql, params)`` returns all rows."""
        import psycopg2

        conn = psycopg2.connect(self.metadata_dsn)
        conn.autocommit = True

        def run(sql: str, params: tuple | None = None) -> list[tuple]:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()

        try:
            yield run
        finally:
            conn.close()

    def metadata_rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows of one query on this installation's metadata DB (a connection of its own)."""
        with self.metadata_queries() as run:
            return run(sql, params)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.home / f"{name}.log"
        return f"--- {name} ---\n" + (path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)")

    def stop(self) -> None:
        """Stop every process group of this installation: SIGTERM, then SIGKILL after a grace period.

        Some children leave their parent's group (Airflow 2's DAG processor manager
        starts its own), so the groups are found by this installation's AIRFLOW_HOME.
        """
        groups = {process.pid for process in self.processes.values()} | self._groups()
        for group in groups:
            _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for group in groups | self._groups():
            _signal_group(group, signal.SIGKILL)
        for process in self.processes.values():
            process.wait()
        self.processes.clear()
        deadline = time.monotonic() + 10
        while self.running_pids() and time.monotonic() < deadline:
            time.sleep(0.2)

    def _groups(self) -> set[int]:
        groups = set()
        for pid in self.running_pids():
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        return groups - {os.getpgid(0)}

    def running_pids(self) -> list[int]:
        """Processes of this installation still alive (by AIRFLOW_HOME in their environment)."""
        alive = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                environ = (proc / "environ").read_bytes()
            except OSError:
                continue
            if f"AIRFLOW_HOME={self.home}\0".encode() in environ and not _is_zombie(proc):
                alive.append(int(proc.name))
        return alive

    # -- the REST API ------------------------------------------------------------------

    def api_headers(self) -> dict[str, str]:
        """v2 with a bearer token (Airflow 3), v1 with basic auth (Airflow 2)."""
        if AIRFLOW_V3:
            status, body = http("POST", f"{self.url}/auth/token", {"username": ADMIN_USER, "password": self.password})
            assert status in (200, 201), body
            return {"Authorization": f"Bearer {body['access_token']}"}
        import base64

        token = base64.b64encode(f"{ADMIN_USER}:{self.password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def trigger_url(self, dag_id: str) -> str:
        return f"{self.url}/api/{'v2' if AIRFLOW_V3 else 'v1'}/dags/{dag_id}/dagRuns"


class CeleryStack(AirflowStack):
    """The same installation on the CeleryExecutor, as Airflow's official compose file runs it.

    The broker is a Redis database of its own (``broker_url``), the result backend the
    metadata PostgreSQL, and each of ``workers`` an ``airflow celery worker`` in a process
    group of its own, started before the scheduler. A worker's name is its Celery node name
    and, through ``[core] hostname_callable``, the hostname its task instances record, so
    the metadata DB shows which worker ran what. ``concurrency`` 1 makes each worker hold
    one task at a time (Airflow's Celery settings prefetch no more).

    Which idle worker Celery hands a task to is timing: a worker still closing one task
    leaves the next ones to the other, and once (CI, on 3.3) every part of a run
    went to one worker. So the installation routes mapped parts as a deployment would, with
    a ``task_instance_mutation_hook`` in ``airflow_local_settings.py``: part ``i`` goes to
    the queue of worker ``i % len(workers)``, which each worker reads besides ``default``
    (where the other tasks stay, for any worker). Both workers then run parts on every run.
    """

    def __init__(
        self,
        home: Path,
        metadata_dsn: str,
        extra_env: dict[str, str],
        *,
        broker_url: str,
        workers: tuple[str, ...] = ("worker1", "worker2"),
        concurrency: int = 1,
    ):
        super().__init__(home, metadata_dsn, extra_env)
        self.broker_url = broker_url
        self.concurrency = concurrency
        self.workers = {name: f"{name}@{socket.gethostname()}" for name in workers}
        self.env.update(
            {
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CELERY__BROKER_URL": broker_url,
                "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + metadata_dsn.replace("postgresql+psycopg2", "postgresql"),
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(concurrency),
            }
        )
        # The hostname callable: a module of this installation's own, on the workers' path only.
        site = home / "worker-site"
        site.mkdir(exist_ok=True)
        (site / "celery_stack_hostname.py").write_text(
            "import os\n\n\ndef hostname() -> str:\n    return os.environ['CELERY_STACK_WORKER']\n"
        )
        self.worker_site = site
        # The parts' routing: AIRFLOW_HOME/config is on every Airflow process's path.
        self.part_queues = {name: f"usage_parts_{index}" for index, name in enumerate(self.workers)}
        config = home / "config"
        config.mkdir(exist_ok=True)
        (config / "airflow_local_settings.py").write_text(
            f"PART_QUEUES = {list(self.part_queues.values())!r}\n\n\n"
            "def task_instance_mutation_hook(task_instance):\n"
            "    if task_instance.map_index is not None and task_instance.map_index >= 0:\n"
            "        task_instance.queue = PART_QUEUES[task_instance.map_index % len(PART_QUEUES)]\n"
        )

    def worker_env(self, name: str) -> dict[str, str]:
        return {
            **self.env,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(self.worker_site), self.env.get("PYTHONPATH")])),
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "celery_stack_hostname.hostname",
            "CELERY_STACK_WORKER": self.workers[name],
            # Each worker serves its task logs on a port of its own (8793 for all by default).
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        }

    def start(self) -> None:
        for name, node in self.workers.items():
            args = [
                "celery", "worker", "--celery-hostname", node, "--concurrency", str(self.concurrency),
                "--queues", f"default,{self.part_queues[name]}",
            ]  # fmt: skip
            self.spawn(name, args, env=self.worker_env(name))
        super().start()
        self.wait_for_workers()

    def wait_for_workers(self, timeout: float = 120) -> None:
        """Until every worker answers a Celery ping through the broker."""
        from celery import Celery

        app = Celery(broker=self.broker_url)
        answered: set[str] = set()
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for name in self.workers:
                    if self.processes[name].poll() is not None:
                        raise AssertionError(f"worker {name} exited:\n{self.log_tail(name)}")
                answered = {node for reply in app.control.ping(timeout=2) for node in reply}
                if set(self.workers.values()) <= answered:
                    return
            raise AssertionError(
                f"workers not answering after {timeout} s (answered: {answered}):\n"
                + "\n".join(map(self.log_tail, self.workers))
            )
        finally:
            app.close()


def _signal_group(group: subprocess.Popen | int, sig: int) -> None:
    try:
        os.killpg(group if isinstance(group, int) else group.pid, sig)
    except ProcessLookupError:
        pass


def _is_zombie(proc: Path) -> bool:
    try:
        return (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def http(method: str, url: str, payload: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """One JSON request; returns the status and the decoded body, errors included."""
    request = urllib.request.Request(
        url,
        data=None if payload is None else json.dumps(payload).encode(),
        method=method,
        headers={"Content-Type": "application/json", "Accept": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, {"raw": raw.decode(errors="replace")}
