#!/usr/bin/env bash
# The integration scenario, natively: a real HAProxy in master-worker mode, a real lbagent
# attached to it, two "nodes" (echo backends) each with its `lbctl phone-home` sidecar, and a
# client making many short requests through the frontend the whole time.
#
# Under that load node-a changes IP $LBI_CHANGES times (the sidecar reads its IP from a small
# "what is my IP" endpoint this script controls) and, half way, a third sidecar announces a new
# frontend port (lbagent rewrites its file and reloads HAProxy through the master socket).
# It prints how many requests were sent and failed and, for each IP change, the time from the
# change to traffic on the new address. It exits non-zero on any failed request, on a change
# slower than $LBI_BOUND seconds, or on anything else going wrong.
#
# As root with `ip netns` the nodes and the client live in network namespaces joined to this
# machine by veth pairs, on 10.200.x.0/24 addresses that exist only on those veths (the
# namespaces have no default route: nothing leaves the machine); a node's IP change is a new
# address in its namespace. Otherwise everything is on loopback addresses (127.0.0.2, 127.0.0.11, ...) and an
# IP change is a new echo process on the new address. Everything started or created is stopped
# or deleted on exit, also on failure or Ctrl-C.
#
# Settings (environment): LBI_MODE=auto|netns|loopback, LBI_CHANGES=5, LBI_BOUND=10 (seconds),
# LBI_RATE=50 (requests per second), LBI_KEEP=1 (keep the temporary directory and its logs),
# LBI_BUILD=1 (rebuild the release binaries even when they exist; by default only if missing),
# LBAGENT_TEST_HAPROXY=/path/to/haproxy (the HAProxy to run; default: haproxy on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export PATH="$PATH:/usr/sbin:/sbin"

MODE=${LBI_MODE:-auto}
CHANGES=${LBI_CHANGES:-5}
BOUND=${LBI_BOUND:-10}
RATE=${LBI_RATE:-50}
KEEP=${LBI_KEEP:-0}
RELOAD_AFTER=$(((CHANGES + 1) / 2)) # the new frontend appears after this many IP changes
run_start=$(date +%s.%N)

say() { printf '%s\n' "run.sh: $*"; }
die() {
    printf '%s\n' "run.sh: FAIL: $*" >&2
    exit 1
}
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------------------------------------
# Tools and binaries
# ---------------------------------------------------------------------------------------------

# The HAProxy under test: $LBAGENT_TEST_HAPROXY (e.g. a wrapper from haproxy-versions.sh), else
# the machine's.
HAPROXY=${LBAGENT_TEST_HAPROXY:-$(command -v haproxy || true)}
[ -n "$HAPROXY" ] || die "haproxy is not installed (apt-get install -y haproxy)"
HAPROXY=$(command -v "$HAPROXY") || die "LBAGENT_TEST_HAPROXY=${LBAGENT_TEST_HAPROXY:-} is not a program"
PY=$(command -v python3 || true)
[ -n "$PY" ] || die "python3 is needed for the echo backends and the client"
# The interpreter itself, not a shim: it is also started inside network namespaces.
PY=$("$PY" -c 'import sys; print(sys.executable)')
LBI="$root/integration/lib/lbi.py"
LBAGENT="$root/target/release/lbagent"
LBCTL="$root/target/release/lbctl"
if [ "${LBI_BUILD:-0}" = 1 ] || [ ! -x "$LBAGENT" ] || [ ! -x "$LBCTL" ]; then
    say "building lbagent and lbctl (release)"
    cargo build --release --locked --quiet --bin lbagent --bin lbctl
fi
lbi() { "$PY" "$LBI" "$@"; }

if [ "$MODE" = auto ]; then
    MODE=loopback
    if [ "$(id -u)" = 0 ] && command -v ip >/dev/null && command -v flock >/dev/null; then
        probe="lbiprobe$$"
        if ip netns add "$probe" 2>/dev/null; then
            ip netns del "$probe"
            MODE=netns
        fi
    fi
