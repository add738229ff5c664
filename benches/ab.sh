#!/usr/bin/env bash
# A/B benchmark of two revisions: benches/ab.sh BEFORE_REV AFTER_REV
#
# Builds each revision's release bench binaries (control_plane, runs, streams)
# and its release `sessiond` (the server the streams bench runs as its own
# process, via SESSIOND_BIN) in a git worktree under /tmp, then runs the three
# benches for each revision interleaved, A B A B A B, so that drift of a shared
# machine hits both alike. Prints, per figure, each revision's median of the
# three runs and the after/before ratio.
#
# Figures are the benches' `figure: <name> <value> <unit>` lines; the output
# of revisions older than those lines is translated from its human-readable
# lines (see `legacy_figures`).
#
# Environment: DATABASE_URL and REDIS_URL as for the benches; AB_ROUNDS (3);
# AB_DIR (/tmp/sessiond-ab), where the worktrees, binaries and logs go;
# AB_TARGET_DIR (AB_DIR/target), a cargo target directory both builds share
# (dependencies build once; each worktree's own crates get their own hashes).
# Extra arguments for the streams bench (e.g. `fanout throughput`) go in
# AB_STREAMS_ARGS.
set -Eeuo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 BEFORE_REV AFTER_REV" >&2
  exit 2
fi
repo=$(git rev-parse --show-toplevel)
rounds=${AB_ROUNDS:-3}
dir=${AB_DIR:-/tmp/sessiond-ab}
export CARGO_TARGET_DIR=${AB_TARGET_DIR:-$dir/target}
export DATABASE_URL=${DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/sessiond_test}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
benches=(control_plane runs streams)
mkdir -p "$dir"

declare -A rev=([before]=$(git -C "$repo" rev-parse --verify "$1^{commit}") [after]=$(git -C "$repo" rev-parse --verify "$2^{commit}"))
worktrees=()
cleanup() {
  for wt in "${worktrees[@]}"; do
    git -C "$repo" worktree remove --force "$wt" >/dev/null 2>&1 || true
  done
}
trap cleanup EXIT
trap 'echo "ab.sh: failed (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR

# Builds one revision into $dir/bin/<side>/: sessiond and one binary per bench.
build() {
  local side=$1 wt="$dir/wt-$1" bin="$dir/bin/$1"
  git -C "$repo" worktree remove --force "$wt" >/dev/null 2>&1 || rm -rf "$wt"
  git -C "$repo" worktree add --detach "$wt" "${rev[$side]}" >/dev/null
  worktrees+=("$wt")
  rm -rf "$bin" && mkdir -p "$bin"
  echo "building $side (${rev[$side]:0:12}) in $wt" >&2
  (cd "$wt" && cargo build --release --bin sessiond --quiet)
  cp "$CARGO_TARGET_DIR/release/sessiond" "$bin/sessiond"
  local b exe artifacts="$dir/artifacts-$side.json"
  (cd "$wt" && cargo bench --no-run --quiet "${benches[@]/#/--bench=}" --message-format=json >"$artifacts")
  for b in "${benches[@]}"; do
    exe=$(jq -r --arg b "$b" 'select(.reason == "compiler-artifact" and .target.kind == ["bench"] and .target.name == $b and .executable != null) | .executable' "$artifacts" | tail -n 1)
    [[ -x "$exe" ]] || { echo "no executable for bench $b of $side" >&2; exit 1; }
    cp "$exe" "$bin/$b"
  done
}

