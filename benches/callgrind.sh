#!/usr/bin/env bash
# Instruction-count A/B of the control plane's read paths: benches/callgrind.sh BEFORE_REV AFTER_REV
#
# Wall-clock figures on a shared 2-core VM move by several percent from run to
# run (see benches/ab.sh); instruction counts do not. For each revision this
# builds the release `sessiond` in a git worktree under /tmp, gives it a fresh
# schema holding identical data (CG_SESSIONS sessions created through the HTTP
# API with fixed bodies), then runs it under callgrind with instrumentation off
# and turns it on only while a fixed client (one curl process, one
# keep-alive connection, requests one at a time) sends CG_REQUESTS requests of
# one kind. Each kind is dumped on its own:
#
#   retrieve       GET /api/v1/sessions/{externalId}        (cycling over all sessions)
#   list           GET /api/v1/sessions?page[size]=20
#   list_filtered  GET /api/v1/sessions?page[size]=20&filter[type]=chat&filter[tags]=t0&filter[status]=ACTIVE
#   idle           no requests for CG_IDLE_SECS: what the server's own timers cost
#                  per second (job queue polls, outbox relay), to judge how much
#                  of a path's figure is background rather than requests
#
# Revisions run interleaved, A B A B, CG_ROUNDS times. Prints per run and path
# two figures: `figure: callgrind.<path>.instr_per_req <n> instr`, every
# instruction of the process while the workload ran, divided by the requests;
# and `callgrind.<path>.conn_instr_per_req`, only those inside the connection
# task (see dump_conn: no timer-driven background work, whose share depends on
# how long the workload took); and `parks_per_1000_req`, to tell runs that
# differ by timing (see dump_parks). Then `figure: callgrind.idle.instr_per_sec`, and
# per figure every run's value, the spread between runs of one revision, and
# after/before (of the means). The dumps stay in CG_DIR/dumps for
# callgrind_annotate.
#
# Only the sessiond process is counted: the Postgres and Redis work behind
# each request runs in their own processes, which callgrind does not see.
#
# Environment: CG_PG_URL (postgres://postgres:postgres@127.0.0.1:5432, a server
# URL without database), CG_DATABASE (sessiond_cg, created and dropped here),
# REDIS_URL (redis://127.0.0.1:6379), CG_ROUNDS (2), CG_SESSIONS (200),
# CG_REQUESTS (500), CG_WARMUP (30 of each kind, not counted), CG_IDLE_SECS
# (5), CG_PORT (39391), CG_DIR (/tmp/sessiond-cg) for worktrees, binaries,
# logs and callgrind dumps, CG_TARGET_DIR (CG_DIR/target), a cargo target
# directory both builds share. Needs valgrind (callgrind_control and
# callgrind_annotate), curl, jq, psql and redis-cli.
set -Eeuo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 BEFORE_REV AFTER_REV" >&2
  exit 2
fi
for tool in valgrind callgrind_control callgrind_annotate curl jq psql redis-cli ss; do
  command -v "$tool" >/dev/null || { echo "callgrind.sh: $tool is not installed" >&2; exit 1; }
