"""The benchmark runs end to end (at a small size: speed is reported by it, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_runs_and_reports_every_measurement(tmp_path):
    report_file = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench/run.py"), "--keys", "2000", "--repeat", "1", "--json", str(report_file)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert set(report["seconds"]) >= {"package", "naive", "raw_read", "raw_write", "second_run", "discover_index"}
    assert report["second_run_updated_tuples"] == 0 and report["second_run_updated_at_unchanged"] is True
    assert report["peak_memory_mib"]["n"] > 0
    assert "package_vs_naive" in done.stdout
