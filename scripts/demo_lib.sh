# shellcheck shell=bash
# Helpers of demo.sh (sourced, not run): messages, and the one-line failure of a step.
# Reads: WORK (the demo's work folder).

usage_error() { echo "demo.sh: error: $* (see bash demo.sh --help)" >&2; exit 2; }
say() { printf '%s\n' "$*"; }
elapsed() { local s=$(($1)); if [ "$s" -ge 60 ]; then printf '%dm%02ds' $((s / 60)) $((s % 60)); else printf '%ds' "$s"; fi; }

# fail STEP WHAT [LOG] [STATUS]: one line naming the step, what went wrong and what to do; exit.
fail() {
    local msg="$2"
    if [ -n "${3:-}" ] && [ -f "$3" ] && grep -aqiE 'no space left|ENOSPC|disk quota exceeded' "$3"; then
        msg="the disk is full; free some space (df -h $WORK), then run bash demo.sh again"
    fi
    echo "demo.sh: $1 failed: $msg${3:+ (full log: $3)}" >&2
    exit "${4:-1}"
}

# The most telling line of a log: the last "error: ..." line (the scripts' and pip's), else the last
# one mentioning an error, else the last line.
log_reason() {
    local line
    line="$(grep -aE '(^|[[:space:]])(error|ERROR): ' "$1" | grep -av 'subprocess-exited-with-error' | tail -n 1 || true)"
    [ -n "$line" ] || line="$(grep -aiE 'error|no space left|failed|not found|denied' "$1" | tail -n 1 || true)"
    [ -n "$line" ] || line="$(grep -av '^[[:space:]]*$' "$1" | tail -n 1 || true)"
    line="$(sed -E 's/^.*(error|ERROR): //; s/^[[:space:]]+//' <<<"$line")"
    printf '%s' "${line:0:300}"
}
