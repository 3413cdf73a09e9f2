"""docker-compose.yaml agrees with the code (no Docker engine runs here, so it is read, not started)."""

from __future__ import annotations

import json
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
