#!/usr/bin/env bash
# The old design (webhook + shell script, bench/baseline/) in its two variants against lbagent,
# and the floor (the runtime command alone, no agent), with the same workload in the same run;
# prints one table. About 3 minutes.
#
#   bench/compare.sh                      # build lbagent (release) and compare all four
#   bench/compare.sh --changes 200 --only A,L
#   LBAGENT=path/to/lbagent bench/compare.sh    # skip the build
#   COMPARE_DEBUG=1 ...      # also print every change's latency and HTTP answer time
#   BASELINE_NO_EXPOSE_FD=1  # the baseline's stats socket without `expose-fd listeners`
#   KEEP_TMP=1               # keep the temp dir (logs, configs) for a look afterwards
#   LBAGENT_TEST_HAPROXY=PATH  # the HAProxy all systems run (default: haproxy on PATH)
#
# Needs haproxy, webhook (apt-get install -y webhook) and python3. Loopback only: the nodes are
# 127.0.0.2 and 127.0.0.3, every listener binds 127.0.0.1. Everything it starts is stopped on
# exit. The workload and the measures are described in bench/compare.py.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

for tool in haproxy webhook python3; do
    if ! command -v "$tool" >/dev/null; then
        echo "compare.sh: $tool is missing (apt-get install -y haproxy webhook python3)" >&2
        exit 2
    fi
done

if [ -z "${LBAGENT:-}" ]; then
    cargo build --release --quiet --bin lbagent
    LBAGENT=$ROOT/target/release/lbagent
fi
# The interpreter itself, not pyenv's shim (which costs ~100 ms per start).
PY=$(python3 -c 'import sys; print(sys.executable)')

BENCH_TMP=$(mktemp -d /tmp/lbagent-compare.XXXXXX)
DRIVER=

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$DRIVER" ] && kill -0 "$DRIVER" 2>/dev/null; then
        kill "$DRIVER" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$DRIVER" 2>/dev/null || break
            sleep 0.05
        done
    fi
    # Backstop: any process whose command line names this run's temp dir (haproxy, webhook,
    # lbagent) was started by this run; stop it by its pid.
    local d cmd
    for d in /proc/[0-9]*; do
        [ "${d#/proc/}" = "$$" ] && continue
        cmd=$( { tr '\0' ' ' <"$d/cmdline"; } 2>/dev/null) || continue
        case "$cmd" in
        *"$BENCH_TMP"*) kill -9 "${d#/proc/}" 2>/dev/null || true ;;
        esac
    done
    if [ "$rc" -ne 0 ] && [ -z "${KEEP_TMP:-}" ]; then
        for f in "$BENCH_TMP"/lbagent.log "$BENCH_TMP"/baseline-*/webhook.log; do
            [ -s "$f" ] && { echo "--- tail of $f" >&2; tail -n 20 "$f" >&2; }
        done
    fi
    if [ -n "${KEEP_TMP:-}" ]; then
        echo "compare.sh: kept $BENCH_TMP" >&2
    else
        rm -rf "$BENCH_TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT INT TERM

export BENCH_TMP LBAGENT
"$PY" "$ROOT/bench/compare.py" "$@" &
DRIVER=$!
wait "$DRIVER"
