"""``plugins/`` mounted as Airflow's plugins folder (as docker-compose.yaml does) imports nothing twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"

LOAD = """
import json, sys
from pathlib import Path
from airflow import plugins_manager
plugins_manager.ensure_plugins_loaded()
folder = Path(sys.argv[1]).resolve()
loaded = sorted(
    name for name, module in list(sys.modules.items())
    if getattr(module, "__file__", None) and folder in Path(module.__file__).resolve().parents
)
print(json.dumps(loaded))
"""


@pytest.mark.parametrize("syntax", ["regexp", "glob"])
def test_the_plugin_loader_imports_none_of_the_package_modules(tmp_path, syntax):
    env = {
        **os.environ,
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS),
        "AIRFLOW__CORE__DAG_IGNORE_FILE_SYNTAX": syntax,
        "AIRFLOW__CORE__LAZY_LOAD_PLUGINS": "False",
        "PYTHONPATH": "",  # the package itself comes from the installed distribution
    }
    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(PLUGINS)], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == []  # no bare "keys", "cli", "metrics" from the plugins folder
    assert (PLUGINS / ".airflowignore").read_text().strip().splitlines()[-1] == "usage_agg"
