#!/usr/bin/env bash
# Runs every check the project holds itself to: formatting, clippy with warnings as errors, and
# all tests (unit, fixture, property and integration tests against a real haproxy), first on the
# machine's HAProxy, then again on Debian's HAProxy 3.0 and 3.2 (the version matrix, prepared by
# integration/haproxy-versions.sh; needs root and debootstrap).
#
# LBAGENT_MATRIX=0 runs the machine's HAProxy only. Without root or debootstrap the matrix is
# left out with a line saying so, except under CI=true, where that is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
    echo "test.sh: haproxy is not installed; run: apt-get install -y haproxy" >&2
    exit 1
fi
export PATH="$PATH:/usr/sbin"
# The first pass is the machine's HAProxy, whatever the caller's environment says.
unset LBAGENT_TEST_HAPROXY

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
echo "test.sh: ---- the machine's $(haproxy -v | sed -n 1p)"
cargo test --all-targets --locked
# Doc tests are not part of --all-targets.
cargo test --doc --locked

if [ "${LBAGENT_MATRIX:-1}" = 0 ]; then
    [ "${CI:-}" != true ] || { echo "test.sh: FAIL: LBAGENT_MATRIX=0 under CI=true" >&2; exit 1; }
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v debootstrap >/dev/null; then
    why="the 3.0/3.2 matrix needs root and debootstrap (apt-get install -y debootstrap)"
    if [ "${CI:-}" = true ]; then
        echo "test.sh: FAIL: $why" >&2
        exit 1
    fi
    echo "test.sh: NOT RUN: $why; LBAGENT_MATRIX=0 says you know" >&2
    exit 0
fi
integration/haproxy-versions.sh
for version in 3.0 3.2; do
    LBAGENT_TEST_HAPROXY=$(integration/haproxy-versions.sh --path "$version")
    export LBAGENT_TEST_HAPROXY
    echo "test.sh: ---- $("$LBAGENT_TEST_HAPROXY" -v | sed -n 1p) ($LBAGENT_TEST_HAPROXY)"
    cargo test --all-targets --locked
done
