#!/usr/bin/env bash
# The ClickHouse that dev and tests use: ClickHouse's own engine through chDB,
# served over ClickHouse's HTTP interface by scripts/clickhouse-dev-server.py.
# (Debian's clickhouse-server package is years old; production sets
# CLICKHOUSE_URL to a real ClickHouse and nothing here runs.)
#
# Usage: scripts/clickhouse.sh [start|stop|install|drop-test-databases]
#   start (default)      install if needed, start in the background, wait for /ping
#   stop                 stop the server this script started
#   install              only the Python venv with chDB (tests start private servers)
#   drop-test-databases  drop databases t_* that earlier test runs left behind
#
# The address comes from CLICKHOUSE_URL (default http://127.0.0.1:8123); one
# that is not on this machine is left alone. Data lives in CLICKHOUSE_DEV_DATA
# (default .sessiond/clickhouse-data); pid file and log are in .sessiond/.
# Safe to run again: every step checks first and only acts when needed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

# The chDB release the dev server is written and tested against.
CHDB_VERSION=26.9.0
VENV=.sessiond/clickhouse-venv
PYTHON="$VENV/bin/python"
SERVER=scripts/clickhouse-dev-server.py
URL=${CLICKHOUSE_URL:-http://127.0.0.1:8123}
DATA=${CLICKHOUSE_DEV_DATA:-.sessiond/clickhouse-data}

# Only a plain http URL on this machine is ours to serve; anything else is a
# real ClickHouse that someone else runs.
LOCAL=0
if [[ "$URL" =~ ^http://(127\.0\.0\.1|localhost)(:([0-9]+))?/?$ ]]; then
    LOCAL=1
    HOST=127.0.0.1
    PORT=${BASH_REMATCH[3]:-8123}
    PID_FILE=.sessiond/clickhouse-$PORT.pid
    LOG_FILE=.sessiond/clickhouse-$PORT.log
fi

# --- install -----------------------------------------------------------------

# chdb-core wheels need Python >= 3.9; `venv` needs ensurepip, which Debian
# ships separately as python3-venv.
python_ready() {
    have_cmd python3 && python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 9))' 2>/dev/null
}

# The stamp is written last, so an interrupted install is retried, and a rerun
# costs one file test instead of importing a 500 MB engine.
ensure_venv() {
    local stamp="$VENV/.chdb-core-$CHDB_VERSION"
    [[ -f "$stamp" && -x "$PYTHON" ]] && return 0
    if [[ ! -x "$PYTHON" ]]; then
        python_ready || apt_install python3 python3-venv
        python_ready || die "python3 >= 3.9 with the venv module is required"
        say "creating a Python venv in $VENV"
        python3 -m venv --clear "$VENV"
    fi
    # --no-deps: chdb-core declares pandas and pyarrow for its DataFrame and
    # Arrow APIs, which the dev server does not use (hundreds of MB saved).
    say "pip install chdb-core==$CHDB_VERSION (ClickHouse engine, ~180 MB download)"
    "$VENV/bin/pip" install --quiet --no-deps "chdb-core==$CHDB_VERSION"
    # Prove the engine runs here before calling the install good.
    "$PYTHON" -c 'import chdb; assert chdb.connect(":memory:").query("SELECT 1", "TabSeparated").bytes() == b"1\n"' ||
        die "chdb-core $CHDB_VERSION installed but does not run; see the error above"
    touch "$stamp"
}

# --- server ------------------------------------------------------------------

# Plain bash (/dev/tcp), so this works before Python or curl is installed.
ch_ping() {
    local reply
    reply=$(
        exec 2>/dev/null # "connection refused" is an answer here, not an error
        exec 3<>"/dev/tcp/$HOST/$PORT" &&
            printf 'GET /ping HTTP/1.0\r\nHost: %s\r\n\r\n' "$HOST" >&3 &&
            timeout 2 cat <&3
    ) || return 1
    [[ "$reply" == *$'\r\n\r\nOk.'* ]]
}

# The pid in the pid file, if that process is still our server.
running_pid() {
    local pid
    [[ -f "$PID_FILE" ]] || return 1
    pid=$(<"$PID_FILE")
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$SERVER" || return 1
    echo "$pid"
}

# shellcheck disable=SC2317 # only called through wait_until
ready_or_dead() { # PID
    ch_ping && return 0
    kill -0 "$1" 2>/dev/null && return 1
    tail -n 20 "$LOG_FILE" >&2 || true
    die "the ClickHouse dev server exited during start-up (log: $LOG_FILE, above)"
}

start() {
    if ((!LOCAL)); then
        say "CLICKHOUSE_URL=$URL is not a local dev address; not starting a dev server"
        return 0
    fi
    if ch_ping; then
        say "ClickHouse (dev) already answering on $HOST:$PORT"
        return 0
    fi
    ensure_venv
    local pid data
    mkdir -p .sessiond "$DATA"
    data=$(cd "$DATA" && pwd)
    # A server of ours still starting up: wait for it instead of racing it.
    if ! pid=$(running_pid); then
        say "starting the ClickHouse dev server on $HOST:$PORT (data: $DATA, log: $LOG_FILE)"
        # setsid: its own session, so a Ctrl-C on dev.sh's terminal (the
        # server runs in the foreground there) does not stop ClickHouse too.
        setsid "$PYTHON" "$SERVER" --path "$data" --host "$HOST" --port "$PORT" </dev/null >>"$LOG_FILE" 2>&1 &
        pid=$!
        echo "$pid" >"$PID_FILE"
    fi
    wait_until 60 "the ClickHouse dev server on $HOST:$PORT (log: $LOG_FILE)" ready_or_dead "$pid"
    say "ClickHouse (dev, chDB $CHDB_VERSION) ready on http://$HOST:$PORT"
}

# shellcheck disable=SC2317 # only called through wait_until
gone() { ! kill -0 "$1" 2>/dev/null; }

stop() {
    ((LOCAL)) || { say "CLICKHOUSE_URL=$URL is not a local dev address; nothing to stop"; return 0; }
    local pid
    if ! pid=$(running_pid); then
        rm -f "$PID_FILE"
        ch_ping && say "a ClickHouse on $HOST:$PORT answers, but not one this script started; left alone"
        say "no ClickHouse dev server of ours on port $PORT"
        return 0
    fi
    say "stopping the ClickHouse dev server (pid $pid)"
    kill -TERM "$pid"
    wait_until 30 "the ClickHouse dev server (pid $pid) to exit" gone "$pid"
    rm -f "$PID_FILE"
}

# Tests name their ClickHouse databases t_<uuid>, like their Postgres
# schemas; drop those of earlier runs so they do not pile up run after run.
drop_test_databases() {
    ((LOCAL)) || { say "CLICKHOUSE_URL=$URL is not a local dev address; not dropping anything there"; return 0; }
    ch_ping || die "no ClickHouse answers on $HOST:$PORT; run scripts/clickhouse.sh first"
    ensure_venv
    "$PYTHON" - "http://$HOST:$PORT/" <<'PY'
import sys, urllib.request

def sql(text):
    with urllib.request.urlopen(urllib.request.Request(sys.argv[1], data=text.encode())) as reply:
        return reply.read().decode()

names = sql(r"SELECT name FROM system.databases WHERE name LIKE 't\\_%'").split()
for name in names:
    sql(f"DROP DATABASE IF EXISTS `{name}` SYNC")
print(f"[clickhouse.sh] dropped {len(names)} ClickHouse test database(s)", file=sys.stderr)
PY
}

case "${1:-start}" in
start) start ;;
stop) stop ;;
install) ensure_venv ;;
drop-test-databases) drop_test_databases ;;
*) die "unknown command '$1' (start, stop, install, drop-test-databases)" ;;
esac
