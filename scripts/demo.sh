#!/usr/bin/env bash
# The README's first command: starts lbagent on its embedded default (a HAProxy it manages
# itself, a generated key, its API over TLS with a self-signed certificate it makes) and shows
# it working, on loopback only:
#   two "nodes" (small HTTP servers on 127.0.0.2 and 127.0.0.3) → a signed phone-home PUT →
#   a new frontend (a reload) → traffic through it → the node's IP changes (runtime, no reload)
#   → traffic follows. Then it stops everything; `--keep` leaves the agent running.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin"

keep=false
[ "${1:-}" = "--keep" ] && keep=true

# haproxy to run, protoc (and protobuf's own .proto files) to build the etcd client.
missing=()
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
[ -d /usr/include/google/protobuf ] || missing+=(libprotobuf-dev)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "demo: installing ${missing[*]} (apt-get)"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "demo: missing ${missing[*]}; run: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi
for tool in curl openssl python3; do
    command -v "$tool" >/dev/null || { echo "demo: needs $tool" >&2; exit 1; }
done

echo "== building"
cargo build --release --quiet --bin lbagent --bin lbctl
lbagent=target/release/lbagent
lbctl=target/release/lbctl

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d /tmp/lbagent-demo.XXXXXX)
api_port=9900
python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",9900))' 2>/dev/null || api_port=$(free_port)
fe_port=$(free_port)
AGENT=https://127.0.0.1:$api_port
KEYS=$work/data/keys.toml
# --tls-self-signed makes it on first start; sidecars and curl trust this file.
CA=$work/data/tls/cert.pem

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
$keep || trap cleanup EXIT

# Two "nodes": each answers with its own name, on a NodePort-range port.
node() { # name ip port
    mkdir -p "$work/$1" && echo "hello from $1 ($2)" >"$work/$1/index.html"
    python3 -m http.server "$3" --bind "$2" --directory "$work/$1" >/dev/null 2>&1 &
    pids+=($!)
}
node node-a 127.0.0.2 30080
node node-b 127.0.0.3 30081

echo "== starting lbagent (managed HAProxy, generated key, self-signed TLS) on $AGENT"
"$lbagent" --state-dir "$work/data" --listen "127.0.0.1:$api_port" --frontend-bind 127.0.0.1 \
    --tls-self-signed >"$work/lbagent.log" 2>&1 &
agent_pid=$!
pids=("$agent_pid" "${pids[@]}")
for _ in $(seq 1 100); do
    [ -f "$CA" ] && curl -sf --cacert "$CA" "$AGENT/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -sf --cacert "$CA" "$AGENT/healthz" >/dev/null || { cat "$work/lbagent.log"; exit 1; }
sed -n 's/^lbagent: /  /p' "$work/lbagent.log"

# A signed request, exactly as docs/protocol.md describes it.
signed() { # METHOD PATH [BODY]
    local method=$1 path=$2 body=${3:-} secret ts nonce body_sha sig
    secret=$(sed -n 's/^default = "\(.*\)"$/\1/p' "$KEYS")
    ts=$(date +%s)
    nonce=$(openssl rand -hex 16)
    body_sha=$(printf '%s' "$body" | openssl dgst -sha256 -r | cut -d' ' -f1)
    sig=$(printf '%s\n%s\n%s\n%s\n%s' "$method" "$path" "$ts" "$nonce" "$body_sha" |
        openssl dgst -sha256 -hmac "$secret" -r | cut -d' ' -f1)
    curl -sS --cacert "$CA" -X "$method" "$AGENT$path" -H "X-Lbagent-Timestamp: $ts" -H "X-Lbagent-Nonce: $nonce" \
        -H "X-Lbagent-Signature: sha256=$sig" -H "Content-Type: application/json" ${body:+--data "$body"}
    echo
}

echo
echo "== phone-home: frontend $fe_port → node-a at 127.0.0.2:30080 (a new port: one reload)"
signed PUT "/v1/frontends/$fe_port/servers/node-a" '{"node_ip":"127.0.0.2","node_port":30080,"service":"web"}'
export LBCTL_SOCKET=$work/data/haproxy/admin.sock
for _ in $(seq 1 50); do
    "$lbctl" show --json | grep -q '"status": "UP"' && break
    sleep 0.1
done
"$lbctl" show --backend "be_$fe_port"
echo "== through the frontend:"
curl -sS "http://127.0.0.1:$fe_port/"

echo
echo "== the node's IP changes: node-a is now 127.0.0.3:30081 (runtime API, no reload)"
signed PUT "/v1/frontends/$fe_port/servers/node-a" '{"node_ip":"127.0.0.3","node_port":30081,"service":"web"}'
for _ in $(seq 1 50); do
    curl -sS "http://127.0.0.1:$fe_port/" | grep -q node-b && break
    sleep 0.1
done
"$lbctl" show --backend "be_$fe_port"
echo "== through the frontend:"
curl -sS "http://127.0.0.1:$fe_port/"

echo
echo "== the agent's view (lbctl state)"
"$lbctl" state --agent "$AGENT" --ca-file "$CA" --key-file "$KEYS"
echo
echo "== health and metrics"
curl -sS --cacert "$CA" "$AGENT/healthz"
curl -sS --cacert "$CA" "$AGENT/metrics" |
    grep -E '^lbagent_(haproxy_reloads|http_requests)_total|^lbagent_tls_cert_expiry' || true

if $keep; then
    echo
    echo "lbagent keeps running (pid $agent_pid), state in $work/data."
    echo "  LBCTL_SOCKET=$LBCTL_SOCKET $lbctl show --watch 1"
    echo "  $lbctl state --agent $AGENT --ca-file $CA --key-file $KEYS"
    echo "Stop it: kill ${pids[*]}"
fi
