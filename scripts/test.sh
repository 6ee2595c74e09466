#!/usr/bin/env bash
# Runs every check the project holds itself to: formatting, clippy with warnings as errors, and
# all tests (unit, fixture, property and integration tests against a real haproxy).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
    echo "test.sh: haproxy is not installed; run: apt-get install -y haproxy" >&2
    exit 1
fi
export PATH="$PATH:/usr/sbin"

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
# Doc tests are not part of --all-targets.
cargo test --doc --locked
