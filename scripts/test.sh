#!/usr/bin/env bash
# Run the whole test suite against real PostgreSQL and Redis.
# Usage: scripts/test.sh [TEST-FILTER...]   (extra args go to the test harness)
# Every run starts from an empty sessiond_test database.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

TEST_DB=sessiond_test
ADMIN_URL=${DATABASE_ADMIN_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}
CLIENT_DIR=tests/official-client

# Reads SQL from stdin, where psql expands :'db' (literal) and :"db" (name).
admin_psql() { psql -X -Atqw -v ON_ERROR_STOP=1 -v db="$TEST_DB" "$ADMIN_URL"; }

# Nothing may hold the test database open, including the WAL senders of
# logical replication slots that an earlier (maybe killed) run left behind.
# shellcheck disable=SC2317 # only called through wait_until
test_db_idle() {
    local busy
    busy=$(admin_psql <<'SQL'
SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = :'db' AND pid <> pg_backend_pid())
     + (SELECT count(*) FROM pg_replication_slots WHERE database = :'db' AND active);
SQL
    )
    [[ "$busy" == 0 ]]
}

# Drop and recreate the test database so no state leaks between runs.
# A database with replication slots cannot be dropped, and a slot left
# behind would also keep WAL forever, so slots go first.
reset_test_db() {
    say "recreating database $TEST_DB"
    admin_psql >/dev/null <<'SQL'
SELECT pg_terminate_backend(pid) FROM pg_stat_activity
 WHERE datname = :'db' AND pid <> pg_backend_pid();
SQL
    # pg_terminate_backend only signals; wait for the backends to exit.
    wait_until 15 "connections to $TEST_DB to close" test_db_idle
    admin_psql >/dev/null <<'SQL'
SET client_min_messages = warning;
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = :'db';
DROP DATABASE IF EXISTS :"db";
CREATE DATABASE :"db";
SQL
}

# Some tests drive the server with the official JavaScript client.
ensure_node() {
    if ! have_cmd node; then
        apt_install nodejs npm
    elif ! have_cmd npm; then
        apt_install npm
    fi
}

# npm ci only when the lock file changed since the last successful install;
# the stamp is written last, so an interrupted install is retried.
install_client_deps() {
    [[ -f "$CLIENT_DIR/package-lock.json" ]] || return 0
    local stamp="$CLIENT_DIR/node_modules/.sessiond-installed"
    if [[ -f "$stamp" && ! "$CLIENT_DIR/package-lock.json" -nt "$stamp" ]]; then
        return 0
    fi
    say "npm ci in $CLIENT_DIR"
    (cd "$CLIENT_DIR" && npm ci --no-audit --no-fund)
    touch "$stamp"
}

# Extra tools some tests need. Later changes add here:
#   - Chromium + ChromeDriver (apt_install chromium chromium-driver) for
#     the dashboard's browser tests
# Keep each install guarded by a presence check so reruns stay fast.
prepare_extras() {
    # The chDB venv, even when CLICKHOUSE_URL points at a real ClickHouse:
    # some tests start private dev servers of their own.
    bash scripts/clickhouse.sh install
}

# Every test keeps its Redis keys under test:<schema>; drop those of earlier
# runs, as the database is dropped, so they cannot pile up in Redis (and in
# its append-only file) run after run.
reset_test_keys() {
    say "deleting Redis keys of earlier test runs"
    redis-cli -h 127.0.0.1 -p 6379 --scan --pattern 'test:*' | xargs -r -n 500 redis-cli -h 127.0.0.1 -p 6379 unlink >/dev/null
}

# Tests keep their ClickHouse data in databases t_<uuid>, named like their
# Postgres schemas; drop those of earlier runs (only on a local dev server).
reset_test_clickhouse() {
    bash scripts/clickhouse.sh drop-test-databases
}

export CLICKHOUSE_URL=${CLICKHOUSE_URL:-http://127.0.0.1:8123}
bash scripts/services.sh "$TEST_DB"
reset_test_db
reset_test_keys
reset_test_clickhouse
ensure_node
install_client_deps
prepare_extras

export DATABASE_URL="postgres://postgres:postgres@127.0.0.1:5432/$TEST_DB"
export REDIS_URL=redis://127.0.0.1:6379

ensure_cargo
# Lint gates first: they take seconds, and a red gate fails the run whatever
# the tests say.
say "cargo fmt --check"
cargo fmt --check
say "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
say "cargo test"
status=0
cargo test --no-fail-fast --lib --bins --tests -- --test-threads=8 "$@" || status=$?
say "cargo test exited with status $status"
exit "$status"