fi
case "$MODE" in netns | loopback) ;; *) die "LBI_MODE must be auto, netns or loopback" ;; esac

# ---------------------------------------------------------------------------------------------
# Clean-up: every process by its pid, every namespace and veth by its name
# ---------------------------------------------------------------------------------------------

work=$(mktemp -d /tmp/lbi.XXXXXX)
mkdir -p "$work/log" "$work/ip" "$work/haproxy" "$work/state" "$work/run"
pids=()  # processes this script started, in start order
names=() # their labels, for messages
netns=() # namespaces this script created
links=() # host ends of the veth pairs this script created
haproxy_pid=

alive() { # pid: running (not a zombie)
    [ -r "/proc/$1/stat" ] || return 1
    local st
    st=$(sed -E 's/.*\) ([A-Za-z]).*/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
    [ "$st" != Z ] && [ "$st" != X ]
}

stop_pid() { # pid grace-seconds: SIGTERM, then SIGKILL after the grace period
    local pid=$1 grace=$2 i
    alive "$pid" || {
        wait "$pid" 2>/dev/null || true
        return 0
    }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 20; i++)); do
        alive "$pid" || break
        sleep 0.05
    done
    alive "$pid" && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
}

# HAProxy processes whose command line names this run's directory (the master and its workers).
haproxy_pids() {
    local p cmd
    for p in /proc/[0-9]*; do
        cmd=$( { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null) || continue
        case "$cmd" in *haproxy*"$work/haproxy/"*) echo "${p#/proc/}" ;; esac
    done
}

