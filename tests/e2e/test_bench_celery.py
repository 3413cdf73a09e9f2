"""bench/celery_fan_out.py runs end to end at a small size (its times are reported, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEYS = 3_000


def test_the_celery_fan_out_benchmark_runs_both_ways_and_reports_the_same_rows(tmp_path):
    report_file = tmp_path / "celery.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench/celery_fan_out.py"), "--keys", str(KEYS), "--json", str(report_file)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_file.read_text())
    single, fanned = report["one_task"], report["fanned_out"]
    assert single["keys"] == fanned["keys"] == KEYS
    assert single["rows"] == fanned["rows"] and single["rows"][0] == KEYS
    assert [p["redis_partition"] for p in single["parts"]] == [None]
    assert sorted(p["redis_partition"] for p in fanned["parts"]) == sorted(
        f"127.0.0.1:{port}" for port in report["keys_per_primary"]
    )
    assert all(p["worker"].split("@")[0] in ("worker1", "worker2") for p in fanned["parts"])
    assert single["wall_seconds"] > 0 and fanned["wall_seconds"] > 0
    assert "one task / fanned out" in done.stdout