done
repo=$(git rev-parse --show-toplevel)
rounds=${CG_ROUNDS:-2}
sessions=${CG_SESSIONS:-200}
requests=${CG_REQUESTS:-500}
warmup=${CG_WARMUP:-30}
idle_secs=${CG_IDLE_SECS:-5}
port=${CG_PORT:-39391}
dir=${CG_DIR:-/tmp/sessiond-cg}
pg=${CG_PG_URL:-postgres://postgres:postgres@127.0.0.1:5432}
database=${CG_DATABASE:-sessiond_cg}
redis_url=${REDIS_URL:-redis://127.0.0.1:6379}
export CARGO_TARGET_DIR=${CG_TARGET_DIR:-$dir/target}
base="http://127.0.0.1:$port"
paths=(retrieve list list_filtered)
started=$SECONDS
mkdir -p "$dir"

declare -A rev=([before]=$(git -C "$repo" rev-parse --verify "$1^{commit}") [after]=$(git -C "$repo" rev-parse --verify "$2^{commit}"))
worktrees=()
server_pid=""
prefixes=()
cleanup() {
  stop_server || true
  for p in "${prefixes[@]}"; do delete_redis_keys "$p" || true; done
  sql postgres "DROP DATABASE IF EXISTS \"$database\" WITH (FORCE)" >/dev/null 2>&1 || true
  for wt in "${worktrees[@]}"; do
    git -C "$repo" worktree remove --force "$wt" >/dev/null 2>&1 || true
  done
}
trap cleanup EXIT
trap 'echo "callgrind.sh: failed (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR

# psql, quiet: no NOTICE lines (DROP ... IF EXISTS), tuples only.
sql() {
  local db=$1
  shift
  PGOPTIONS=--client-min-messages=warning psql -qAtX -v ON_ERROR_STOP=1 "$pg/$db" -c "$*"
}

fail() {
  echo "callgrind.sh: $*" >&2
  exit 1
}

# Builds one revision's release sessiond into $dir/bin/<side>/.
build() {
  local side=$1 wt="$dir/wt-$1" bin="$dir/bin/$1"
  git -C "$repo" worktree remove --force "$wt" >/dev/null 2>&1 || rm -rf "$wt"
  git -C "$repo" worktree add --quiet --detach "$wt" "${rev[$side]}" >/dev/null
  worktrees+=("$wt")
  rm -rf "$bin" && mkdir -p "$bin"
  echo "building $side (${rev[$side]:0:12}) in $wt" >&2
  (cd "$wt" && cargo build --release --bin sessiond --quiet) || fail "building $side failed"
  cp "$CARGO_TARGET_DIR/release/sessiond" "$bin/sessiond"
}

# Every key of a run starts with its REDIS_PREFIX and a colon.
delete_redis_keys() {
  redis-cli -u "$redis_url" --scan --pattern "$1:*" | xargs -r -n 500 redis-cli -u "$redis_url" unlink >/dev/null
}

stop_server() {
  [[ -n $server_pid ]] || return 0
  kill -TERM "$server_pid" 2>/dev/null || true
  # Graceful shutdown waits for the job runtime; under valgrind that is slow.
  for _ in $(seq 1 120); do
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.5
  done
  kill -KILL "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

wait_healthy() {
  local what=$1 log=$2 tries=$3
  for _ in $(seq 1 "$tries"); do
    if curl -fsS -o /dev/null "$base/healthz" 2>/dev/null; then return 0; fi
    kill -0 "$server_pid" 2>/dev/null || fail "$what exited before answering /healthz (see $log)"
    sleep 0.5
  done
  fail "$what did not answer /healthz in time (see $log)"
}

# The request lists, written once so both revisions get byte-identical clients.
# One curl process per list: every request travels over the same keep-alive
# connection, one at a time, so per-request work is all the server does.
write_clients() {
  local i
  mkdir -p "$dir/clients"
  {
    for ((i = 0; i < requests; i++)); do
      printf 'url = "%s/api/v1/sessions/cg-%d"\noutput = "/dev/null"\n' "$base" $((i % sessions))
    done
  } >"$dir/clients/retrieve"
  {
    for ((i = 0; i < requests; i++)); do
      printf 'url = "%s/api/v1/sessions?page[size]=20"\noutput = "/dev/null"\n' "$base"
    done
  } >"$dir/clients/list"
  {
    for ((i = 0; i < requests; i++)); do
      printf 'url = "%s/api/v1/sessions?page[size]=20&filter[type]=chat&filter[tags]=t0&filter[status]=ACTIVE"\noutput = "/dev/null"\n' "$base"
    done
  } >"$dir/clients/list_filtered"
  for p in "${paths[@]}"; do head -n $((2 * warmup)) "$dir/clients/$p" >"$dir/clients/$p.warmup"; done
}

# Sends one request list; fails unless every answer is 200. Prints the mean
# answer size (same data, so it should match between revisions).
drive() {
  local list=$1 key=$2 codes
  codes=$(curl -g -s -H "authorization: Bearer $key" -w '%{http_code} %{size_download}\n' --config "$list") ||
    fail "curl failed on $list"
  awk -v list="$list" '
    $1 != 200 { bad++ } { n++; bytes += $2 }
    END {
      if (bad || n == 0) { printf "callgrind.sh: %d of %d answers to %s were not 200\n", bad, n, list > "/dev/stderr"; exit 1 }
      printf "%.0f\n", bytes / n
    }' <<<"$codes"
}

# The environment every server process of one run shares.
server_env() {
  local side=$1 round=$2
  # TOKIO_WORKER_THREADS=1: one worker thread, so no work stealing or cross-
  # thread wake-ups that vary with scheduling. AUTH_CACHE_TTL_MS of an hour:
  # under valgrind a request takes milliseconds, and the default 5 s cache
  # would miss (a Postgres lookup and an unseal) after as many requests as fit
  # in 5 s, which depends on the machine's load. An empty JOB_SCHEDULES_FILE:
  # no cron sweeps ticking during a measurement. RUST_LOG=warn: the benches run
  # the server with no tracing subscriber; info would count span bookkeeping.
  env_args=(
    DATABASE_URL="$pg/$database" DATABASE_SCHEMA="cg_${side}_$round" REDIS_URL="$redis_url"
    REDIS_PREFIX="cg-$side-$round" SESSIOND_MASTER_KEY="$master_hex" LISTEN_ADDR="127.0.0.1:$port"
    TOKIO_WORKER_THREADS=1 AUTH_CACHE_TTL_MS=3600000 JOB_SCHEDULES_FILE="$dir/no-schedules.toml" RUST_LOG=warn
  )
}

# Fresh schema with CG_SESSIONS sessions, made by a native (not valgrind) run
# of this revision's own server; sets `key`, the environment's secret key.
prepare() {
  local side=$1 round=$2 bin="$dir/bin/$1/sessiond" log="$dir/logs/$2-$1-prepare.log" i type body code
  server_env "$side" "$round"
  prefixes+=("cg-$side-$round")
  key=$(env "${env_args[@]}" "$bin" env create --org cg --project cg --type prod 2>>"$log" |
    awk '/^secret key:/ { print $3 }')
  [[ -n $key ]] || fail "$side: env create printed no key (see $log)"
  env "${env_args[@]}" "$bin" serve >>"$log" 2>&1 &
  server_pid=$!
  wait_healthy "$side server (native)" "$log" 60
  # Fixed bodies: types alternate chat/support and tags cycle t0..t3, so the
  # filtered list (chat, t0) matches a quarter of the sessions, a full page.
  for ((i = 0; i < sessions; i++)); do
    type=$([[ $((i % 2)) == 0 ]] && echo chat || echo support)
    body=$(printf '{"type":"%s","taskIdentifier":"echo","externalId":"cg-%d","tags":["cg","t%d"],"metadata":{"user":%d},"triggerConfig":{"basePayload":{"chatId":%d},"maxAttempts":3}}' \
      "$type" "$i" $((i % 4)) "$i" "$i")
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "authorization: Bearer $key" -H 'content-type: application/json' \
      --data "$body" "$base/api/v1/sessions")
    [[ $code == 201 ]] || fail "$side: creating session cg-$i answered $code (see $log)"
  done
  # Every create queued a trigger-run job; they must be done before the server
  # stops, or the measured server would run them.
  local pending
  for _ in $(seq 1 240); do
    pending=$(sql "$database" "SELECT count(*) FROM cg_${side}_$round.jobs WHERE status <> 'succeeded'")
    [[ $pending == 0 ]] && break
    sleep 0.5
  done
  [[ $pending == 0 ]] || fail "$side: $pending trigger-run jobs still not done after 120 s (see $log)"
  stop_server
  # Settled statistics, as benches/control_plane.rs has before its list phase.
  sql "$database" "ANALYZE cg_${side}_$round.sessions" >/dev/null
}

# callgrind_control, quiet unless it fails.
control() {
  local out
  out=$(callgrind_control "$@" "$server_pid" 2>&1) || fail "callgrind_control $* failed: $out"
}

# Turns instrumentation on, runs "$@", turns it off and dumps; the counters
# restart at zero after each dump, so each dump holds exactly one workload.
# (callgrind_control switches instrumentation, not collection: the server runs
# with --instr-atstart=no and collects whatever is instrumented. Start-up and
# warm-up thus run uninstrumented, several times faster.)
measured() {
  local name=$1 out
  shift
  control -i on
  out=$("$@")
  control -i off
  control -d "$name"
  echo "$out"
}

# The dump file whose trigger names `name` (callgrind_control -d NAME).
dump_file() {
  local prefix=$1 name=$2 f
  f=$(grep -lE "^desc: Trigger: (.* )?$name\$" "$prefix".* 2>/dev/null | head -n 1) || true
  [[ -n $f ]] || fail "no callgrind dump for $name under $prefix"
  echo "$f"
}

# Every instruction of the process in one dump. (The `totals:` line: with
# instrumentation switched on and off, callgrind leaves `summary:` at 0.)
dump_total() {
  awk '/^totals:/ { print $2; exit }' "$1"
}

# The instructions spent inside the connection task's polls (inclusive cost of
# serve_connection's future): hyper, the router, the handler and its sqlx
# queries, which run inline in that task. Unlike the dump's total, this leaves
# out the timers that tick whether or not requests come (the job queue's poll
# of Redis every 250 ms, the outbox relay every second), whose share of a
# total grows with how long the workload took on a loaded machine; and the
# runtime's own scheduling and I/O driver, which a refactor of handlers does
# not change. Both revisions have this function (src/http/conn.rs).
dump_conn() {
  callgrind_annotate --inclusive=yes --threshold=100 "$1" 2>/dev/null |
    awk '!found && index($0, ":sessiond::http::conn::serve_connection::{{closure}} [") { gsub(",", "", $1); print $1; found = 1 }
         END { if (!found) print 0 }'
}

# How often the runtime's worker parked (waited in epoll) per request, times
# 1000. An async server's count depends on timing: a query whose answer is
# already in the socket when sqlx first reads costs no park, wake-up and re-poll
# (some 2,000 instructions each); one answered later does. Which happens varies
# with the load on the machine, so runs whose counts differ should show it here.
dump_parks() {
  awk -v n="$2" '
    /^c?fn=\(/ {
      id = $0; sub(/^c?fn=\(/, "", id); sub(/\).*/, "", id)
      name = $0; if (sub(/^c?fn=\([0-9]+\) /, "", name)) names[id] = name
      cur = (/^cfn=/) ? names[id] : ""
      next
    }
    /^calls=/ { if (cur ~ /worker::Context::park_internal$/) { split($0, a, /[= ]/); parks += a[2] } }
    END { printf "%d\n", parks * 1000 / n }' "$1"
}

# One measured run of one revision: prints "<side> <round> <figure> <value>" lines to $dir/figures.
run_one() {
  local side=$1 round=$2 bin="$dir/bin/$1/sessiond" log="$dir/logs/$2-$1-callgrind.log" p bytes t0 t1 dump secs
  local prefix="$dir/dumps/$side-$round.callgrind"
  echo "round $round: $side: preparing data" >&2
  prepare "$side" "$round"
  server_env "$side" "$round"
  rm -f "$prefix".*
  env "${env_args[@]}" valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$prefix.%p" \
    "$bin" serve >"$log" 2>&1 &
  server_pid=$!
  wait_healthy "$side server under callgrind" "$log" 600
  echo "round $round: $side: warming up, then measuring" >&2
  for p in "${paths[@]}"; do drive "$dir/clients/$p.warmup" "$key" >/dev/null; done
  # The filtered list must match a full page, or it would measure a cheaper path.
  local n
  n=$(curl -g -s -H "authorization: Bearer $key" "$(sed -n 's/^url = "\(.*\)"$/\1/p;q' "$dir/clients/list_filtered")" | jq '.data | length')
  [[ $n == 20 ]] || fail "$side: the filtered list returned $n sessions, not a full page of 20"
  for p in "${paths[@]}"; do
    t0=$(date +%s.%N)
    bytes=$(measured "$p" drive "$dir/clients/$p" "$key")
    t1=$(date +%s.%N)
    dump=$(dump_file "$prefix" "$p")
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    echo "$side $round $p.instr_per_req $(($(dump_total "$dump") / requests)) $bytes $secs" >>"$dir/figures"
    echo "$side $round $p.conn_instr_per_req $(($(dump_conn "$dump") / requests)) $bytes $secs" >>"$dir/figures"
    echo "$side $round $p.parks_per_1000_req $(dump_parks "$dump" "$requests") $bytes $secs" >>"$dir/figures"
  done
  measured idle sleep "$idle_secs" >/dev/null
  dump=$(dump_file "$prefix" idle)
  echo "$side $round idle.instr_per_sec $(($(dump_total "$dump") / idle_secs)) - $idle_secs" >>"$dir/figures"
  stop_server
  sql "$database" "DROP SCHEMA cg_${side}_$round CASCADE" >/dev/null
  delete_redis_keys "cg-$side-$round"
  awk -v s="$side" -v r="$round" '$1 == s && $2 == r {
      unit = ($3 ~ /per_sec/) ? "instr/s" : ($3 ~ /parks/) ? "parks" : "instr"
      printf "%s r%s  figure: callgrind.%s %s %s", s, r, $3, $4, unit
      if ($5 != "-") printf "   (answers %s bytes; %s s with the toggles)", $5, $6
      printf "\n"
    }' "$dir/figures"
}

ss -ltn | awk '{ print $4 }' | grep -q ":$port\$" && fail "port $port is in use (set CG_PORT)"
build before
build after
master_hex=$(printf '%064x' 0 | tr 0 7)
: >"$dir/no-schedules.toml"
mkdir -p "$dir/logs" "$dir/dumps"
: >"$dir/figures"
write_clients
sql postgres "DROP DATABASE IF EXISTS \"$database\" WITH (FORCE)" >/dev/null
sql postgres "CREATE DATABASE \"$database\"" >/dev/null
for round in $(seq 1 "$rounds"); do
  run_one before "$round"
  run_one after "$round"
done

echo
echo "callgrind A/B: before ${rev[before]:0:12}, after ${rev[after]:0:12}; $requests requests per path, $rounds runs each"
echo "(sessiond's own instructions only: Postgres and Redis run in other processes; dumps in $dir/dumps)"
# Per figure: every run's value, spread = (max - min) / min within a revision,
# and the ratio of the means.
awk '
  { v[$3, $1] = v[$3, $1] " " $4; if (!($3 in seen)) { seen[$3] = 1; order[++k] = $3 } }
  function stats(list, out,   n, x, i, lo, hi, sum) {
    n = split(list, x, " "); lo = hi = x[1]; sum = 0
    for (i = 1; i <= n; i++) { sum += x[i]; if (x[i] + 0 < lo + 0) lo = x[i]; if (x[i] + 0 > hi + 0) hi = x[i] }
    out["mean"] = (n > 0) ? sum / n : 0; out["spread"] = (lo > 0) ? (hi - lo) / lo * 100 : 0
  }
  END {
    printf "%-32s %-34s %7s %-34s %7s %7s\n", "figure", "before runs", "spread", "after runs", "spread", "ratio"
    for (i = 1; i <= k; i++) {
      f = order[i]; stats(v[f, "before"], b); stats(v[f, "after"], a)
      printf "%-32s %-34s %6.2f%% %-34s %6.2f%% %7.4f\n", f, substr(v[f, "before"], 2), b["spread"], substr(v[f, "after"], 2), a["spread"], (b["mean"] > 0) ? a["mean"] / b["mean"] : 0
    }
  }' "$dir/figures"
echo "took $((SECONDS - started)) s"
