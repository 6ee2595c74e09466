#!/usr/bin/env bash
# Record HAProxy runtime-API (CLI / stats socket) responses as test fixtures.
#
# Usage:   proto-fixtures/capture.sh
#          LBAGENT_TEST_HAPROXY=/path/to/haproxy proto-fixtures/capture.sh
#          CAPTURE_NOTE="..." LBAGENT_TEST_HAPROXY=... proto-fixtures/capture.sh
#
# The binary is $LBAGENT_TEST_HAPROXY (the project's one switch for "which
# HAProxy do tests and scripts run"), default `haproxy` on PATH; it may be a
# wrapper such as the ones integration/haproxy-versions.sh writes
# (`integration/haproxy-versions.sh --path 3.2` prints one's path).
#
# Starts haproxy (master-worker, -W -S) with haproxy/fixtures.cfg on sockets in
# a fresh temporary directory and on free 127.0.0.1 ports, puts the servers in
# the states documented in the config, then writes every response below
# proto-fixtures/<VERSION>/, VERSION being the exact version haproxy reports
# (third word of the first line of `haproxy -v`, e.g. 3.0.11-1+deb13u4 for a
# Debian package, 2.8.0-fdd8154ed for an upstream release build):
#
#   show-*.txt                        data commands
#   outcome/<kind>/<slug>.cmd|.txt    command line sent / response
#   raw/*.bin (+ .cmd)                unprocessed bytes (prompts included)
#   SOURCES.md                        provenance of every file (its notes
#                                     block is hand-written and preserved;
#                                     CAPTURE_NOTE=... replaces it)
#
# File content = the exact bytes haproxy sent in interactive ("prompt") mode,
# minus the trailing prompt ("> " on the worker, "master> " on the master).
# The files previously written by this script are removed first, so a re-run
# yields the same file set. Needs only bash and python3. Every wait is a
# bounded poll with a deadline; haproxy is killed on exit.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
HAPROXY=${LBAGENT_TEST_HAPROXY:-haproxy}
TEMPLATE=$ROOT/haproxy/fixtures.cfg
PY=${PYTHON:-python3}

