#!/usr/bin/env bash
# Bring up the local services sessiond needs and create databases:
#   PostgreSQL on 127.0.0.1:5432 (wal_level=logical, login postgres:postgres,
#              max_slot_wal_keep_size=$PG_SLOT_WAL_KEEP_SIZE, 4GB by default, on a
#              server this script creates or starts)
#   Redis      on 127.0.0.1:6379 (append-only file on)
#   ClickHouse on 127.0.0.1:8123 (chDB dev server; see scripts/clickhouse.sh,
#              which leaves a CLICKHOUSE_URL pointing elsewhere alone)
# Usage: scripts/services.sh [DATABASE...]
# Safe to run again: every step checks first and only acts when needed.
# Works without systemd (containers, CI), so services are started directly.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

# Fixed on purpose: every URL in the scripts and README assumes these.
PG_PORT=5432
REDIS_PORT=6379
PG_REPLICATION_SLOTS=32
# Most WAL a replication slot may hold back before Postgres invalidates it
# (max_slot_wal_keep_size). Unlimited, a stopped consumer keeps WAL until the
# disk is full (measured: ~2.1 MiB/s under load); past the bound the slot is
# lost and sessiond heals it by recreating it and backfilling, lists answering
# from Postgres meanwhile. Applied only to a PostgreSQL this script creates or
# starts, never to a server someone else runs (it is only reported there).
PG_SLOT_WAL_KEEP_SIZE=${PG_SLOT_WAL_KEEP_SIZE:-4GB}
# Set by start_postgres / setup_postgres when this script brought the server up.
PG_OURS=0
PG_TCP_URL="postgres://postgres:postgres@127.0.0.1:${PG_PORT}/postgres"
DATABASE_ADMIN_URL=${DATABASE_ADMIN_URL:-$PG_TCP_URL}

# --- PostgreSQL --------------------------------------------------------------

# psql as the postgres OS user over the local socket; works under Debian's
# default peer auth, before any password exists.
pg_socket_sql() {
    as_postgres psql -X -Atq -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres -c "$1"
}

# psql over TCP. -w: never prompt for a password (CI has no terminal).
pg_admin_psql() {
    psql -X -Atqw -v ON_ERROR_STOP=1 "$DATABASE_ADMIN_URL" "$@"
}

ensure_postgres_installed() {
    # psql alone may be installed (client package); we need the server.
    if have_cmd pg_ctlcluster && have_cmd pg_lsclusters && have_cmd pg_isready &&
        compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
        return 0
    fi
    apt_install postgresql
}

# Print "VERSION NAME STATUS" of the cluster that owns $PG_PORT, if any.
pg_cluster_on_port() {
    pg_lsclusters --no-header | awk -v port="$PG_PORT" '$3 == port { print $1, $2, $4; exit }'
}

