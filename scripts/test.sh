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
BROWSER_DIR=tests/browser
CHAT_CLIENT_DIR=tests/chat-client

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

# npm_ci DIR: npm ci only when the lock file changed since the last
# successful install; the stamp is written last, so an interrupted install is
# retried.
npm_ci() {
    local dir=$1
    [[ -f "$dir/package-lock.json" ]] || return 0
    local stamp="$dir/node_modules/.sessiond-installed"
    if [[ -f "$stamp" && ! "$dir/package-lock.json" -nt "$stamp" ]]; then
        return 0
    fi
    say "npm ci in $dir"
    (cd "$dir" && npm ci --no-audit --no-fund)
    touch "$stamp"
}

install_client_deps() {
    npm_ci "$CLIENT_DIR"
    # The official chat clients (@trigger.dev/sdk + ai) for chat_clients.rs.
    npm_ci "$CHAT_CLIENT_DIR"
}

# playwright-core for the dashboard's browser test (tests/browser); it brings
# no browser of its own and drives the Chromium that prepare_extras installs.
install_browser_deps() {
    npm_ci "$BROWSER_DIR"
}

# Extra tools some tests need. Keep each install guarded by a presence check
# so reruns stay fast.
prepare_extras() {
    # The chDB venv, even when CLICKHOUSE_URL points at a real ClickHouse:
    # some tests start private dev servers of their own.
    bash scripts/clickhouse.sh install
    # Debian's Chromium for the dashboard's browser test. playwright-core
    # talks to it over CDP, so no ChromeDriver (and no browser download).
    if [[ ! -x /usr/bin/chromium ]]; then
        apt_install chromium
    fi
}

# Every test keeps its Redis keys under test:<schema>; drop those of earlier
# runs, as the database is dropped, so they cannot pile up in Redis (and in
# its append-only file) run after run.
reset_test_keys() {
    say "deleting Redis keys of earlier test runs"
    # Inside Redis, one SCAN step at a time: a key may hold any bytes (the
    # tests use task names with quotes, tabs and newlines), which a shell
    # pipe of key names would mangle.
    local cursor=0
    # shellcheck disable=SC2016 # Lua, not shell
    local step='local r = redis.call("SCAN", ARGV[1], "MATCH", ARGV[2], "COUNT", 1000)
for _, k in ipairs(r[2]) do redis.call("UNLINK", k) end
return r[1]'
    while :; do
        cursor=$(redis-cli -h 127.0.0.1 -p 6379 eval "$step" 0 "$cursor" 'test:*')
        [[ "$cursor" == 0 ]] && break
    done
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
install_browser_deps
prepare_extras

export DATABASE_URL="postgres://postgres:postgres@127.0.0.1:5432/$TEST_DB"
export REDIS_URL=redis://127.0.0.1:6379

ensure_cargo
# Lint gates first: they take seconds, and a red gate fails the run whatever
# the tests say.
say "cargo fmt --check"
cargo fmt --check
# The test seams (fault injection, the probe job, the clock shift) exist only
# in a `test-faults` build: the tests are built with it, and the release
# build (the library and binary without it) is linted on its own.
say "cargo clippy --all-targets --features test-faults -- -D warnings"
cargo clippy --all-targets --features test-faults -- -D warnings
say "cargo clippy --lib --bins -- -D warnings (a release build: no test seams)"
cargo clippy --lib --bins -- -D warnings
say "cargo test"
status=0
# The fault cases (tests/integration/faults*.rs) run after the rest, two at a
# time: they kill, stall and flood private services and time how the server
# heals, and on two cores eight neighbours at once would measure the
# neighbours instead. FAULTS_FULL=1 turns on their longer soak variants.
# Each pass's output is also kept, so the failures can be printed again at
# the very end: a CI log shown only by its head and tail still names them.
mkdir -p target/test-artifacts
passes=target/test-artifacts/cargo-test.log
cargo test --no-fail-fast --features test-faults --lib --bins --tests -- --test-threads=8 --skip faults "$@" 2>&1 | tee "$passes" || status=$?
say "cargo test (fault cases)"
figures=target/test-artifacts/faults.txt
rm -f "$figures"
cargo test --no-fail-fast --features test-faults --test integration -- --test-threads=2 faults "$@" 2>&1 | tee -a "$passes" || status=$?
if [[ -f "$figures" ]]; then
    say "fault case figures"
    cat "$figures"
fi
# Every test that replicates drops its own slot, even when it fails; one
# left behind would hold WAL forever on a developer's Postgres, so it fails
# the run (and is named).
leftover=$(admin_psql <<'SQL'
SELECT string_agg(slot_name, ' ') FROM pg_replication_slots WHERE database = :'db';
SQL
)
if [[ -n "$leftover" ]]; then
    say "replication slots left behind by tests: $leftover"
    status=1
fi
if [[ "$status" -ne 0 ]]; then
    # cargo prints each failed test's output under a `failures:` heading
    # that ends at its `test result:` line; at most 200 lines each.
    say "failures, again"
    awk '/^failures:$/ {f = 1; n = 0} f && n++ < 200 {print} /^test result:/ {f = 0}' "$passes"
fi
say "cargo test exited with status $status"
exit "$status"