# Figures from the human-readable lines of benches that print no `figure:` lines.
legacy_figures() {
  awk '
    function num(s) { gsub(/[^0-9.]/, "", s); return s }
    # control_plane: "create   5000 requests in  1.23s   4065 req/s  p50  6.12 ms  p99 ..."
    $2 ~ /^[0-9]+$/ && $3 == "requests" {
      print "figure: " $1 ".rate " $6 " req/s"; print "figure: " $1 ".p50 " $9 " ms"; print "figure: " $1 ".p99 " $12 " ms"; next
    }
    /^jobs +trigger-run jobs of all creates done/ { print "figure: jobs.drain " num($8) " s"; next }
    # summaries: "<label>  n=500  p50  2.10 ms  p99  9.87 ms  max ..."
    / n=[0-9]+ +p50 / {
      key = ""
      if ($0 ~ /^trigger→dequeue/) key = "trigger_dequeue"
      else if ($0 ~ /^append acknowledged/) key = "fanout.ack"
      else if ($0 ~ /^append→SSE delivery/) key = "fanout.delivery"
      else if ($0 ~ /^append \.in → waiting worker/) key = "wake"
      if (key == "") next
      for (i = 1; i <= NF; i++) { if ($i == "p50") p50 = $(i + 1); if ($i == "p99") p99 = $(i + 1) }
      print "figure: " key ".p50 " p50 " ms"; print "figure: " key ".p99 " p99 " ms"; next
    }
    /^sustained .* runs\/s/ { for (i = 1; i <= NF; i++) if ($(i + 1) ~ /^runs\/s/) print "figure: sustained.rate " $i " runs/s"; next }
    /^append rate achieved: / { print "figure: fanout.append_rate " num($4) " appends/s"; next }
    /^append throughput / { for (i = 1; i <= NF; i++) if ($(i + 1) == "records/s") print "figure: throughput.rate " $i " records/s"; next }
    /^memory per idle SSE subscriber/ { for (i = 1; i <= NF; i++) if ($(i + 1) == "KB") print "figure: memory.per_subscriber " $i " KB"; next }
  '
}

# Runs one bench of one side once; appends "<side> <figure> <value> <unit>" to $dir/figures.
run_one() {
  local side=$1 b=$2 round=$3 bin="$dir/bin/$1" log
  log="$dir/logs/$round-$side-$b.log"
  local args=(--bench)
  [[ $b == streams ]] && args+=(${AB_STREAMS_ARGS:-})
  echo "round $round: $side $b" >&2
  if ! SESSIOND_BIN="$bin/sessiond" "$bin/$b" "${args[@]}" >"$log" 2>&1; then
    echo "  $side $b failed (see $log)" >&2
    return 0
  fi
  if grep -q '^figure: ' "$log"; then grep '^figure: ' "$log"; else legacy_figures <"$log"; fi |
    awk -v side="$side" -v b="$b" '{ print side, b "." $2, $3, $4 }' >>"$dir/figures"
}

build before
build after
mkdir -p "$dir/logs"
: >"$dir/figures"
for round in $(seq 1 "$rounds"); do
  for b in "${benches[@]}"; do
    run_one before "$b" "$round"
    run_one after "$b" "$round"
  done
done

echo
echo "A/B: before ${rev[before]:0:12}, after ${rev[after]:0:12}; median of $rounds runs each (logs in $dir/logs)"
# Per figure: the median of each side's values, and after/before.
sort -k2,2 -k1,1 "$dir/figures" | awk '
  function median(list,   n, v, i, j, t) {
    n = split(list, v, " ")
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (v[j] + 0 < v[i] + 0) { t = v[i]; v[i] = v[j]; v[j] = t }
    if (n == 0) return ""
    return (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
  }
  { vals[$2, $1] = vals[$2, $1] " " $3; unit[$2] = $4; if (!($2 in seen)) { seen[$2] = 1; order[++k] = $2 } }
  END {
    printf "%-36s %14s %14s %8s  %s\n", "figure", "before", "after", "ratio", "unit"
    for (i = 1; i <= k; i++) {
      f = order[i]; b = median(vals[f, "before"]); a = median(vals[f, "after"])
      r = (b != "" && a != "" && b + 0 != 0) ? sprintf("%.3f", a / b) : "-"
      printf "%-36s %14s %14s %8s  %s\n", f, (b == "" ? "-" : b), (a == "" ? "-" : a), r, unit[f]
    }
  }'
