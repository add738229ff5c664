# shellcheck shell=bash
# Shared helpers for the scripts in this folder. Source it; don't run it.
# The caller sets `set -euo pipefail` itself.

# Sourcing twice (a script that sources another script) must be harmless.
if [[ -n "${_SESSIOND_LIB_LOADED:-}" ]]; then return 0; fi
_SESSIOND_LIB_LOADED=1

# Log to stderr so that stdout stays clean for values a caller captures.
say() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { say "error: $*"; exit 1; }

have_cmd() { command -v "$1" >/dev/null 2>&1; }

# need_cmd CMD [HINT]: stop early with a readable message instead of a
# "command not found" from the middle of a pipeline.
need_cmd() {
    have_cmd "$1" || die "'$1' is required but not on PATH${2:+ ($2)}"
}

# Run a command as root: directly when we are root (CI, containers),
# through sudo on a developer's own machine.
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    else
        need_cmd sudo "run as root, or install sudo"
        sudo "$@"
    fi
}

# Run a command as the postgres OS user, which is the only account that can
# log in over the local socket with Debian's default peer authentication.
# runuser/sudo take an argv, so nothing has to be quoted for a shell.
as_postgres() {
    if [[ $EUID -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        need_cmd sudo "needed to act as the postgres user"
        sudo -u postgres -- "$@"
    fi
}

# apt_install PKG...: the package lists on a fresh machine are empty or stale,
# so `apt-get update` runs first, but only once per run. The marker is
# exported so that child scripts (test.sh -> services.sh) share it.
apt_install() {
    need_cmd apt-get "this script expects a Debian-based machine"
    if [[ -z "${_SESSIOND_APT_UPDATED:-}" ]]; then
        say "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
        export _SESSIOND_APT_UPDATED=1
    fi
    say "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$@"
}

# wait_until SECONDS WHAT CMD...: poll CMD twice a second until it succeeds;
# give up with an error after SECONDS so a broken service never hangs CI.
wait_until() {
    local seconds=$1 what=$2
    shift 2
    local tries=$((seconds * 2))
    while ! "$@"; do
        tries=$((tries - 1))
        ((tries > 0)) || die "timed out after ${seconds}s waiting for ${what}"
        sleep 0.5
    done
}

# rustup installs cargo under ~/.cargo/bin, which a non-login shell (CI,
# cron, ssh -c) may not have on PATH.
ensure_cargo() {
    if ! have_cmd cargo && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    need_cmd cargo "install the Rust toolchain with rustup"
}
