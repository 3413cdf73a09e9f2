#!/usr/bin/env bash
# Make sure the Redis and PostgreSQL that the tests and the demo use are answering.
# Where they are given by env (USAGE_AGG_REDIS_HOST/PORT, USAGE_AGG_PG_HOST/PORT) they are
# only checked; on the usual localhost ports a stopped local server is started with the
# machine's own commands (the CI machines run both already).
set -euo pipefail

REDIS_HOST=${USAGE_AGG_REDIS_HOST:-127.0.0.1}
REDIS_PORT=${USAGE_AGG_REDIS_PORT:-6379}
PG_HOST=${USAGE_AGG_PG_HOST:-127.0.0.1}
PG_PORT=${USAGE_AGG_PG_PORT:-5432}

redis_up() { redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }
pg_up() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; }

wait_for() {  # wait_for NAME CHECK: up to 30 s
    for _ in $(seq 60); do "$2" && return 0; sleep 0.5; done
    echo "services: $1 did not come up" >&2; return 1
}

start_redis() {
    if [[ "$REDIS_HOST" != 127.0.0.1 && "$REDIS_HOST" != localhost ]] || ! command -v redis-server >/dev/null; then
        echo "services: Redis at $REDIS_HOST:$REDIS_PORT does not answer and cannot be started here" >&2; return 1
    fi
    echo "services: starting redis-server on port $REDIS_PORT"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_for Redis redis_up
}

start_pg() {
    if [[ "$PG_HOST" != 127.0.0.1 && "$PG_HOST" != localhost ]] || ! command -v pg_ctlcluster >/dev/null; then
        echo "services: PostgreSQL at $PG_HOST:$PG_PORT does not answer and cannot be started here" >&2; return 1
    fi
    echo "services: starting the local PostgreSQL cluster"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
    wait_for PostgreSQL pg_up
}

case "${1:-start}" in
    start)
        redis_up || start_redis
        pg_up || start_pg
        echo "services: Redis $REDIS_HOST:$REDIS_PORT and PostgreSQL $PG_HOST:$PG_PORT are up"
        ;;
    check)
        redis_up && pg_up
        ;;
    *)
        echo "usage: $0 start|check" >&2; exit 2
        ;;
esac
