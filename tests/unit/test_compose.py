"""docker-compose.yaml agrees with the code (no Docker engine runs here, so it is read, not started)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from usage_agg.operators import DEFAULT_POSTGRES_CONN_ID, DEFAULT_REDIS_CONN_ID

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
SERVICES = COMPOSE["services"]
AIRFLOW_IMAGE = COMPOSE["x-airflow-common"]["image"]
#: the services that run Airflow (the x-airflow-common image); the broker and the databases are not
AIRFLOW_SERVICES = [name for name, service in SERVICES.items() if service.get("image") == AIRFLOW_IMAGE]


def test_connections_are_set_for_the_ids_the_dags_read():
    env = COMPOSE["x-airflow-common"]["environment"]
    for conn_id, conn_type in ((DEFAULT_REDIS_CONN_ID, "redis"), (DEFAULT_POSTGRES_CONN_ID, "postgres")):
        conn = json.loads(env[f"AIRFLOW_CONN_{conn_id.upper()}"])
        assert conn["conn_type"] == conn_type
        assert conn["host"] in SERVICES  # the usage stores, not Airflow's metadata DB
        assert conn["host"] != "airflow-metadata"


def test_every_image_is_pinned_and_mounted_folders_exist():
    for name, service in SERVICES.items():
        image = service.get("image", "")
        assert image and ":" in image and not image.endswith(":latest"), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).is_dir(), f"{name} mounts missing {source}"
    assert (ROOT / "Dockerfile").read_text().startswith("# ")


def test_airflow_services_wait_for_healthy_dependencies():
    for name in AIRFLOW_SERVICES:
        depends_on = SERVICES[name]["depends_on"]
        assert isinstance(depends_on, dict), name
        for dependency, rule in depends_on.items():
            assert rule["condition"] in ("service_healthy", "service_completed_successfully"), (name, dependency)
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[dependency], dependency
    assert {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"} <= set(SERVICES)
    assert {"airflow-worker", "airflow-flower"} <= set(AIRFLOW_SERVICES)


def _validate(path: Path) -> subprocess.CompletedProcess:
    """check-jsonschema with the Compose specification's JSON schema that it vendors."""
    tool = Path(sys.executable).parent / "check-jsonschema"
    return subprocess.run(
        [str(tool), "--builtin-schema", "vendor.compose-spec", str(path)], capture_output=True, text=True, timeout=120
    )


def test_the_file_is_valid_against_the_compose_specification_schema():
    done = _validate(ROOT / "docker-compose.yaml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_schema_check_catches_a_broken_file(tmp_path):
    broken = (ROOT / "docker-compose.yaml").read_text().replace("condition: service_healthy", "condition: when_ready", 1)
    (tmp_path / "docker-compose.yaml").write_text(broken)
    done = _validate(tmp_path / "docker-compose.yaml")
    assert done.returncode == 1
    assert "when_ready" in done.stdout + done.stderr


def test_usage_agg_settings_in_the_file_are_ones_the_code_reads():
    sources = "".join(path.read_text() for path in (ROOT / "plugins" / "usage_agg").glob("*.py"))
    env = COMPOSE["x-airflow-common"]["environment"]
    names = [name for name in env if name.startswith("USAGE_AGG")]
    assert names
    for name in names:
        assert f'"{name}"' in sources, f"{name} is set in docker-compose.yaml but nothing reads it"


def test_the_celery_executor_has_a_broker_of_its_own_and_its_results_in_the_metadata_db():
    env = COMPOSE["x-airflow-common"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    broker = env["AIRFLOW__CELERY__BROKER_URL"].removeprefix("redis://").split(":")[0].split("/")[0]
    usage_redis = json.loads(env[f"AIRFLOW_CONN_{DEFAULT_REDIS_CONN_ID.upper()}"])["host"]
    assert broker in SERVICES and broker != usage_redis  # queued tasks never in the usage keyspace
    assert SERVICES[broker]["image"].startswith("redis:") and "healthcheck" in SERVICES[broker]
    assert "ports" not in SERVICES[broker]  # reached by the Airflow services only
    metadata_db = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert metadata_db.split("@", 1)[1].startswith("airflow-metadata/")
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == "db+" + metadata_db.replace("postgresql+psycopg2://", "postgresql://")
    for name in AIRFLOW_SERVICES:  # every Airflow service waits for the broker
        assert SERVICES[name]["depends_on"][broker]["condition"] == "service_healthy", name


def test_the_image_installs_the_celery_extra_that_holds_the_executor():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(line.startswith("apache-airflow-providers-celery") for line in extras["celery"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert '"/opt/usage-agg[celery]"' in dockerfile
    assert "constraints/airflow-3.3.txt" in dockerfile and dockerfile.startswith("# ")
    assert f"FROM apache/airflow:{AIRFLOW_IMAGE.split(':')[1]}-python3.11" in dockerfile


#: README.md, "Local stack": more Celery workers
SCALE_COMMAND = "docker compose up -d --scale airflow-worker=3"


def test_the_worker_runs_celery_scales_and_flower_is_opt_in():
    service = SCALE_COMMAND.split("--scale ")[1].split("=")[0]
    worker = SERVICES[service]
    assert worker["command"] == "celery worker"
    # Scaling (README, "Local stack") starts more containers of one service: no fixed name or host port.
    assert "container_name" not in worker and "ports" not in worker
    assert worker["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"  # the execution API
    flower = SERVICES["airflow-flower"]
    assert flower["command"] == "celery flower" and flower["profiles"] == ["flower"]
    assert [name for name, service in SERVICES.items() if service.get("profiles")] == ["airflow-flower"]


def test_the_readme_says_how_to_add_workers():
    readme = (ROOT / "README.md").read_text()
    local_stack = readme.split("\n## Local stack\n", 1)[1].split("\n## ", 1)[0]
    assert f"`{SCALE_COMMAND}`" in local_stack
    assert "`docker compose --profile flower up -d`" in local_stack and "http://localhost:5555" in local_stack
    assert SERVICES["airflow-flower"]["ports"] == ["5555:5555"]
