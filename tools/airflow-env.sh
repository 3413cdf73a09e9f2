#!/usr/bin/env bash
# Run a command inside one Airflow version's environment: its virtualenv, its own
# AIRFLOW_HOME with a migrated SQLite metadata DB, this repository's dags/, and the
# usage connections pointing at the local Redis and PostgreSQL (unless already set).
# usage: tools/airflow-env.sh AIRFLOW_VERSION COMMAND [ARGS...]
set -euo pipefail
version=$1; shift
root=$(cd "$(dirname "$0")/.." && pwd)

export PATH="$root/.venv-airflow-$version/bin:$PATH"
export AIRFLOW_HOME="$root/.airflow-$version"
export AIRFLOW__CORE__DAGS_FOLDER="$root/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__UNIT_TEST_MODE=False
export USAGE_AGG_REDIS_HOST=${USAGE_AGG_REDIS_HOST:-127.0.0.1}
export USAGE_AGG_REDIS_PORT=${USAGE_AGG_REDIS_PORT:-6379}
export USAGE_AGG_PG_HOST=${USAGE_AGG_PG_HOST:-127.0.0.1}
export USAGE_AGG_PG_PORT=${USAGE_AGG_PG_PORT:-5432}
export USAGE_AGG_PG_USER=${USAGE_AGG_PG_USER:-postgres}
export USAGE_AGG_PG_DATABASE=${USAGE_AGG_PG_DATABASE:-test}
export AIRFLOW_CONN_USAGE_REDIS=${AIRFLOW_CONN_USAGE_REDIS:-"{\"conn_type\": \"redis\", \"host\": \"$USAGE_AGG_REDIS_HOST\", \"port\": $USAGE_AGG_REDIS_PORT, \"extra\": {\"db\": 0}}"}
export AIRFLOW_CONN_USAGE_POSTGRES=${AIRFLOW_CONN_USAGE_POSTGRES:-"{\"conn_type\": \"postgres\", \"host\": \"$USAGE_AGG_PG_HOST\", \"port\": $USAGE_AGG_PG_PORT, \"login\": \"$USAGE_AGG_PG_USER\", \"schema\": \"$USAGE_AGG_PG_DATABASE\"}"}

mkdir -p "$AIRFLOW_HOME"
airflow db migrate >"$AIRFLOW_HOME/db-migrate.log" 2>&1 || { cat "$AIRFLOW_HOME/db-migrate.log" >&2; exit 1; }
exec "$@"
