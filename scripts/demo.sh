#!/usr/bin/env bash
# Starts a demo HAProxy on loopback (master-worker, temporary sockets), shows it with
# `lbctl show` and `lbctl show info`, moves a server live through the runtime API, shows it
# again, then stops HAProxy. `--keep` leaves it running and prints how to look at it.
#
# Until the lbagent daemon lands, this is the first README command.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin"

keep=false
[ "${1:-}" = "--keep" ] && keep=true

if ! command -v haproxy >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        echo "demo: installing haproxy (apt-get)"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null
    else
        echo "demo: haproxy is missing; run: sudo apt-get install -y haproxy" >&2
        exit 1
    fi
fi

cargo build --release --quiet --bin lbctl
lbctl=target/release/lbctl

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
dir=$(mktemp -d /tmp/lbagent-demo.XXXXXX)
fe=$(free_port); up=$(free_port); closed=$(free_port)
sed -e "s|@DIR@|$dir|g" -e "s|@FE@|$fe|g" -e "s|@UP@|$up|g" -e "s|@CLOSED@|$closed|g" \
    haproxy/demo.cfg >"$dir/haproxy.cfg"
haproxy -c -q -f "$dir/haproxy.cfg"
haproxy -W -D -S "$dir/master.sock" -p "$dir/haproxy.pid" -f "$dir/haproxy.cfg" 2>>"$dir/haproxy.log"

stop() { [ -f "$dir/haproxy.pid" ] && kill "$(head -1 "$dir/haproxy.pid")" 2>/dev/null; rm -rf "$dir"; }
$keep || trap stop EXIT

# Wait (bounded) for the stats socket and for the first health checks.
for _ in $(seq 1 100); do
    "$lbctl" show --json --socket "$dir/admin.sock" 2>/dev/null | grep -q '"DOWN"' && break
    sleep 0.1
done

export LBCTL_SOCKET="$dir/admin.sock"
echo "== lbctl show info"
"$lbctl" show info
echo
echo "== lbctl show"
"$lbctl" show
echo "== a request through the frontend on 127.0.0.1:$fe"
python3 - "$fe" <<'PY'
import sys, urllib.request
print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=5).read().decode().strip())
PY
echo
echo "== node-b moves: set server be_$fe/node-b addr 127.0.0.1 port $up (runtime API, no reload)"
python3 - "$dir/admin.sock" "be_$fe" "$up" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(f"set server {sys.argv[2]}/node-b addr 127.0.0.1 port {sys.argv[3]}\n".encode())
print(s.recv(4096).decode().strip())
PY
for _ in $(seq 1 100); do
    "$lbctl" show --json | python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if all(s["status"]!="DOWN" for b in d["backends"] for s in b["servers"]) else 1)' && break
    sleep 0.1
done
"$lbctl" show --backend "be_$fe"

if $keep; then
    echo "HAProxy keeps running. Look:   LBCTL_SOCKET=$dir/admin.sock $lbctl show --watch 1"
    echo "Stop it:                       kill \$(cat $dir/haproxy.pid)"
fi
