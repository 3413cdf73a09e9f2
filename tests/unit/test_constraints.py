"""The two pinned environments differ in Airflow, not in the drivers the core runs on.

`make test` runs the integration tier (the plain-Python core, no Airflow) on one
Airflow version only; that is sound only while these pins agree.
"""

from __future__ import annotations

from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints"
CORE_DRIVERS = ("redis", "hiredis", "psycopg2-binary", "psycopg", "psycopg-binary")


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep:
            found[name.strip().lower()] = version.strip()
    return found


def test_both_environments_pin_the_same_core_drivers():
    airflow_3, airflow_2 = pins(CONSTRAINTS / "airflow-3.3.txt"), pins(CONSTRAINTS / "airflow-2.11.txt")
    for driver in CORE_DRIVERS:
        assert driver in airflow_3, driver
        assert airflow_3[driver] == airflow_2.get(driver), driver


def test_the_integration_tier_imports_no_airflow():
    tier = Path(__file__).resolve().parents[1] / "integration"
    for path in tier.glob("*.py"):
        text = path.read_text()
        assert "import airflow" not in text and "from airflow" not in text, path.name