# Make sure a Debian-managed cluster exists on $PG_PORT; echo "VERSION NAME".
ensure_postgres_cluster() {
    local found
    found=$(pg_cluster_on_port)
    if [[ -z "$found" ]]; then
        if [[ -n "$(pg_lsclusters --no-header)" ]]; then
            # Don't guess: moving someone's cluster to another port is their call.
            pg_lsclusters >&2
            die "no PostgreSQL cluster on port $PG_PORT (see the list above); change one's port in /etc/postgresql/<ver>/<name>/postgresql.conf"
        fi
        # apt normally creates one; a container may have it removed or skipped.
        local version
        # Newest installed server (a version dir may hold only the client).
        version=$(printf '%s\n' /usr/lib/postgresql/*/bin/postgres | awk -F/ '{ print $5 }' | sort -V | tail -n1)
        say "creating PostgreSQL $version cluster 'main' on port $PG_PORT"
        as_root pg_createcluster --port "$PG_PORT" "$version" main >&2
        found=$(pg_cluster_on_port)
    fi
    echo "${found% *}"
}

pg_ctl_cluster() { # ACTION VERSION NAME
    # --skip-systemctl-redirect: run pg_ctl directly, as there may be no systemd.
    as_root pg_ctlcluster --skip-systemctl-redirect "$2" "$3" "$1"
}

pg_tcp_ready() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; }

start_postgres() { # VERSION NAME
    local status
    status=$(pg_cluster_on_port | awk '{ print $3 }')
    if [[ "$status" != online* ]]; then
        say "starting PostgreSQL cluster $1/$2"
        pg_ctl_cluster start "$1" "$2"
        PG_OURS=1
    fi
    wait_until 30 "PostgreSQL on 127.0.0.1:$PG_PORT" pg_tcp_ready
}

# sessiond follows its tables through logical decoding, which needs
# wal_level=logical plus room for replication slots and WAL senders.
# All three only take effect after a restart, so change them together.
configure_postgres_replication() { # VERSION NAME
    local changed=0 setting value
    if [[ "$(pg_socket_sql 'SHOW wal_level')" != logical ]]; then
        say "setting wal_level = logical"
        pg_socket_sql 'ALTER SYSTEM SET wal_level = logical'
        changed=1
    fi
    # The test suite runs up to 8 tests at once, each replicating test through
    # a slot (and a WAL sender) of its own; a dev server adds one more.
    for setting in max_replication_slots max_wal_senders; do
        value=$(pg_socket_sql "SHOW $setting")
        if ((value < PG_REPLICATION_SLOTS)); then
            say "setting $setting = $PG_REPLICATION_SLOTS (was $value)"
            pg_socket_sql "ALTER SYSTEM SET $setting = $PG_REPLICATION_SLOTS"
            changed=1
        fi
    done
    if ((changed)); then
        say "restarting PostgreSQL cluster $1/$2 to apply the settings"
        pg_ctl_cluster restart "$1" "$2"
        wait_until 30 "PostgreSQL on 127.0.0.1:$PG_PORT" pg_tcp_ready
        # A -c flag or an include file could still override ALTER SYSTEM.
        [[ "$(pg_socket_sql 'SHOW wal_level')" == logical ]] ||
            die "wal_level is still not 'logical' after a restart; check postgresql.conf"
    fi
}

# The bound on WAL a slot retains (PG_SLOT_WAL_KEEP_SIZE), on a server this
# script created or started. It takes effect on reload: no restart.
configure_postgres_wal_bound() {
    local current wanted
    [[ "$PG_SLOT_WAL_KEEP_SIZE" =~ ^[0-9]+(kB|MB|GB|TB)$ ]] ||
        die "PG_SLOT_WAL_KEEP_SIZE=$PG_SLOT_WAL_KEEP_SIZE is not a size like 4GB or 512MB"
    current=$(pg_socket_sql "SELECT pg_size_bytes(current_setting('max_slot_wal_keep_size'))")
    wanted=$(pg_socket_sql "SELECT pg_size_bytes('$PG_SLOT_WAL_KEEP_SIZE')")
    [[ "$current" == "$wanted" ]] && return 0
    if ((!PG_OURS)); then
        if [[ "$current" == -1 ]]; then
            say "warning: PostgreSQL on port $PG_PORT (not started by this script) has no max_slot_wal_keep_size:" \
                "a stopped sessiond keeps WAL until the disk fills; consider ALTER SYSTEM SET max_slot_wal_keep_size = '$PG_SLOT_WAL_KEEP_SIZE'"
        fi
        return 0
    fi
    say "setting max_slot_wal_keep_size = $PG_SLOT_WAL_KEEP_SIZE (was $(pg_socket_sql 'SHOW max_slot_wal_keep_size'))"
    pg_socket_sql "ALTER SYSTEM SET max_slot_wal_keep_size = '$PG_SLOT_WAL_KEEP_SIZE'"
    pg_socket_sql 'SELECT pg_reload_conf()' >/dev/null
    wait_until 10 "max_slot_wal_keep_size to apply" pg_wal_bound_applied "$wanted"
}

pg_wal_bound_applied() {
    [[ "$(pg_socket_sql "SELECT pg_size_bytes(current_setting('max_slot_wal_keep_size'))")" == "$1" ]]
}

pg_tcp_login_works() {
    psql -X -Atqw "$PG_TCP_URL" -c 'SELECT 1' >/dev/null 2>&1
}

# Debian's default pg_hba.conf asks for a password over TCP, and the postgres
# role has none. Setting it is harmless where auth is trust.
ensure_postgres_password() {
    pg_tcp_login_works && return 0
    say "setting a password for the postgres role"
    pg_socket_sql "ALTER USER postgres PASSWORD 'postgres'"
    pg_tcp_login_works ||
        die "cannot log in as postgres:postgres@127.0.0.1:$PG_PORT; check pg_hba.conf has a 'host all all 127.0.0.1/32' line"
}

ensure_databases() {
    local db exists
    for db in "$@"; do
        # psql variables (:'db', :"db") quote the name for us; they are only
        # expanded in input read from stdin, hence the here-strings.
        exists=$(pg_admin_psql -v db="$db" <<<"SELECT 1 FROM pg_database WHERE datname = :'db';")
        if [[ "$exists" != 1 ]]; then
            say "creating database $db"
            pg_admin_psql -v db="$db" <<<'CREATE DATABASE :"db";'
        fi
    done
}

setup_postgres() {
    local cluster
    ensure_postgres_installed
    need_cmd psql
    # A cluster created here is ours to configure (ensure_postgres_cluster
    # runs in a subshell, so it is told apart by what exists before).
    if [[ -z "$(pg_cluster_on_port)" ]]; then
        PG_OURS=1
    fi
    cluster=$(ensure_postgres_cluster)
    # shellcheck disable=SC2086 # "VERSION NAME" splits into two arguments
    start_postgres $cluster
    # shellcheck disable=SC2086
    configure_postgres_replication $cluster
    configure_postgres_wal_bound
    ensure_postgres_password
    ensure_databases "$@"
    say "PostgreSQL ready on 127.0.0.1:$PG_PORT (cluster $cluster)"
}

# --- Redis -------------------------------------------------------------------

redis_cmd() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }

redis_answers() { [[ "$(redis_cmd ping 2>/dev/null)" == PONG ]]; }

ensure_redis_installed() {
    # redis-cli comes with redis-tools, a dependency of redis-server.
    have_cmd redis-server && have_cmd redis-cli && return 0
    apt_install redis-server
}

start_redis() {
    redis_answers && return 0
    say "starting Redis on 127.0.0.1:$REDIS_PORT"
    as_root mkdir -p /var/lib/redis /var/log/redis
    as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
        --appendonly yes --appendfsync always \
        --dir /var/lib/redis --logfile /var/log/redis/sessiond.log
    wait_until 30 "Redis on 127.0.0.1:$REDIS_PORT (log: /var/log/redis/sessiond.log)" redis_answers
}

# redis_config_ensure NAME VALUE: CONFIG SET only when the value differs.
redis_config_ensure() {
    local current reply
    current=$(redis_cmd config get "$1" | sed -n 2p)
    [[ "$current" == "$2" ]] && return 0
    say "Redis: CONFIG SET $1 $2 (was '$current')"
    reply=$(redis_cmd config set "$1" "$2")
    [[ "$reply" == OK ]] || die "Redis refused CONFIG SET $1 $2: $reply"
}

# Redis holds the live session streams, and an append is acknowledged to the
# client as soon as Redis answers; the promise is that no acknowledged write is
# ever lost. So: AOF on, fsync'd on every write (appendfsync always). Set at
# runtime, so it also applies to a Redis we did not start (whose config file
# may say otherwise); start_redis passes the same options on its command line.
# A re-run that finds both set only reads them.
redis_aof_rewrite_done() {
    local info
    info=$(redis_cmd info persistence | tr -d '\r')
    grep -qx 'aof_rewrite_in_progress:0' <<<"$info" &&
        grep -qx 'aof_rewrite_scheduled:0' <<<"$info"
}

configure_redis_durability() {
    local aof fsync reply config_file
    aof=$(redis_cmd config get appendonly | sed -n 2p)
    fsync=$(redis_cmd config get appendfsync | sed -n 2p)
    [[ "$aof" == yes && "$fsync" == always ]] && return 0
    # fsync policy first, so the AOF is fsync'd on every write from its start.
    redis_config_ensure appendfsync always
    redis_config_ensure appendonly yes
    if [[ "$aof" != yes ]]; then
        # Turning AOF on at runtime writes the initial AOF in the background;
        # until that finishes a crash could lose data, so wait for it.
        wait_until 60 "Redis to write its initial append-only file" redis_aof_rewrite_done
        [[ "$(redis_cmd info persistence | tr -d '\r' | sed -n 's/^aof_last_bgrewrite_status://p')" == ok ]] ||
            die "Redis failed to write its append-only file; see its log"
    fi
    # A Redis run from a config file would fall back to it on restart: persist.
    config_file=$(redis_cmd info server | tr -d '\r' | sed -n 's/^config_file://p')
    if [[ -n "$config_file" ]]; then
        reply=$(redis_cmd config rewrite 2>&1 || true)
        [[ "$reply" == OK ]] ||
            say "warning: CONFIG REWRITE of $config_file failed ($reply); set appendonly yes and appendfsync always there"
    fi
}

setup_redis() {
    ensure_redis_installed
    start_redis
    configure_redis_durability
    say "Redis ready on 127.0.0.1:$REDIS_PORT"
}

setup_postgres "$@"
setup_redis
bash scripts/clickhouse.sh start
