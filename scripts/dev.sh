#!/usr/bin/env bash
# Start everything for local development and run the server in the foreground:
# services, master key, release build, migrations, the dev environment.
# bootstrap-dev prints the dev environment's secret key; this script prints
# the URLs. Run it again any time: every step is idempotent.
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

say "base URL:  http://$LISTEN_ADDR"
say "ClickHouse: $CLICKHOUSE_URL"
say "dashboard: http://$LISTEN_ADDR/dashboard  (sign in as $OPERATOR_EMAIL, password $(cat "$OPERATOR_FILE"))"
exec "$BIN" serve
