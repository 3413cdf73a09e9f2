#!/usr/bin/env bash
# make demo: seed usage, run the hourly DAG with the Airflow CLI, print the rows.
# Runs inside tools/airflow-env.sh (the Airflow environment and its SQLite metadata DB).
set -euo pipefail
cd "$(dirname "$0")/.."

python tools/demo.py seed
today=$(date -u +%F)
yesterday=$(date -u -d yesterday +%F)
# Each run aggregates its day and the day before: these two cover the three seeded days.
for day in "$yesterday" "$today"; do
    echo "demo: airflow dags test usage_aggregation ${day}T05:00:00+00:00"
    airflow dags test usage_aggregation "${day}T05:00:00+00:00" > "$AIRFLOW_HOME/demo-${day}.log" 2>&1 \
        || { tail -50 "$AIRFLOW_HOME/demo-${day}.log"; exit 1; }
    grep -Eo "(Starting aggregation for date: .*|Found [0-9]+ usage keys to process|Completed\. Records aggregated: [0-9]+, Errors: [0-9]+)" \
        "$AIRFLOW_HOME/demo-${day}.log" | sed 's/ \[.*//' | awk '!seen[$0]++'
done
python tools/demo.py show
