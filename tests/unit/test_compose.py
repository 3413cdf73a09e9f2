"""docker-compose.yaml agrees with the code (no Docker engine runs here, so it is read, not started)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from usage_agg.operators import DEFAULT_POSTGRES_CONN_ID, DEFAULT_REDIS_CONN_ID

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
SERVICES = COMPOSE["services"]
AIRFLOW_SERVICES = [name for name in SERVICES if name.startswith("airflow-") and name != "airflow-metadata"]


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
