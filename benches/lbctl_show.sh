#!/usr/bin/env bash
# Whole-process time of `lbctl show --json` against a HAProxy with 10,000 servers, next to the
# time of just fetching the same `show stat` bytes with python3 (the baseline).
#
#   benches/lbctl_show.sh [RUNS]        (default 20 timed runs per case, after 2 warm-up runs)
#
# Starts its own HAProxy (haproxy on PATH, else /usr/sbin/haproxy, or $LBAGENT_TEST_HAPROXY) on a stats
# socket in a temporary directory, with BACKENDS backends of SERVERS_PER_BACKEND servers on
# loopback addresses (no health checks, no traffic), and stops it on exit. Builds
# target/release/lbctl with `cargo build --release` unless $LBCTL names a binary. The cases are
# timed interleaved (each run times every case once, in a rotating order), wall clock, as whole
# processes with stdout to /dev/null; the table gives each median as a ratio of the baseline's.
set -euo pipefail
trap 'echo "lbctl_show.sh: failed at line $LINENO" >&2' ERR

RUNS=${1:-20}
BACKENDS=${BACKENDS:-10}
SERVERS_PER_BACKEND=${SERVERS_PER_BACKEND:-1000}
TARGET_MS=150

cd "$(dirname "$0")/.."
[[ $RUNS =~ ^[0-9]+$ ]] && ((RUNS >= 1 && RUNS <= 1000)) || { echo "RUNS must be 1..1000" >&2; exit 2; }

HAPROXY=${LBAGENT_TEST_HAPROXY:-$(command -v haproxy || echo /usr/sbin/haproxy)}
# The interpreter itself, not a version manager's shim (pyenv's adds ~100 ms per start).
PY=$(python3 -c 'import sys; print(sys.executable)')
if [[ -z ${LBCTL:-} ]]; then
    timeout 900 cargo build --release --quiet --bin lbctl
    LBCTL=target/release/lbctl
fi

DIR=$(mktemp -d /tmp/lbctl-show-bench.XXXXXX)
HP_PID=
cleanup() {
    if [[ -n $HP_PID ]] && kill -0 "$HP_PID" 2>/dev/null; then
        kill -TERM "$HP_PID" 2>/dev/null || true
        # Bounded wait for HAProxy to go, then SIGKILL.
        for _ in $(seq 1 100); do
            kill -0 "$HP_PID" 2>/dev/null || break
            sleep 0.05
        done
        kill -KILL "$HP_PID" 2>/dev/null || true
        wait "$HP_PID" 2>/dev/null || true
    fi
    rm -rf "$DIR"
}
trap cleanup EXIT INT TERM

SOCK=$DIR/admin.sock
CFG=$DIR/haproxy.cfg
python3 - "$CFG" "$SOCK" "$BACKENDS" "$SERVERS_PER_BACKEND" <<'EOF'
import socket, sys
cfg, sock, backends, per = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with socket.socket() as l:
    l.bind(("127.0.0.1", 0))
    fe_port = l.getsockname()[1]
algos = ["roundrobin", "leastconn", "source", "first", "static-rr"]
out = [f"""global
    stats socket {sock} mode 600 level admin
    stats timeout 30s
    maxconn 2000

defaults
    mode tcp
    timeout connect 1s
    timeout client 10s
    timeout server 10s

frontend fe_main
    bind 127.0.0.1:{fe_port}
    default_backend be_000
"""]
for b in range(backends):
    out.append(f"\nbackend be_{b:03}\n    balance {algos[b % len(algos)]}\n")
    for j in range(per):
        # Loopback only (127.0.0.0/8); nothing ever connects to these.
        opts = ["", " weight 10", " backup", " disabled"][j % 4]
        out.append(f"    server srv-{j:05} 127.{1 + b}.{j // 250}.{1 + j % 250}:{20000 + j}{opts}\n")
open(cfg, "w").write("".join(out))
EOF

"$HAPROXY" -c -q -f "$CFG"
"$HAPROXY" -db -f "$CFG" >"$DIR/haproxy.log" 2>&1 &
HP_PID=$!

# The baseline, and the readiness probe: send `show stat`, read to EOF, write the bytes out.
FETCH=$DIR/fetch.py
cat >"$FETCH" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
chunks = []
while True:
    d = s.recv(1 << 20)
    if not d:
        break
    chunks.append(d)
sys.stdout.buffer.write(b"".join(chunks))
EOF

deadline=$(($(date +%s) + 20))
until "$PY" "$FETCH" "$SOCK" "show info" 2>/dev/null | grep '^Version:' >/dev/null; do
    kill -0 "$HP_PID" 2>/dev/null || { echo "haproxy exited:" >&2; cat "$DIR/haproxy.log" >&2; exit 1; }
    (($(date +%s) < deadline)) || { echo "haproxy did not answer within 20 s" >&2; exit 1; }
    sleep 0.05
