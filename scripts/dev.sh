#!/usr/bin/env bash
# Start everything for local development and run the server in the foreground:
# services, master key, release build, migrations, the dev environment.
# bootstrap-dev prints the dev environment's secret key; this script prints
# the URLs, and runs an echo-agent worker beside the server (for the
# dashboard's playground), stopped with it. Run it again any time: every
# step is idempotent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

KEY_FILE=.sessiond/master.key # .sessiond/ is gitignored

# The master key encrypts environment secret keys at rest. It must stay the
# same across runs, or secrets stored earlier can no longer be decrypted, so
# it lives in a file and is only generated when the file is missing.
ensure_master_key() {
    if [[ ! -e "$KEY_FILE" ]]; then
        say "generating a new master key in $KEY_FILE"
        (
            umask 077
            mkdir -p "$(dirname "$KEY_FILE")"
            od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$KEY_FILE.tmp"
            echo >>"$KEY_FILE.tmp"
            mv "$KEY_FILE.tmp" "$KEY_FILE" # never leave a half-written key
        )
    fi
    # Refuse to replace a damaged key: that would orphan the stored secrets.
    grep -Eqx '[0-9a-f]{64}' "$KEY_FILE" ||
        die "$KEY_FILE is not 64 lowercase hex chars; fix or delete it (deleting makes stored dev secrets unreadable)"
}

bash scripts/services.sh sessiond

# An explicit SESSIOND_MASTER_KEY in the environment wins over the file.
if [[ -z "${SESSIOND_MASTER_KEY:-}" ]]; then
    ensure_master_key
    SESSIOND_MASTER_KEY=$(tr -d '[:space:]' <"$KEY_FILE")
fi
export SESSIOND_MASTER_KEY
export DATABASE_URL=${DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/sessiond}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
export CLICKHOUSE_URL=${CLICKHOUSE_URL:-http://127.0.0.1:8123}
export LISTEN_ADDR=${LISTEN_ADDR:-127.0.0.1:3030}
# ClickHouse follows Postgres by logical replication (a new slot starts with
# a full backfill, so the list is served from ClickHouse within seconds).
export SESSION_REPLICATION_ENABLED=${SESSION_REPLICATION_ENABLED:-1}

ensure_cargo
say "building sessiond (release)"
cargo build --release --bin sessiond
BIN="${CARGO_TARGET_DIR:-target}/release/sessiond"

say "running migrations"
"$BIN" migrate
"$BIN" env bootstrap-dev
"$BIN" clickhouse migrate
case "$SESSION_REPLICATION_ENABLED" in
1 | true | yes | on) ;;
# Without replication, a backfill (run by serve's job workers) fills the copy once.
*) "$BIN" clickhouse backfill ;;
esac

# A dev operator for the dashboard, created on the first run; its password is
# generated once and kept beside the master key.
OPERATOR_EMAIL=dev@sessiond.local
OPERATOR_FILE=.sessiond/dev-operator-password
mkdir -p .sessiond
if [[ ! -s "$OPERATOR_FILE" ]]; then
    (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$OPERATOR_FILE")
fi
SESSIOND_OPERATOR_PASSWORD=$(cat "$OPERATOR_FILE") "$BIN" operators create \
    --email "$OPERATOR_EMAIL" --role admin --if-missing

# The example agent, so the dashboard's playground answers: an echo-agent
# worker against this server with the dev environment's key (read from the
# environment, not the command line, so `ps` does not show it).
DEV_KEY=$(RUST_LOG=error "$BIN" env bootstrap-dev --key-only | grep -E '^tr_dev_' | tail -n 1) ||
    die "could not read the dev environment's key"

say "base URL:  http://$LISTEN_ADDR"
say "ClickHouse: $CLICKHOUSE_URL"
say "dashboard: http://$LISTEN_ADDR/dashboard  (sign in as $OPERATOR_EMAIL, password $(cat "$OPERATOR_FILE"))"
say "playground: http://$LISTEN_ADDR/dashboard/playground  (an echo-agent worker answers)"

# Plain bash (/dev/tcp): does the server answer /healthz yet?
server_up() {
    local reply
    reply=$(
        exec 2>/dev/null
        exec 3<>"/dev/tcp/${LISTEN_ADDR%:*}/${LISTEN_ADDR##*:}" &&
            printf 'GET /healthz HTTP/1.0\r\nHost: %s\r\n\r\n' "$LISTEN_ADDR" >&3 &&
            timeout 2 cat <&3
    ) || return 1
    [[ "$reply" == "HTTP/1."?" 200"* ]]
}

# Up, or not yet; a server that exited is an error (its log says why).
server_ready() {
    server_up && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || die "the server exited"
    return 1
}

# The server and the worker run in the background; stopping this script
# (Ctrl-C, kill) stops both, and so does the server stopping by itself.
SERVER_PID=
WORKER_PID=
stop_all() {
    trap - INT TERM EXIT
    [[ -z "$WORKER_PID" ]] || kill "$WORKER_PID" 2>/dev/null || true
    [[ -z "$SERVER_PID" ]] || kill "$SERVER_PID" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap stop_all INT TERM EXIT

"$BIN" serve &
SERVER_PID=$!
wait_until 60 "the server to answer /healthz" server_ready
say "starting the echo-agent worker"
SESSIOND_SECRET_KEY=$DEV_KEY "$BIN" worker --task echo-agent --url "http://$LISTEN_ADDR" &
WORKER_PID=$!
wait "$SERVER_PID"