cleanup() {
    local rc=$? i p
    trap - EXIT INT TERM
    set +e
    touch "$work/run/stop"
    # Newest first: clients, sidecars (they remove their servers), the agent, HAProxy, nodes.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        [ -n "${pids[$i]}" ] && stop_pid "${pids[$i]}" 10
    done
    for p in $(haproxy_pids); do kill -KILL "$p" 2>/dev/null; done
    for ns in "${netns[@]}"; do ip netns del "$ns" 2>/dev/null; done
    for l in "${links[@]}"; do ip link del "$l" 2>/dev/null; done
    if [ "$rc" != 0 ]; then
        echo "run.sh: failed (exit $rc); the end of each log:" >&2
        for f in "$work"/log/*.log; do
            [ -s "$f" ] || continue
            echo "----- ${f#"$work/"} -----" >&2
            grep -v ' OK ' "$f" | tail -n 15 >&2
        done
    fi
    if [ "$KEEP" = 1 ]; then
        echo "run.sh: kept $work"
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts a background process: label, then the command. Its output goes to log/<label>.log.
start() {
    local label=$1
    shift
    "$@" >"$work/log/$label.log" 2>&1 </dev/null &
    pids+=("$!")
    names+=("$label")
}

# Stops the process started with this label.
stop_label() {
    local i
    for ((i = 0; i < ${#names[@]}; i++)); do
        if [ "${names[$i]}" = "$1" ] && [ -n "${pids[$i]}" ]; then
            stop_pid "${pids[$i]}" 10
            pids[i]=""
        fi
    done
}

# Fails if a process started with this label has exited.
check_running() {
    local i
    for ((i = 0; i < ${#names[@]}; i++)); do
        if [ "${names[$i]}" = "$1" ] && [ -n "${pids[$i]}" ] && ! alive "${pids[$i]}"; then
            die "$1 exited early: $(tail -n 5 "$work/log/$1.log")"
        fi
    done
}

# Polls a command until it succeeds: deadline-seconds, description, command.
wait_until() {
    local secs=$1 what=$2 end
    shift 2
    end=$(($(date +%s%N) + secs * 1000000000))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s%N)" -lt "$end" ] || die "timed out after ${secs}s waiting for $what"
        sleep 0.05
    done
}

# ---------------------------------------------------------------------------------------------
# The network: namespaces and veths, or loopback addresses
# ---------------------------------------------------------------------------------------------

# Command prefixes that run something where the client or a node lives (empty on loopback).
IN_C=()
IN_A=()
IN_B=()

mk_ns() { # namespace host-if host-addr/24 ns-addr/24
    local ns=$1 hif=$2
    ip netns add "$ns"
    netns+=("$ns")
    ip link add "$hif" type veth peer name "${hif}p"
    links+=("$hif")
    ip link set "${hif}p" netns "$ns"
    ip -n "$ns" link set "${hif}p" name eth0
    # No IPv6 link-local chatter; IPv4 only, on addresses that exist only here.
    ip link set dev "$hif" addrgenmode none 2>/dev/null || true
    ip -n "$ns" link set dev eth0 addrgenmode none 2>/dev/null || true
    # Removing the first address of the /24 must keep the others (a node's later addresses).
    ip netns exec "$ns" sh -c 'echo 1 >/proc/sys/net/ipv4/conf/eth0/promote_secondaries'
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    ip -n "$ns" addr add "$4" dev eth0
    ip addr add "$3" dev "$hif"
    ip link set "$hif" up
}

if [ "$MODE" = netns ]; then
    # A free 10.200.N.0/22 (several runs may share the machine): client N, node-a N+1, node-b N+2.
    exec 9>/tmp/lbi-netns.lock
    flock -w 20 9 || die "another run holds /tmp/lbi-netns.lock"
    octet=
    for ((o = 0; o <= 252; o += 4)); do
        if [ -z "$(ip -4 route show root "10.200.$o.0/22" 2>/dev/null)" ] &&
            [ -z "$(ip -4 addr show to "10.200.$o.0/22" 2>/dev/null)" ]; then
            octet=$o
            break
        fi
    done
    [ -n "$octet" ] || die "no free 10.200.x.0/22 for the namespaces"
    net_c="10.200.$octet"
    net_a="10.200.$((octet + 1))"
    net_b="10.200.$((octet + 2))"
    NS_C="lbi$$c"
    NS_A="lbi$$a"
    NS_B="lbi$$b"
    mk_ns "$NS_C" "lbi$$c" "$net_c.1/24" "$net_c.2/24"
    mk_ns "$NS_A" "lbi$$a" "$net_a.1/24" "$net_a.2/24"
    mk_ns "$NS_B" "lbi$$b" "$net_b.1/24" "$net_b.2/24"
    flock -u 9
    exec 9>&-
    IN_C=(ip netns exec "$NS_C")
    IN_A=(ip netns exec "$NS_A")
    IN_B=(ip netns exec "$NS_B")
    FE_ADDR="$net_c.1"
    A_IPS=("$net_a.2")
    for ((i = 1; i <= CHANGES; i++)); do A_IPS+=("$net_a.$((10 + i))"); done
    B_IP="$net_b.2"
    NODE_CIDRS="10.200.0.0/16"
    PORT_A=30080
    PORT_B=30080
    PORT_B2=30081
    say "network namespaces: client $net_c.2, node-a $net_a.2, node-b $net_b.2 (veths lbi$$*)"
else
    FE_ADDR=127.0.0.1
    A_IPS=(127.0.0.2)
    for ((i = 1; i <= CHANGES; i++)); do A_IPS+=("127.0.0.$((10 + i))"); done
    B_IP=127.0.0.3
    NODE_CIDRS="127.0.0.0/8"
    host_args=()
    for ip in "${A_IPS[@]}"; do host_args+=(--host "$ip"); done
    PORT_A=$(lbi free-port "${host_args[@]}")
    PORT_B=$(lbi free-port --host "$B_IP")
    PORT_B2=$(lbi free-port --host "$B_IP")
    [ "$PORT_B" != "$PORT_B2" ] || PORT_B2=$(lbi free-port --host "$B_IP")
    say "loopback addresses: node-a ${A_IPS[0]}, node-b $B_IP (no namespaces: $(id -un), $MODE)"
fi

API_PORT=$(lbi free-port --range 20000 29999)
FE1=$(lbi free-port --host "$FE_ADDR" --range 20000 29999)
FE2=$(lbi free-port --host "$FE_ADDR" --range 20000 29999)
while [ "$FE1" = "$API_PORT" ] || [ "$FE2" = "$API_PORT" ] || [ "$FE1" = "$FE2" ]; do
    FE2=$(lbi free-port --host "$FE_ADDR" --range 20000 29999)
    FE1=$(lbi free-port --host "$FE_ADDR" --range 20000 29999)
done
AGENT="http://127.0.0.1:$API_PORT"

# ---------------------------------------------------------------------------------------------
# The nodes, the IP endpoint, HAProxy and the agent
# ---------------------------------------------------------------------------------------------

set_ip() { # node ip: what the node's "what is my IP" endpoint answers from now on
    printf '%s\n' "$2" >"$work/ip/$1.tmp"
    mv -f "$work/ip/$1.tmp" "$work/ip/$1"
}
set_ip node-a "${A_IPS[0]}"
set_ip node-b "$B_IP"
IP_PORT=$(lbi free-port --range 20000 29999)
start ipserve "$PY" "$LBI" ipserve --dir "$work/ip" --listen "127.0.0.1:$IP_PORT" --ready-file "$work/run/ipserve"
wait_until 10 "the IP endpoint" test -e "$work/run/ipserve"

if [ "$MODE" = netns ]; then
    # One echo per node, on every address of its namespace: a new address serves at once.
    start echo-a "${IN_A[@]}" "$PY" "$LBI" echo --name node-a --listen "0.0.0.0:$PORT_A" \
        --ready-file "$work/run/echo-a"
    start echo-b "${IN_B[@]}" "$PY" "$LBI" echo --name node-b --listen "0.0.0.0:$PORT_B" \
        --listen "0.0.0.0:$PORT_B2" --ready-file "$work/run/echo-b"
    wait_until 10 "node-a's echo" test -e "$work/run/echo-a"
else
    start echo-a-0 "$PY" "$LBI" echo --name node-a --listen "${A_IPS[0]}:$PORT_A" --ready-file "$work/run/echo-a-0"
    start echo-b "$PY" "$LBI" echo --name node-b --listen "$B_IP:$PORT_B" --listen "$B_IP:$PORT_B2" \
        --ready-file "$work/run/echo-b"
    wait_until 10 "node-a's echo" test -e "$work/run/echo-a-0"
fi
wait_until 10 "node-b's echo" test -e "$work/run/echo-b"

hdir="$work/haproxy"
sed "s#/var/lib/haproxy/#$hdir/#g" integration/haproxy/haproxy.cfg >"$hdir/haproxy.cfg"
: >"$hdir/managed.cfg"
start haproxy "$HAPROXY" -W -S "$hdir/master.sock,mode,600" -f "$hdir/haproxy.cfg" -f "$hdir/managed.cfg"
haproxy_pid=${pids[-1]}
wait_until 10 "HAProxy's stats socket" "$LBCTL" show info --socket "$hdir/admin.sock"
wait_until 10 "HAProxy's master socket" test -S "$hdir/master.sock"

KEYS="$work/keys.toml"
secret=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
(
    umask 077
    printf 'default = "%s"\n' "$secret" >"$KEYS"
)
start lbagent env RUST_LOG=info "$LBAGENT" \
    --socket "$hdir/admin.sock" --master-socket "$hdir/master.sock" \
    --haproxy-config "$hdir/haproxy.cfg" --managed-config "$hdir/managed.cfg" \
    --server-state-file "$hdir/server-state" \
    --keys-file "$KEYS" --state-dir "$work/state" --listen "127.0.0.1:$API_PORT" \
    --frontend-bind "$FE_ADDR" --allow-node-cidrs "$NODE_CIDRS" --haproxy-bin "$HAPROXY"
lbi wait-http "$AGENT/healthz" --timeout 20 || die "the agent did not become healthy"
say "haproxy $("$HAPROXY" -v | awk 'NR == 1 {print $3}') (pid $haproxy_pid), lbagent on $AGENT," \
    "frontends on $FE_ADDR"

sidecar() { # label frontend-port node node-port mode service
    start "$1" env -u NODE_NAME -u NODE_IP -u LBAGENT_KEY -u LBAGENT_URL "$LBCTL" phone-home \
        --agent "$AGENT" --key-file "$KEYS" --frontend-port "$2" --node "$3" --node-port "$4" \
        --node-ip-from "url:http://127.0.0.1:$IP_PORT/$3" --interval 1s --mode "$5" --service "$6"
}

# ---------------------------------------------------------------------------------------------
# The scenario
# ---------------------------------------------------------------------------------------------

t0=$(date +%s.%N)
sidecar sidecar-a-fe1 "$FE1" node-a "$PORT_A" tcp web
sidecar sidecar-b-fe1 "$FE1" node-b "$PORT_B" tcp web
took=$("${IN_C[@]}" "$PY" "$LBI" wait-reach --target "$FE_ADDR:$FE1" --match node-a --match node-b \
    --timeout 20 --since "$t0") || die "frontend $FE1 did not reach both nodes"
say "frontend $FE1 (tcp) serves node-a and node-b (${took}s after the sidecars started)"

start client-fe1 "${IN_C[@]}" "$PY" "$LBI" client --name "fe1:$FE1" --target "$FE_ADDR:$FE1" \
    --rate "$RATE" --log "$work/log/requests-fe1.log" --stop-file "$work/run/stop" --max-seconds 110
# A baseline under load before anything moves.
t=$(date +%s.%N)
lbi wait-log --log "$work/log/requests-fe1.log" --after "$t" --match node- --count "$RATE" \
    --timeout 10 >/dev/null || die "the client made no progress"

[ "$CHANGES" -ge 1 ] || die "LBI_CHANGES must be at least 1"
latencies=()
slow=0
for ((i = 1; i <= CHANGES; i++)); do
    old=${A_IPS[$((i - 1))]}
    new=${A_IPS[$i]}
    # Make before break: the node answers on its new address before it says so, and loses the
    # old one only once traffic has moved. The measured time is the agent's and HAProxy's.
    if [ "$MODE" = netns ]; then
        ip -n "$NS_A" addr add "$new/24" dev eth0
    else
        start "echo-a-$i" "$PY" "$LBI" echo --name node-a --listen "$new:$PORT_A" --ready-file "$work/run/echo-a-$i"
        wait_until 10 "node-a's echo on $new" test -e "$work/run/echo-a-$i"
    fi
    set_ip node-a "$new"
    t0=$(date +%s.%N)
    took=$(lbi wait-log --log "$work/log/requests-fe1.log" --after "$t0" --match "node-a $new:$PORT_A" \
        --count 3 --timeout "$BOUND") || {
        slow=$((slow + 1))
        die "IP change $i ($old -> $new): no traffic on the new address within ${BOUND}s"
    }
    latencies+=("$took")
    say "IP change $i/$CHANGES: node-a $old -> $new, traffic on the new address after ${took}s"
    if [ "$MODE" = netns ]; then
        ip -n "$NS_A" addr del "$old/24" dev eth0
    else
        stop_label "echo-a-$((i - 1))"
    fi
    check_running lbagent
    check_running haproxy

    if [ "$i" = "$RELOAD_AFTER" ]; then
        # A new frontend port: node-b's second service. HAProxy cannot add a listener at
        # runtime, so the agent rewrites its file and reloads, while fe1 stays under load.
        t0=$(date +%s.%N)
        sidecar sidecar-b-fe2 "$FE2" node-b "$PORT_B2" http web2
        took=$("${IN_C[@]}" "$PY" "$LBI" wait-reach --target "$FE_ADDR:$FE2" --match "node-b" \
            --timeout 20 --since "$t0") || die "the new frontend $FE2 did not serve within 20s"
        say "new frontend $FE2 (http, a reload): traffic ${took}s after its sidecar started"
        start client-fe2 "${IN_C[@]}" "$PY" "$LBI" client --name "fe2:$FE2" --target "$FE_ADDR:$FE2" \
            --rate "$((RATE / 2 > 0 ? RATE / 2 : 1))" --log "$work/log/requests-fe2.log" \
            --stop-file "$work/run/stop" --max-seconds 100
    fi
    # Steady load between changes: the next one once the client has made two seconds' worth.
    t=$(date +%s.%N)
    lbi wait-log --log "$work/log/requests-fe1.log" --after "$t" --match node- --count "$((2 * RATE))" \
        --timeout 10 >/dev/null || die "the client stalled after IP change $i"
done
t=$(date +%s.%N)
lbi wait-log --log "$work/log/requests-fe2.log" --after "$t" --match node-b --count 10 \
    --timeout 10 >/dev/null || die "no steady traffic through the new frontend"

# Stop the load, then look at what the agent and HAProxy ended with.
touch "$work/run/stop"
stop_label client-fe1
stop_label client-fe2

final=${A_IPS[$CHANGES]}
state=$("$LBCTL" state --agent "$AGENT" --key-file "$KEYS" --json) || die "lbctl state failed"
printf '%s' "$state" | "$PY" -c '
import json, sys
want_fe1, want_fe2, final = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
fes = {f["frontend_port"]: f for f in json.load(sys.stdin)["frontends"]}
a = [s for s in fes[want_fe1]["servers"] if s["node"] == "node-a"][0]
ip, port, seen = a["node_ip"], a["node_port"], a["haproxy"]
assert ip == final, f"node-a desired at {ip}, want {final}"
assert seen and seen["addr"] == f"{final}:{port}", f"HAProxy has {seen}"
assert want_fe2 in fes, "the new frontend is missing"
' "$FE1" "$FE2" "$final" || die "the agent's final state is wrong: $state"
health=$("$PY" -c 'import sys, urllib.request as u; print(u.urlopen(sys.argv[1], timeout=5).read().decode())' \
    "$AGENT/healthz") || die "/healthz is not 200"
# The sidecars log the agent's answer to each change: the moves must have been live.
runtime=0
for ((i = 1; i <= CHANGES; i++)); do
    n=$(grep -F "node-a at ${A_IPS[$i]}:$PORT_A " "$work/log/sidecar-a-fe1.log" |
        grep -c '"applied":"runtime"' || true)
    if [ "${n:-0}" -ge 1 ]; then runtime=$((runtime + 1)); fi
done
reloads=$(grep -c '"applied":"reload"' "$work/log/sidecar-b-fe2.log" || true)

echo
echo "== HAProxy at the end (lbctl show)"
"$LBCTL" show --socket "$hdir/admin.sock" | sed 's/^/  /'
echo
echo "== summary ($MODE)"
summary=$(lbi report --log "$work/log/requests-fe1.log" --log "$work/log/requests-fe2.log")
printf '%s\n' "$summary"
for ((i = 0; i < ${#latencies[@]}; i++)); do
    echo "  IP change $((i + 1)): ${A_IPS[$i]} -> ${A_IPS[$((i + 1))]}: ${latencies[$i]}s"
done
max=$(printf '%s\n' "${latencies[@]}" | sort -g | tail -1)
echo "IP changes: ${#latencies[@]}, slowest ${max}s (bound ${BOUND}s), applied live (runtime API):" \
    "$runtime/$CHANGES; the new frontend applied by a reload: $([ "$reloads" -ge 1 ] && echo yes || echo no)"
echo "agent health: $health"
echo "total time: $(elapsed "$run_start")s"

failed=$(printf '%s\n' "$summary" | sed -n 's/^requests sent: [0-9]*, failed: \([0-9]*\)$/\1/p')
[ -n "$failed" ] || die "no request count in the summary"
[ "$failed" = 0 ] || die "$failed requests failed"
awk -v m="$max" -v b="$BOUND" 'BEGIN { exit !(m <= b) }' || die "an IP change took ${max}s (bound ${BOUND}s)"
[ "$slow" = 0 ] || die "$slow IP changes missed the bound"
[ "$reloads" -ge 1 ] || die "the new frontend was not applied by a reload"
[ "$runtime" = "$CHANGES" ] || die "only $runtime of $CHANGES IP changes were applied at runtime"
echo "PASS"
