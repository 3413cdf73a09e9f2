"""``get_provider_info()`` is what this Airflow's providers manager accepts and registers."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.resources import files

import jsonschema

from usage_agg import DESCRIPTION, config, get_provider_info


def test_the_provider_info_is_valid_for_this_airflow():
    schema = json.loads(files("airflow").joinpath("provider_info.schema.json").read_text())
    jsonschema.validate(get_provider_info(), schema)


def test_the_description_has_nothing_airflows_cli_would_strip():
    assert get_provider_info()["description"] == DESCRIPTION
    for character in "`_<>":
        assert character not in DESCRIPTION
    assert DESCRIPTION == DESCRIPTION.strip(" \n.")


def test_the_config_section_declares_every_option_with_its_default():
    section = get_provider_info()["config"]["usage_agg"]
    assert {name: option["default"] for name, option in section["options"].items()} == {
        option.name: option.default for option in config.OPTIONS
    }


def test_the_operators_defaults_are_the_sections_defaults():
    from usage_agg.operators import DEFAULT_POSTGRES_CONN_ID, DEFAULT_REDIS_CONN_ID

    defaults = {option.name: option.default for option in config.OPTIONS}
    assert (defaults["redis_conn_id"], defaults["postgres_conn_id"]) == (DEFAULT_REDIS_CONN_ID, DEFAULT_POSTGRES_CONN_ID)


def test_reading_the_provider_info_imports_no_airflow():
    """Airflow's providers manager calls it in every Airflow process, early."""
    probe = "import sys, usage_agg; usage_agg.get_provider_info(); print(sorted(m for m in sys.modules if m.split('.')[0] == 'airflow'))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"