done

# Check what is timed before timing it: every server is there, in the bytes and in lbctl's JSON.
STAT_BYTES=$("$PY" "$FETCH" "$SOCK" "show stat" | wc -c)
timeout 30 "$LBCTL" show --json --socket "$SOCK" >"$DIR/show.json"
python3 - "$DIR/show.json" "$((BACKENDS * SERVERS_PER_BACKEND))" <<'EOF'
import json, sys
v = json.load(open(sys.argv[1]))
n = sum(len(b["servers"]) for b in v["backends"])
assert n == int(sys.argv[2]), f"lbctl show --json lists {n} servers, expected {sys.argv[2]}"
EOF
JSON_BYTES=$(wc -c <"$DIR/show.json")
# awk reads all of it: `head -1` could close the pipe under haproxy and, with pipefail, fail.
HP_VERSION=$("$HAPROXY" -v | awk 'NR == 1 {print $3}')

# The timed cases, each one whole process with its stdout to /dev/null.
case_python_start() { "$PY" -c pass; }
case_python_fetch() { "$PY" "$FETCH" "$SOCK" "show stat"; }
case_lbctl_json() { "$LBCTL" show --json --socket "$SOCK"; }
case_lbctl_table() { "$LBCTL" show --socket "$SOCK"; }
CASES=(python_start python_fetch lbctl_json lbctl_table)

# The fetch alone, timed inside one python3 process (no interpreter start): connect, send
# `show stat`, read to EOF; microseconds, one line per run.
"$PY" - "$SOCK" "$RUNS" >"$DIR/t.python_fetch_inproc" <<'EOF'
import socket, sys, time
path, runs = sys.argv[1], int(sys.argv[2])
def fetch():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    s.sendall(b"show stat\n")
    while s.recv(1 << 20):
        pass
    s.close()
for _ in range(2):
    fetch()
for _ in range(runs):
    t0 = time.perf_counter()
    fetch()
    print(int((time.perf_counter() - t0) * 1e6))
EOF

# Interleaved: each run times every case once, in an order rotated from run to run, so a burst
# of load on the machine (2 shared cores) falls on all cases alike. Wall-clock microseconds.
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for c in "${CASES[@]}"; do
    for _ in 1 2; do "case_$c" >/dev/null; done
    : >"$DIR/t.$c"
done
for run in $(seq 1 "$RUNS"); do
    n=${#CASES[@]}
    for ((k = 0; k < n; k++)); do
        c=${CASES[$(((run + k) % n))]}
        t0=$(date +%s%N)
        "case_$c" >/dev/null
        t1=$(date +%s%N)
        echo $(((t1 - t0) / 1000)) >>"$DIR/t.$c"
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$DIR" "$RUNS" "$TARGET_MS" "$HP_VERSION" "$BACKENDS" "$SERVERS_PER_BACKEND" \
    "$STAT_BYTES" "$JSON_BYTES" "$LOAD_BEFORE" "$LOAD_AFTER" <<'EOF'
import os, statistics, sys
d, runs, target, version, backends, per = sys.argv[1:7]
runs, target = int(runs), float(target)
stat_bytes, json_bytes = int(sys.argv[7]), int(sys.argv[8])
def load(n):
    return [int(x) / 1000 for x in open(f"{d}/t.{n}").read().split()]
cases = [
    ("python3 fetch only, in-process timer", "python_fetch_inproc"),
    ("python3 -c pass (interpreter start only)", "python_start"),
    ("python3 raw 'show stat' to EOF (baseline)", "python_fetch"),
    ("lbctl show --json", "lbctl_json"),
    ("lbctl show (table)", "lbctl_table"),
]
base = statistics.median(load("python_fetch"))
print(f"HAProxy {version}, {backends} backends x {per} servers; "
      f"show stat {stat_bytes / 1e6:.2f} MB, lbctl JSON {json_bytes / 1e6:.2f} MB; "
      f"{runs} runs each, interleaved, wall clock ms")
print(f"{os.cpu_count()} CPUs; load average before {sys.argv[9]}, after {sys.argv[10]}")
print(f"{'case':<44} {'median':>8} {'mean':>8} {'min':>8} {'max':>8} {'x baseline':>11}")
for label, key in cases:
    t = load(key)
    med = statistics.median(t)
    print(f"{label:<44} {med:8.1f} {statistics.mean(t):8.1f} {min(t):8.1f} {max(t):8.1f} {med / base:11.2f}")
med = statistics.median(load("lbctl_json"))
verdict = "met" if med <= target else "MISSED"
print(f"target: lbctl show --json <= {target:.0f} ms (median): {verdict} ({med:.1f} ms)")
EOF
