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
        [sys.executable, str(ROOT / "bench/run.py"), "--keys", "2000", "--repeat", "2", "--memory-keys", "2000",
         "--breakdown", "--json", str(report_file)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert set(report["seconds"]) >= {
        "package", "package_scan", "naive", "raw_read_index", "raw_read_scan", "raw_write", "second_run",
        "daily_only", "daily_and_hourly", "discover_index", "discover_scan",
    }  # fmt: skip
    assert report["second_run_updated_tuples"] == 0 and report["second_run_rewritten_rows"] == 0
    for ratio in ("package_vs_naive", "package_vs_raw_read_plus_write", "scan_vs_raw_scan_plus_write",
                  "second_run_vs_first", "daily_and_hourly_vs_daily_only"):  # fmt: skip
        values = report["ratios"][ratio]
        assert 0 < values["min"] <= values["median"] <= values["max"], ratio
        assert ratio in done.stdout
    assert set(report["peak_memory_mib"]) == {"daily", "daily_and_hourly"}
    assert all(m["mib"] > 0 and m["10x_mib"] > 0 for m in report["peak_memory_mib"].values())
    phases = report["breakdown_seconds"]
    assert phases["total"] > 0 and phases["main: build and COPY a block (PostgreSQL)"] > 0  # a new day: COPY alone
    rerun = report["rerun_breakdown_seconds"]
    assert rerun["total"] > 0 and rerun["main: merge statements (PostgreSQL)"] > 0