VERLINE=$("$HAPROXY" -v | sed -n 1p)   # sed reads everything: no SIGPIPE under pipefail
BUILDOPTS=$("$HAPROXY" -vv | sed -n 's/^ *OPTIONS = //p')
# The exact version string: `HAProxy version 3.0.11-1+deb13u4 2026/10/15 - ...`.
# It names a directory, so it must be MAJOR.MINOR, then nothing, `.PATCH...`
# or `-...` (what tests/fixtures.rs reads a branch from), and hold no `/`.
VER=$(awk 'NR == 1 { print $3 }' <<<"$VERLINE")
if ! [[ $VERLINE =~ ^HA-?Proxy\ version\  && $VER =~ ^[0-9]+\.[0-9]+(\.[0-9].*|-.*)?$ && $VER != */* ]]; then
    echo "cannot parse version from: $VERLINE" >&2; exit 1
fi
OUT=$HERE/$VER

TMP=$(mktemp -d "${TMPDIR:-/tmp}/lbagent-capture.XXXXXX")
HAP_PID=
HOLD_PID=

cleanup() {
    local rc=$?
    if [[ -n $HOLD_PID ]]; then kill "$HOLD_PID" 2>/dev/null || true; wait "$HOLD_PID" 2>/dev/null || true; fi
    if [[ -n $HAP_PID ]]; then
        kill "$HAP_PID" 2>/dev/null || true      # master stops its worker
        wait "$HAP_PID" 2>/dev/null || true
    fi
    if (( rc != 0 )) && [[ -f $TMP/haproxy.log ]]; then
        echo "---- haproxy log ----" >&2; cat "$TMP/haproxy.log" >&2
    fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- python side
cat >"$TMP/cli.py" <<'PYEOF'
import os, socket, sys, time

WORKER_PROMPT = b"> "
MASTER_PROMPT = b"master> "

def talk(path, data, timeout=20.0):
    """Send data, half-close, return everything until haproxy closes."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    out = bytearray()
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
    s.close()
    return bytes(out)

def handshake(path, master):
    return talk(path, b"prompt\n")

def die(msg):
    sys.stderr.write("cli.py: %s\n" % msg)
    sys.exit(1)

def cmd_ports(args):
    """Print N free 127.0.0.1 ports, scanning upwards from a fixed base so
    that re-runs usually get the same numbers."""
    n, port = int(args[0]), int(args[1])
    got = []
    while len(got) < n and port < 65000:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("127.0.0.1", port))
            got.append(port)
        except OSError:
            pass
        finally:
            s.close()
        port += 1
    if len(got) < n:
        die("not enough free ports")
    print(" ".join(map(str, got)))

def cmd_wait_sock(args):
    path, deadline = args[0], time.monotonic() + float(args[1])
    while time.monotonic() < deadline:
        try:
            if talk(path, b"show info\n", 2.0).startswith(b"Name:"):
                return
        except OSError:
            pass
        time.sleep(0.05)
    die("socket %s not ready" % path)

def cmd_send(args):
    """send <sock> <mode> <cmd> <outfile>
    mode: prompt  - worker, interactive: strip handshake and trailing "> "
          master  - master, interactive: strip handshake and trailing "master> "
          plain   - non-interactive, bytes as received
          rawprompt / rawmaster - interactive, handshake stripped, prompt kept
    """
    path, mode, line, outfile = args
    data = line.encode() + b"\n"
    if mode == "plain":
        body = talk(path, data)
    else:
        hs = handshake(path, mode in ("master", "rawmaster"))
        resp = talk(path, b"prompt\n" + data)
        if not resp.startswith(hs):
            die("response to %r does not start with handshake %r" % (line, hs))
        body = resp[len(hs):]
        if mode in ("prompt", "master"):
            p = MASTER_PROMPT if mode == "master" else WORKER_PROMPT
            if not body.endswith(p):
                die("response to %r does not end with prompt %r: %r" % (line, p, body[-80:]))
            body = body[:-len(p)]
    with open(outfile, "wb") as f:
        f.write(body)

def cmd_handshake(args):
    path, outfile = args
    with open(outfile, "wb") as f:
        f.write(talk(path, b"prompt\n"))

def stat_rows(path):
    txt = talk(path, b"show stat\n").decode()
    lines = txt.splitlines()
    hdr = lines[0].lstrip("# ").split(",")
    rows = {}
    for l in lines[1:]:
        if not l:
            continue
        r = dict(zip(hdr, l.split(",")))
        rows[(r["pxname"], r["svname"])] = r
    return rows

def cmd_wait_stat(args):
    """wait-stat <sock> <deadline> px/sv:field=value[|value...] ... (all must hold)"""
    path, deadline = args[0], time.monotonic() + float(args[1])
    conds = []
    for a in args[2:]:
        key, val = a.split("=", 1)
        pxsv, field = key.rsplit(":", 1)
        px, sv = pxsv.split("/", 1)
        conds.append((px, sv, field, val))
    bad = conds
    while time.monotonic() < deadline:
        rows = stat_rows(path)
        bad = [c for c in conds
               if rows.get((c[0], c[1]), {}).get(c[2]) not in c[3].split("|")]
        if not bad:
            return
        time.sleep(0.05)
    rows = stat_rows(path)
    die("timeout waiting for: " + "; ".join(
        "%s/%s:%s=%r (is %r)" % (c + (rows.get((c[0], c[1]), {}).get(c[2]),)) for c in bad))

def cmd_hold(args):
    """Open a TCP connection to 127.0.0.1:<port> and keep it until killed."""
    s = socket.create_connection(("127.0.0.1", int(args[0])), timeout=5)
    s.settimeout(None)
    sys.stdout.write("connected\n")
    sys.stdout.flush()
    while s.recv(4096):
        pass

{"ports": cmd_ports, "wait-sock": cmd_wait_sock, "send": cmd_send,
 "handshake": cmd_handshake, "wait-stat": cmd_wait_stat,
 "hold": cmd_hold}[sys.argv[1]](sys.argv[2:])
PYEOF
cli() { "$PY" "$TMP/cli.py" "$@"; }

# ---------------------------------------------------------------- start haproxy
read -r P_HTTP P_TCP P_OFF P_HOLD P_HEALTH P_HANG P_CLOSED P_PAUSED <<<"$(cli ports 8 47100)"
sed -e "s#@DIR@#$TMP#g" \
    -e "s/@P_HTTP@/$P_HTTP/g;s/@P_TCP@/$P_TCP/g;s/@P_OFF@/$P_OFF/g;s/@P_HOLD@/$P_HOLD/g;s/@P_PAUSED@/$P_PAUSED/g" \
    -e "s/@P_HEALTH@/$P_HEALTH/g;s/@P_HANG@/$P_HANG/g;s/@P_CLOSED@/$P_CLOSED/g" \
    "$TEMPLATE" >"$TMP/haproxy.cfg"
if grep -q '@[A-Z_]*@' "$TMP/haproxy.cfg"; then echo "unsubstituted placeholder" >&2; exit 1; fi

ADMIN=$TMP/admin.sock
OPER=$TMP/operator.sock
MASTER=$TMP/master.sock

"$HAPROXY" -W -S "$MASTER" -f "$TMP/haproxy.cfg" >"$TMP/haproxy.log" 2>&1 &
HAP_PID=$!
cli wait-sock "$ADMIN" 15

# ---------------------------------------------------------------- set-up
# Runtime part of the server states (see haproxy/fixtures.cfg).
setup() { cli send "$ADMIN" plain "$1" "$TMP/setup.out"; }
cli wait-stat "$ADMIN" 15 "be_app/goingup1:status=UP" "be_app/up1:status=UP" "be_app/down1:status=DOWN"
setup "set server be_app/drain1 state drain"
setup "set server be_app/nolb1 health stopping"
setup "set server be_app/goingup1 health down"
setup "add server be_app/dyn0 127.0.0.1:$P_HEALTH check"
setup "enable health be_app/dyn0"
setup "set server be_app/dyn0 state ready"
setup "disable frontend fe_paused"
# One client connection pinned through fe_hold -> be_hold/hold1 -> hang.
"$PY" "$TMP/cli.py" hold "$P_HOLD" >"$TMP/hold.out" &
HOLD_PID=$!

cli wait-stat "$ADMIN" 20 \
    "be_app/up1:status=UP" "be_app/up2:status=UP" "be_app/down1:status=DOWN" \
    "be_app/maint1:status=MAINT" "be_app/track1:status=MAINT (via be_app/maint1)" \
    "be_app/drain1:status=DRAIN" "be_app/nolb1:status=NOLB" "be_app/nocheck1:status=no check" \
    "be_app/backup1:status=UP" "be_app/zero1:status=UP" "be_app/goingdown1:status=UP 1/3" \
    "be_app/goingup1:status=DOWN 1/2" "be_app/dyn0:status=UP" \
    "be_lc/lc1:status=UP" "be_lc/lc2:status=no check" "be_lc/lc3:status=MAINT" \
    "be_hold/hold1:scur=1" "hang/FRONTEND:scur=2" "fe_paused/FRONTEND:status=PAUSED|STOP"

# ---------------------------------------------------------------- output dir
mkdir -p "$OUT"
# SOURCES.md is regenerated, except its hand-written notes block (between the
# notes:begin/end markers), which is carried over unless CAPTURE_NOTE is set.
NOTES=${CAPTURE_NOTE:-}
if [[ -z $NOTES && -f $OUT/SOURCES.md ]]; then
    NOTES=$(sed -n '/^<!-- notes:begin -->$/,/^<!-- notes:end -->$/{/^<!-- notes:/!p}' "$OUT/SOURCES.md")
fi
rm -rf "$OUT/outcome" "$OUT/raw"
rm -f "$OUT"/show-*.txt
mkdir -p "$OUT/raw"

SRC=$TMP/sources.tsv   # file <TAB> socket <TAB> mode <TAB> command
: >"$SRC"
note() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$SRC"; }
sockname() { case $1 in "$ADMIN") echo admin;; "$OPER") echo operator;; "$MASTER") echo master;; esac; }

# data <file> <socket> <mode> <command>
data() {
    cli send "$2" "$3" "$4" "$OUT/$1"
    note "$1" "$(sockname "$2")" "$3" "$4"
}
# oc <kind> <slug> <command> [socket]
oc() {
    local kind=$1 slug=$2 cmd=$3 sock=${4:-$ADMIN}
    mkdir -p "$OUT/outcome/$kind"
    printf '%s' "$cmd" >"$OUT/outcome/$kind/$slug.cmd"
    cli send "$sock" prompt "$cmd" "$OUT/outcome/$kind/$slug.txt"
    note "outcome/$kind/$slug.txt" "$(sockname "$sock")" prompt "$cmd"
}

# ---------------------------------------------------------------- handshakes
cli handshake "$ADMIN" "$OUT/raw/prompt-handshake.bin"
note raw/prompt-handshake.bin admin raw "prompt"
cli handshake "$MASTER" "$OUT/raw/master-prompt-handshake.bin"
note raw/master-prompt-handshake.bin master raw "prompt"

# ---------------------------------------------------------------- data
data show-info.txt                   "$ADMIN"  prompt "show info"
data show-stat.txt                   "$ADMIN"  prompt "show stat"
data show-servers-state.txt          "$ADMIN"  prompt "show servers state"
data show-servers-state-be_app.txt   "$ADMIN"  prompt "show servers state be_app"
data show-backend.txt                "$ADMIN"  prompt "show backend"
data show-proc.txt                   "$MASTER" master "show proc"

# ---------------------------------------------------------------- outcomes
# add server
oc success          add-server                      "add server be_lc/dyn1 127.0.0.1:8080"
oc success          add-server-with-options         "add server be_lc/dyn2 127.0.0.1:8080 weight 10 maxconn 100 check"
oc already-exists   add-server-duplicate-dynamic    "add server be_lc/dyn2 127.0.0.1:8080"
oc already-exists   add-server-duplicate-static     "add server be_app/up1 127.0.0.1:8080"
oc not-found        add-server-no-such-backend      "add server be_nope/dyn1 127.0.0.1:8080"
oc refused          add-server-static-rr            "add server be_static/dyn1 127.0.0.1:8080"
oc refused          add-server-source               "add server be_source/dyn1 127.0.0.1:8080"
oc invalid-argument add-server-invalid-address      "add server be_lc/dyn3 127.0.0.1:99999"
oc invalid-argument add-server-invalid-port         "add server be_lc/dyn3 127.0.0.1:http"
oc invalid-argument add-server-missing-address      "add server be_lc/dyn3"
oc invalid-argument add-server-unknown-keyword      "add server be_lc/dyn3 127.0.0.1:8080 bogus"
oc invalid-argument add-server-missing-server-name  "add server be_lc"

# del server
oc success          set-server-state-maint-before-del "set server be_lc/dyn1 state maint"
oc success          del-server                      "del server be_lc/dyn1"
oc refused          del-server-not-in-maintenance   "del server be_lc/lc2"
oc refused          del-server-referenced           "del server be_app/maint1"
oc success          set-server-state-maint-busy     "set server be_hold/hold1 state maint"
oc refused          del-server-has-connections      "del server be_hold/hold1"
oc not-found        del-server-no-such-server       "del server be_lc/nope"
oc not-found        del-server-no-such-backend      "del server be_nope/nope"

# set server addr
oc success          set-server-addr                 "set server be_static/st2 addr 127.0.0.4"
oc success          set-server-addr-port            "set server be_static/st2 addr 127.0.0.5 port 8081"
oc success          set-server-addr-unchanged       "set server be_static/st2 addr 127.0.0.5"
oc success          set-server-addr-port-unchanged  "set server be_static/st2 addr 127.0.0.5 port 8081"
oc invalid-argument set-server-addr-invalid         "set server be_static/st2 addr not-an-ip"
oc invalid-argument set-server-addr-invalid-port    "set server be_static/st2 addr 127.0.0.5 port abc"
oc success          set-server-addr-port-out-of-range "set server be_static/st2 addr 127.0.0.5 port 99999"
oc invalid-argument set-server-addr-missing         "set server be_static/st2 addr"
oc not-found        set-server-addr-no-such-server  "set server be_static/nope addr 127.0.0.5"

# set server state
oc success          set-server-state-maint          "set server be_first/f2 state maint"
oc success          set-server-state-ready          "set server be_first/f2 state ready"
oc success          set-server-state-drain          "set server be_first/f2 state drain"
oc not-found        set-server-state-no-such-server "set server be_app/nope state ready"
oc not-found        set-server-state-no-such-backend "set server be_nope/up1 state ready"
oc invalid-argument set-server-state-invalid        "set server be_first/f1 state bogus"
oc invalid-argument set-server-missing-slash        "set server be_first state ready"
oc invalid-argument set-server-unknown-subcommand   "set server be_first/f1 bogus"
oc success          disable-server                  "disable server be_lc/lc2"
oc success          enable-server                   "enable server be_lc/lc2"
oc not-found        disable-server-no-such-server   "disable server be_lc/nope"

# weights
oc success          set-server-weight               "set server be_app/up2 weight 20"
oc success          set-weight                      "set weight be_app/up2 30"
oc success          set-weight-percent              "set weight be_app/up2 50%"
oc success          get-weight                      "get weight be_app/up2"
oc success          set-weight-static-100pct        "set weight be_static/st1 100%"
oc invalid-argument set-server-weight-out-of-range  "set server be_app/up2 weight 300"
oc invalid-argument set-server-weight-garbage       "set server be_app/up2 weight abc"
oc refused          set-server-weight-static        "set server be_static/st1 weight 50"
oc refused          set-weight-static               "set weight be_static/st1 50"
oc not-found        set-weight-no-such-server       "set weight be_app/nope 10"
oc not-found        get-weight-no-such-server       "get weight be_app/nope"

# health / agent
oc success          disable-health                  "disable health be_app/up2"
oc success          enable-health                   "enable health be_app/up2"
oc refused          enable-health-no-check          "enable health be_app/nocheck1"
oc success          disable-health-no-check         "disable health be_app/nocheck1"
oc success          set-server-health-no-check      "set server be_app/nocheck1 health up"
oc refused          set-server-health-tracking      "set server be_app/track1 health up"
oc refused          enable-agent-no-agent           "enable agent be_app/up1"
oc refused          set-server-agent-no-agent       "set server be_app/up1 agent up"
oc not-found        enable-health-no-such-server    "enable health be_app/nope"

# frontends
oc success          disable-frontend                "disable frontend fe_tcp"
oc success          enable-frontend                 "enable frontend fe_tcp"
oc success          enable-frontend-already-enabled "enable frontend fe_http"
oc success          disable-frontend-already-disabled "disable frontend fe_paused"
oc refused          disable-frontend-disabled-in-config "disable frontend fe_off"
oc refused          enable-frontend-disabled-in-config "enable frontend fe_off"
oc not-found        disable-frontend-no-such-frontend "disable frontend fe_nope"
oc not-found        enable-frontend-no-such-frontend "enable frontend fe_nope"
oc success          set-maxconn-frontend-non-numeric "set maxconn frontend fe_http abc"
oc invalid-argument set-maxconn-frontend-negative   "set maxconn frontend fe_http -1"
oc invalid-argument set-maxconn-frontend-missing-value "set maxconn frontend fe_http"
oc success          set-maxconn-frontend            "set maxconn frontend fe_http 500"
oc not-found        set-maxconn-frontend-no-such-frontend "set maxconn frontend fe_nope 10"
oc success          set-maxconn-server              "set maxconn server be_first/f1 20"

# misc
oc not-found        show-servers-state-no-such-backend "show servers state be_nope"
oc unknown-command  unknown-command                 "frobnicate"
oc unknown-command  unknown-command-partial         "show sever state"

# permission denied on the operator-level socket
oc permission-denied add-server                     "add server be_lc/op1 127.0.0.1:8080" "$OPER"
oc permission-denied del-server                     "del server be_lc/lc2" "$OPER"
oc permission-denied set-server-addr                "set server be_static/st1 addr 127.0.0.6" "$OPER"
oc permission-denied set-server-state               "set server be_first/f1 state drain" "$OPER"
oc permission-denied set-weight                     "set weight be_app/up1 10" "$OPER"
oc permission-denied enable-health                  "enable health be_app/up1" "$OPER"
oc permission-denied disable-frontend               "disable frontend fe_http" "$OPER"
oc permission-denied set-maxconn-frontend           "set maxconn frontend fe_http 10" "$OPER"
# Same request in non-interactive mode, to document that it does not differ.
mkdir -p "$OUT/raw"
printf '%s' "add server be_lc/op1 127.0.0.1:8080" >"$OUT/raw/permission-denied-noprompt.cmd"
cli send "$OPER" plain "add server be_lc/op1 127.0.0.1:8080" "$OUT/raw/permission-denied-noprompt.bin"
note raw/permission-denied-noprompt.bin operator plain "add server be_lc/op1 127.0.0.1:8080"

# ---------------------------------------------------------------- pipelining
BATCH="set server be_first/f1 state drain; set server be_app/nope state ready; show backend; get weight be_app/up1; set server be_app/up2 weight 300; set server be_first/f1 state ready"
printf '%s' "$BATCH" >"$OUT/raw/batch-1.cmd"
cli send "$ADMIN" rawprompt "$BATCH" "$OUT/raw/batch-1.bin"
note raw/batch-1.bin admin rawprompt "$BATCH"
# Same commands, one per line, all sent in a single write.
BATCH2=${BATCH//; /$'\n'}
printf '%s' "$BATCH2" >"$OUT/raw/batch-2.cmd"
cli send "$ADMIN" rawprompt "$BATCH2" "$OUT/raw/batch-2.bin"
note raw/batch-2.bin admin rawprompt "(raw/batch-1.cmd with '; ' replaced by newlines)"

# ---------------------------------------------------------------- after changes
data show-stat-after-changes.txt     "$ADMIN" prompt "show stat"
data show-servers-state-after-changes.txt "$ADMIN" prompt "show servers state"

# ---------------------------------------------------------------- SOURCES.md
{
    echo "# Sources of proto-fixtures/$VER"
    echo
    echo "Every file in this directory except this one was captured by"
    echo "\`proto-fixtures/capture.sh\` from a running haproxy:"
    echo
    echo "    $VERLINE"
    echo
    echo "Build options reported by \`haproxy -vv\`: \`${BUILDOPTS:-none}\`"
    echo "(the set of \`show stat\` columns after the \`-\` column comes from the stats"
    echo "modules compiled in, e.g. \`ssl_*\` needs USE_OPENSSL and \`quic_*\` needs USE_QUIC;"
    echo "the command list printed by the unknown-command outcomes also depends on the build)."
    echo
    # Hand-written provenance notes, kept from one run to the next.
    echo "<!-- notes:begin -->"
    if [[ -n $NOTES ]]; then printf '%s\n' "$NOTES"; fi
    echo "<!-- notes:end -->"
    echo
    echo "configuration: \`haproxy/fixtures.cfg\` (ports and socket directory substituted;"
    echo "the port numbers, PIDs, uptimes, dates and counters vary between runs)."
    echo
    echo "Conventions:"
    echo
    echo "* \`*.txt\`: response to one command sent after \`prompt\` (interactive mode),"
    echo "  with the handshake and the trailing prompt (\`> \` worker, \`master> \` master) removed."
    echo "* \`outcome/<kind>/<slug>.cmd\`: the exact command line sent (no newline);"
    echo "  \`<kind>\` is the category chosen when writing the script."
    echo "* \`raw/prompt-handshake.bin\`, \`raw/master-prompt-handshake.bin\`: bytes returned"
    echo "  for \`prompt\\n\` on the worker (admin) and master sockets."
    echo "* \`raw/batch-1.bin\`: bytes returned, after the handshake, for the single line in"
    echo "  \`raw/batch-1.cmd\` (\`;\`-separated commands); prompts kept. \`raw/batch-2.*\`: the"
    echo "  same commands one per line (\`\\n\`-separated, sent in one write, final \`\\n\` added)."
    echo "* \`permission-denied\` outcomes come from the \`level operator\` socket, in"
    echo "  interactive mode; \`raw/permission-denied-noprompt.bin\` is the same request in"
    echo "  non-interactive mode (no \`prompt\`), for comparison: with this haproxy the two"
    if cmp -s "$OUT/raw/permission-denied-noprompt.bin" "$OUT/outcome/permission-denied/add-server.txt"; then
        echo "  are byte-identical, so interactive mode was kept for all of them."
    else
        echo "  DIFFER (see both files)."
    fi
    echo "* \`show-stat-after-changes.txt\`, \`show-servers-state-after-changes.txt\`: taken after"
    echo "  all outcome commands ran (dyn1 added then deleted, dyn2 added, be_hold/hold1,"
    echo "  be_first/f2 (drain) and be_static/st2 (addr) changed, weights and maxconn changed)."
    echo
    echo "| file | socket | mode | command |"
    echo "| --- | --- | --- | --- |"
    sort "$SRC" | while IFS=$'\t' read -r f s m c; do
        printf '| `%s` | %s | %s | `%s` |\n' "$f" "$s" "$m" "$c"
    done
} >"$OUT/SOURCES.md"

echo "captured $(find "$OUT" -type f | wc -l) files into $OUT ($VERLINE)"
